"""The device mesh and every sharding decision of the trainer.

The mesh has two named axes: `data` (batch parallelism) and `fsdp` (parameter sharding;
size 1 unless `config.mesh.fsdp` says otherwise). Batches are split over both axes, so an
fsdp axis also divides the batch, as in big_vision. Parameters and optimiser state are
replicated unless a rule table (regex over the 'a/b/kernel' path -> PartitionSpec entries)
shards them. Axis types are `Auto`: `jax.make_mesh` defaults to Explicit axes in this JAX,
which would make every array's sharding part of its type and force annotations throughout
the model; with Auto the step declares its in/out shardings and XLA propagates the rest.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over all devices (`config.mesh`: data=-1 takes the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = int(getattr(mesh_config, "fsdp", 1) or 1)
  data = int(getattr(mesh_config, "data", -1) or -1)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
        f"config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are "
        f"available; set --config.mesh.data=-1 to use them all")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh, what: str = "config.train.batch_size") -> None:
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if global_batch_size % n:
    raise ValueError(f"{what}={global_batch_size} does not divide over {n} devices "
                     f"(mesh {dict(mesh.shape)}); choose a multiple of {n}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what}={global_batch_size} does not divide over "
                     f"{jax.process_count()} processes")


def path_str(path) -> str:
  """'encoder/blocks_0/attn/qkv/kernel' from a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def param_shardings(tree: Any, mesh, rules: Sequence[tuple[str, Sequence[Any]]] = ()):
  """NamedShardings for a (possibly abstract) param/optimiser tree from a rule table.

  The first rule whose regex `re.search`es the path wins; its entries form the
  PartitionSpec (e.g. ('.*mlp/fc1/kernel', (None, 'fsdp'))). No rule: replicated. A
  dimension not divisible by its axis size falls back to replication for that leaf, so a
  rule written for ViT-B still works for a tiny test model.
  """
  compiled = [(re.compile(r), tuple(spec)) for r, spec in rules]

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    name = path_str(path)
    for regex, spec in compiled:
      if regex.search(name) and len(spec) <= len(shape):
        ok = all(ax is None or shape[i] % mesh.shape[ax] == 0 for i, ax in enumerate(spec))
        return NamedSharding(mesh, P(*spec)) if ok else replicated(mesh)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local: dict, mesh) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded on batch."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}
