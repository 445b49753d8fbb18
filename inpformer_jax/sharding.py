"""The device mesh, multi-host start-up and every sharding decision of the trainer.

The mesh has two named axes: `data` (batch parallelism) and `fsdp` (parameter sharding; size
1 unless `config.mesh.fsdp` says otherwise). Batches are split over both axes, so an fsdp axis
also divides the batch, as in big_vision: with `fsdp` devices each holding a slice of every
large parameter, XLA all-gathers the parameters for the forward/backward pass and
reduce-scatters the gradients, instead of all-reducing replicated gradients.

Axis types are `Auto`, chosen deliberately: `jax.make_mesh` defaults to Explicit axes in this
JAX, which would make every array's sharding part of its type and force sharding annotations
inside the model (e.g. on every einsum of the ViT). With Auto the train step declares its
in/out shardings (state: the rule table; batch: split over `data` x `fsdp`) and XLA's
propagation places the rest, which is all a batch-parallel + FSDP program needs.

Parameters and optimiser state are replicated unless a rule table shards them:
  rules = ((regex over the 'a/b/kernel' path, spec), ...)   first match wins
  spec  = PartitionSpec entries, e.g. (None, 'fsdp'), or the string 'auto' ('auto:N'): the
          largest dimension divisible by the fsdp axis is sharded over it, for leaves of at
          least FSDP_MIN_SIZE (N) elements (smaller ones stay replicated: their gathers cost
          more latency than the memory they save).
With `config.mesh.fsdp > 1` and no rules, `DEFAULT_FSDP_RULES` ('auto' for every leaf) apply.
The optimiser state follows its parameter, since its paths end with the parameter's path.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from inpformer_jax import errors
from inpformer_jax import params as params_lib

BATCH_AXES = ("data", "fsdp")
AXIS_NAMES = ("data", "fsdp")
# Leaves below this many elements stay replicated under the 'auto' rule (ViT-B: the biases,
# norms, layer scales and INPs stay replicated; the qkv/proj/mlp kernels are sharded).
FSDP_MIN_SIZE = 2 ** 16
DEFAULT_FSDP_RULES = ((r".*", "auto"),)

# Environment variables read by `initialize_distributed` when the config leaves a field
# unset (JAX itself only reads JAX_COORDINATOR_ADDRESS; the count and id are ours, so that
# a plain launcher can start N processes without a cluster scheduler).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class MeshError(errors.UserError, ValueError):
  """A device / mesh / batch / distributed setting that does not fit; says what to change."""


# ---------------------------------------------------------------------------------------
# Multi-host start-up.
# ---------------------------------------------------------------------------------------


def distributed_settings(config=None, environ=None) -> dict | None:
  """-> kwargs for jax.distributed.initialize, or None for a single-process run.

  Sources, first wins per field: `config.distributed.{coordinator_address, num_processes,
  process_id}` (if the config has them), then $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
  $JAX_PROCESS_ID. A coordinator address, or `config.multihost=True`, switches it on;
  `config.multihost=True` with nothing else set lets JAX detect the cluster (SLURM, Open MPI,
  Cloud TPU) by itself.
  """
  env = os.environ if environ is None else environ
  dist = getattr(config, "distributed", None) if config is not None else None

  def field(name, env_name, cast):
    v = getattr(dist, name, None) if dist is not None else None
    if v is None and env.get(env_name):
      v = env[env_name]
    return None if v is None else cast(v)

  kw = {"coordinator_address": field("coordinator_address", ENV_COORDINATOR, str),
        "num_processes": field("num_processes", ENV_NUM_PROCESSES, int),
        "process_id": field("process_id", ENV_PROCESS_ID, int)}
  wanted = bool(getattr(config, "multihost", False)) or kw["coordinator_address"] is not None
  if not wanted:
    if kw["num_processes"] is not None or kw["process_id"] is not None:
      raise MeshError(
          f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} (or config.distributed) are set but no "
          f"coordinator address: set {ENV_COORDINATOR}=host:port (the address of process 0)")
    return None
  if (kw["num_processes"] is None) != (kw["process_id"] is None):
    raise MeshError(f"set both {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or neither, to let "
                    f"JAX detect them from the cluster scheduler)")
  if kw["num_processes"] is not None and not 0 <= kw["process_id"] < kw["num_processes"]:
    raise MeshError(f"process_id={kw['process_id']} is not in [0, "
                    f"num_processes={kw['num_processes']})")
  return {k: v for k, v in kw.items() if v is not None}


def initialize_distributed(config=None) -> bool:
  """Starts jax.distributed when the config or environment asks for it; -> whether it did.

  Call it before any other JAX computation (it must precede backend creation). CPU
  processes exchange their collectives through gloo (the default CPU client has none across
  processes); the setting only concerns the CPU backend, so GPU/TPU runs are unaffected.
  """
  kw = distributed_settings(config)
  if kw is None:
    return False
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# ---------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """config.mesh {data, fsdp} (-1: the rest) -> (data, fsdp) checked against the devices."""
  sizes = {"data": int(getattr(mesh_config, "data", -1) or -1),
           "fsdp": int(getattr(mesh_config, "fsdp", 1) or 1)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise MeshError("config.mesh.data and config.mesh.fsdp are both -1: fix one of them")
  if free:
    (other,) = [k for k in sizes if k != free[0]]
    if sizes[other] <= 0 or num_devices % sizes[other]:
      raise MeshError(f"config.mesh.{other}={sizes[other]} does not divide the {num_devices} "
                      f"devices; choose a divisor of {num_devices}")
    sizes[free[0]] = num_devices // sizes[other]
  data, fsdp = sizes["data"], sizes["fsdp"]
  if data * fsdp != num_devices:
    raise MeshError(
        f"config.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
        f"{num_devices} are available ({jax.process_count()} process(es) x "
        f"{jax.local_device_count()}); set --config.mesh.data=-1 to use them all")
  return data, fsdp


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh with Auto axes over `devices` (default: all, every host)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(global_batch_size: int, mesh, what: str = "config.train.batch_size"
                     ) -> None:
  """A clear error for a global batch the mesh cannot split evenly."""
  n = batch_devices(mesh)
  if global_batch_size <= 0 or global_batch_size % n:
    up = max(n, -(-global_batch_size // n) * n)
    raise MeshError(
        f"{what}={global_batch_size} does not divide over the {n} devices of the mesh "
        f"{dict(mesh.shape)}: every device needs the same number of images. Set "
        f"--{what}={up} (a multiple of {n}) or run on fewer devices (--config.mesh.data=...)")
  if global_batch_size % jax.process_count():
    raise MeshError(f"{what}={global_batch_size} does not divide over the "
                    f"{jax.process_count()} processes; choose a multiple of "
                    f"{jax.process_count()}")


# ---------------------------------------------------------------------------------------
# Parameter sharding rules.
# ---------------------------------------------------------------------------------------


def auto_spec(shape: Sequence[int], axis_size: int, min_size: int = FSDP_MIN_SIZE,
              axis: str = "fsdp") -> P:
  """The largest dimension divisible by `axis_size` sharded over `axis` (ties: the last);
  P() when the leaf is smaller than `min_size` or no dimension divides."""
  if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % axis_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  return P(*[axis if i == best else None for i in range(len(shape))])


def param_shardings(tree: Any, mesh, rules: Sequence[tuple[str, Any]] = (), *,
                    min_size: int = FSDP_MIN_SIZE):
  """NamedShardings for a (possibly abstract) param / optimiser / run-state tree.

  The first rule whose regex `re.search`es the leaf's path wins; its spec is PartitionSpec
  entries or 'auto' (see the module docstring). No rule: replicated. With an fsdp axis > 1
  and no rules at all, DEFAULT_FSDP_RULES apply. A dimension not divisible by its mesh axis
  falls back to replication for that leaf, so a rule written for ViT-B still works for a
  tiny test model.
  """
  fsdp_size = mesh.shape.get("fsdp", 1)
  if not rules and fsdp_size > 1:
    rules = DEFAULT_FSDP_RULES
  compiled = [(re.compile(r), spec) for r, spec in rules]

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    name = params_lib.key_str(path)
    for regex, spec in compiled:
      if not regex.search(name):
        continue
      if isinstance(spec, str):
        m = re.fullmatch(r"auto(?::(\d+))?", spec)
        if not m:
          raise MeshError(f"config.mesh.param_rules: spec {spec!r} for {regex.pattern!r} is "
                          f"neither 'auto', 'auto:MIN_SIZE' nor a tuple of mesh axes / None")
        size = int(m.group(1)) if m.group(1) else min_size
        return NamedSharding(mesh, auto_spec(shape, fsdp_size, size))
      spec = tuple(spec)
      if len(spec) > len(shape):
        return replicated(mesh)
      for ax in spec:
        if ax is not None and ax not in mesh.shape:
          raise MeshError(f"config.mesh.param_rules: axis {ax!r} (rule {regex.pattern!r}) "
                          f"is not a mesh axis; use one of {tuple(mesh.shape)} or None")
      ok = all(ax is None or shape[i] % mesh.shape[ax] == 0 for i, ax in enumerate(spec))
      return NamedSharding(mesh, P(*spec)) if ok else replicated(mesh)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def describe(shardings: Any) -> dict[str, str]:
  """{path: 'PartitionSpec(...)'} of the sharded leaves (for logs and tests)."""
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    if isinstance(s, NamedSharding) and any(e is not None for e in s.spec):
      out[params_lib.key_str(path)] = str(s.spec)
  return out


def global_batch(local: dict, mesh) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded on batch."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


# ---------------------------------------------------------------------------------------
# Communication cost from the compiled program.
# ---------------------------------------------------------------------------------------

_COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
# `%name = f32[8,64]{1,0} op(...)`, the result possibly a tuple `(f32[4]{0}, /*index=1*/...)`.
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^()]*\)|[a-z][a-z0-9]*\[[0-9,]*\]"
                     r"(?:\{[^}]*\})?)\s+([a-z][\w\-]*)\(")
_SHAPE_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_NAME_RE = re.compile(r"%([\w.\-]+)")


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE_RE.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _operand_list(rest: str) -> str:
  """The text of an op's operand list, up to its matching ')'."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[:i]
  return rest


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective kind: {'count', 'bytes'} of its operands in an HLO module's text.

  Bytes are per device and per call: the sizes of the operands each device contributes
  (for an all-gather its shard, for a reduce-scatter its full input). The wire traffic is
  that times the algorithm's factor (a ring all-reduce sends 2 (n-1)/n of it per device).
  Compiled HLO prints operands by name only, so every instruction's result shape is
  recorded first and operands are looked up; async pairs count once, at their `-start`.
  """
  shapes: dict[str, str] = {}
  ops = []
  for line in hlo_text.splitlines():
    m = _DEF_RE.match(line)
    if not m:
      continue
    name, result, op = m.groups()
    shapes[name] = result
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in _COLLECTIVES:
      ops.append((base, result, _operand_list(line[m.end():])))
  out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
  for kind, result, operands in ops:
    inline = _shape_bytes(operands)  # HLO before optimisation prints operand shapes inline
    if inline:
      nbytes = inline
    else:
      nbytes = sum(_shape_bytes(shapes.get(n, "")) for n in _NAME_RE.findall(operands))
    out[kind]["count"] += 1
    out[kind]["bytes"] += nbytes
  return out


def communication_bytes(hlo_text: str) -> int:
  """Total operand bytes of all-reduce + reduce-scatter + all-gather (+ all-to-all,
  collective-permute) per device per call of the compiled program."""
  return sum(v["bytes"] for v in collective_bytes(hlo_text).values())
