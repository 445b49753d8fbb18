"""Frozen-encoder feature cache: the encoder's outputs for every training image, computed once.

The encoder is frozen and the official recipes have no random training augmentation, so the
encoder feature groups (what `INPFormer.decode` starts from) are the same at every epoch:
training from them is exact, not an approximation, and takes the encoder's forward pass out
of the loop. Per image and group g: `group_g` (h*w, C_g) in config.train.cache_dtype
(float32, or bfloat16: half the bytes, rounded features). The decoder's fused input is
derived from the groups inside the step (`INPFormer.fused_from_groups`, as `encode` computes
it); only where it cannot be (fusion='mean' with unequal or partial groups) is it stored too,
as `fused` (h*w, D). `keys(model)` names the arrays and `decode_inputs` unpacks a batch.

Shards (so that no host holds the whole cache: ViT-B/392 is 4.8 MB per image in float32,
2.4 MB in bfloat16). The N training rows are split into S = config.train.cache_shards data
shards (0: the process count P); S divides the global batch G and is a multiple of P
(`num_shards`).
  - Shard s holds the rows {i : i % S == s}, n_s of them (`shard_rows`).
  - Its order: its own seeded, epoch-repeating permutation,
    grain MapDataset.range(n_s).seed(seed + s).shuffle().repeat(), j -> row s + S*j.
  - Global batch b = the concatenation over s = 0..S-1 of shard s's next G/S rows.
  - Process p owns the contiguous shards [p*S/P, (p+1)*S/P) (`own_shards`): its slice of each
    global batch (the p-th contiguous block, what `sharding.global_batch` assembles) is exactly
    its shards' rows, so it encodes and stores only those (N/P rows) and reads only them.
With S fixed the global batches do not depend on P (1 process or P give the same training);
with S = 1 they are `pipeline.train_dataset`'s (the uncached run's) batches.
This process's cache holds its shards' rows one shard after another (row r of the cache is
`local_rows(...)[r]`); `index_stream` yields both the source rows ("index") and these cache
positions ("row"). Storage: device memory (replicated, gathered with jnp.take) for one
process when it fits in config.train.cache_device_bytes; with several processes host memory
under the same bound (stored bytes); else .npy files memory-mapped from
config.train.cache_dir (default WORKDIR/feature_cache; with several processes a process_<p>
folder in it), reused by later runs of the same data, encoder, shards and dtype. numpy's .npy
format has no portable bfloat16, so a bfloat16 cache's files hold its raw bits as uint16 and
are read back as a bfloat16 view.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax.data import pipeline
from inpformer_jax.data import sources
from inpformer_jax.models.inp_former import INPFormer

FUSED = "fused"


def _names(num_groups: int) -> tuple[str, ...]:
  """group_0, ..., group_{G-1}, fused: every array a cache of G groups can hold."""
  return (*(f"group_{g}" for g in range(num_groups)), FUSED)


def keys(model: INPFormer) -> tuple[str, ...]:
  """The cached arrays of `model`: its groups, and the fused input only when the groups do
  not determine it (`INPFormer.fused_derivable`)."""
  names = _names(len(model.fuse_groups))
  return names[:-1] if model.fused_derivable else names


def decode_inputs(batch: dict) -> tuple[list, jax.Array | None]:
  """A cached batch -> (en_tokens, fused or None: derived), the arguments of
  `INPFormer.decode`."""
  return [batch[k] for k in _names(len(batch) - (FUSED in batch))[:-1]], batch.get(FUSED)


def cached_arrays(model: INPFormer, enc: dict, dtype=jnp.float32) -> dict:
  """`model.encode`'s output -> what the cache stores of it (`keys(model)`), in `dtype`."""
  arrays = dict(zip(_names(len(enc["en_tokens"])), [*enc["en_tokens"], enc["fused"]]))
  return {k: arrays[k].astype(dtype) for k in keys(model)}


def _load(cache_dir: Path, names: tuple[str, ...], dtype) -> dict:
  """The memory-mapped cache; bfloat16 is stored as its uint16 bits (module docstring)."""
  return {k: np.load(cache_dir / f"{k}.npy", mmap_mode="r").view(dtype) for k in names}


# ---------------------------------------------------------------------------------------
# Shards.
# ---------------------------------------------------------------------------------------


def num_shards(config, process_count: int | None = None) -> int:
  """S = config.train.cache_shards (0: the process count), checked against batch and mesh."""
  pc = jax.process_count() if process_count is None else process_count
  field, g = config.train.cache_shards, config.train.batch_size
  shards = field or pc
  if shards < 0 or g % shards or shards % pc:
    raise settings.ConfigError(
        f"config.train.cache_shards={field}: the {shards} shards must divide "
        f"config.train.batch_size={g} and be a multiple of the {pc} process(es); 0 = {pc}")
  return shards


def shard_rows(n: int, shards: int, shard: int) -> np.ndarray:
  """The source rows of one shard, in order: shard, shard + S, shard + 2S, ..."""
  return np.arange(shard, n, shards, dtype=np.int64)


def own_shards(shards: int, process_index: int, process_count: int) -> range:
  """Process p's shards: the p-th contiguous block, as `sharding.global_batch` lays out rows."""
  k = shards // process_count
  return range(process_index * k, (process_index + 1) * k)


def local_rows(n: int, shards: int, process_index: int, process_count: int) -> np.ndarray:
  """The source rows this process caches, its shards one after another."""
  return np.concatenate([shard_rows(n, shards, s)
                         for s in own_shards(shards, process_index, process_count)])


class _ShardBatches(grain.MapDataset):
  """Element k of process p's stream: its local batch b = k // per holds, for each of its
  shards in order, that shard's elements b*G/S ... (b+1)*G/S - 1."""

  def __init__(self, parents, per_shard: int, shards: int, own: range, offsets):
    super().__init__(parents)
    self._per_shard, self._shards, self._own = per_shard, shards, own
    self._offsets = tuple(offsets)
    self._per = per_shard * len(own)
    # repeat()ed parents are sys.maxsize long; so is this then (an index must fit).
    self._length = min(sys.maxsize, min(len(p) for p in parents) // per_shard * self._per)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, r = divmod(index, self._per)
    t, q = divmod(r, self._per_shard)
    j = int(self._parents[t][b * self._per_shard + q])  # position within shard own[t]
    return {"index": np.int64(self._own[t] + self._shards * j),
            "row": np.int64(self._offsets[t] + j)}

  def __str__(self) -> str:
    return (f"_ShardBatches(per_shard={self._per_shard}, shards={self._shards}, "
            f"own={self._own})")


def index_stream(n: int, global_batch: int, seed: int, shards: int = 1, *,
                 process_index: int | None = None, process_count: int | None = None):
  """This process's part of the sharded training order (module docstring), batch by batch.

  -> grain IterDataset of {"index": source rows, "row": positions in this process's cache},
  int64 (global_batch // process_count,) each; checkpointable like `pipeline.train_dataset`.
  """
  pi, pc = pipeline.process_and_count(process_index, process_count)
  if global_batch % shards or shards % pc or shards > n:
    raise ValueError(f"{shards} shards: they must divide the global batch {global_batch}, be "
                     f"a multiple of the {pc} processes and at most the {n} rows")
  own = own_shards(shards, pi, pc)
  sizes = [len(shard_rows(n, shards, s)) for s in own]
  parents = [grain.MapDataset.range(n_s).seed(seed + s).shuffle().repeat()
             for s, n_s in zip(own, sizes)]
  ds = _ShardBatches(parents, global_batch // shards, shards, own, np.cumsum([0, *sizes[:-1]]))
  return ds.batch(global_batch // pc, drop_remainder=True).to_iter_dataset()


# ---------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------


def build_feature_cache(model, params, source, config, mesh, workdir, *,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> tuple[dict, bool]:
  """Encoder features of this process's rows (`local_rows`, in that order) of `source`.

  source: a grain source (`inpformer_jax.data.sources`, with `fingerprint()`) or an array.

  -> ({`keys(model)`: (N_p, n_tok, C) in config.train.cache_dtype}, on_device); storage as
  the module docstring says. Every process runs the same number of encoder steps (collective
  on the mesh): each contributes its own images to a global batch and takes its own rows of
  the output back.
  process_index/process_count: jax's unless given.
  """
  pi, pc = pipeline.process_and_count(process_index, process_count)
  shards = num_shards(config, pc)
  src = sources.ArraySource(source) if isinstance(source, np.ndarray) else source
  n, s = len(src), config.data.crop
  rows = local_rows(n, shards, pi, pc)

  names, dtype = keys(model), jnp.dtype(config.train.cache_dtype)
  # .npy files: bfloat16's raw bits as uint16 (module docstring)
  file_dtype = np.uint16 if dtype == jnp.bfloat16 else dtype

  def encode(p, x):
    return cached_arrays(model, model.apply({"params": p}, x, method=INPFormer.encode), dtype)

  shapes = jax.eval_shape(encode, params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  # per key: groups may be narrower than the fused input (fusion='concat')
  tok_shape = {k: tuple(shapes[k].shape[1:]) for k in names}
  nbytes = sum(len(rows) * int(np.prod(t)) * dtype.itemsize for t in tok_shape.values())
  in_memory = nbytes <= config.train.cache_device_bytes
  on_device = in_memory and pc == 1
  meta = {"n": n, "tok_shape": tok_shape, "dtype": dtype.name, "encoder": config.model.encoder,
          "weights": str(config.model.encoder_weights), "resize": config.data.resize, "crop": s,
          "source": src.fingerprint(), "shards": shards,
          "own_shards": list(own_shards(shards, pi, pc))}
  cache_dir = Path(config.train.cache_dir or Path(workdir) / "feature_cache")
  if pc > 1:  # one folder per process: a shared file system never mixes shards
    cache_dir = cache_dir / f"process_{pi}"
  meta_file = cache_dir / "meta.json"
  if (not in_memory and meta_file.is_file()
      and json.loads(meta_file.read_text()) == json.loads(json.dumps(meta))):
    logging.info("feature cache: reusing %s", cache_dir)
    return _load(cache_dir, names, dtype), False
  if in_memory:
    out = {k: np.zeros((len(rows), *tok_shape[k]), dtype) for k in names}
  else:
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)
    out = {k: np.lib.format.open_memmap(cache_dir / f"{k}.npy", mode="w+", dtype=file_dtype,
                                        shape=(len(rows), *tok_shape[k])).view(dtype)
           for k in names}
  per = config.train.batch_size // pc
  # the same step count on every process (the encoder runs on the whole mesh): the largest
  # process's, the others pad.
  steps = max(math.ceil(len(local_rows(n, shards, q, pc)) / per) for q in range(pc))
  ds = grain.MapDataset.source(src).map(pipeline.Finish(s))
  ds = grain.MapDataset.concatenate([ds[k::shards] for k in own_shards(shards, pi, pc)])
  batches = iter(ds.batch(per).to_iter_dataset())
  data_sh = sharding.batch_sharding(mesh)
  enc_fn = jax.jit(encode, out_shardings=data_sh)
  pos = 0
  for _ in tqdm.tqdm(range(steps), desc="feature cache", disable=pi != 0,
                     dynamic_ncols=True):
    images = np.zeros((per, s, s, 3), np.float32)  # padding: one compiled shape
    batch = next(batches, None)
    b = 0 if batch is None else len(batch["image"])
    if b:
      images[:b] = batch["image"]
    feats = enc_fn(params, sharding.global_batch({"image": images}, mesh)["image"])
    feats = jax.device_get(multihost_utils.global_array_to_host_local_array(
        feats, mesh, data_sh.spec))
    for k in names:
      out[k][pos:pos + b] = np.asarray(feats[k])[:b]
    pos += b
  where = ("in device memory" if on_device else "in host memory" if in_memory
           else f"memory-mapped in {cache_dir}")
  logging.info("feature cache: %d of %d images (shards %s of %d), %.1f MiB %s, %s", len(rows),
               n, meta["own_shards"], shards, nbytes / 2**20, dtype.name, where)
  if on_device:
    return {k: jax.device_put(v, sharding.replicated(mesh)) for k, v in out.items()}, True
  if in_memory:
    return out, False
  for v in out.values():
    v.flush()
  meta_file.write_text(json.dumps(meta))
  return _load(cache_dir, names, dtype), False

