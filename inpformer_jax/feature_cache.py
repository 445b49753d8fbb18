"""Frozen-encoder feature cache: the encoder's outputs for every training image, computed once.

The encoder is frozen and the official recipes have no random training augmentation, so the
encoder feature groups and their fused input (what `INPFormer.decode` starts from) are the
same at every epoch: training from them is exact, not an approximation, and takes the
encoder's forward pass out of the loop. Per image and group g: `group_g` (h*w, C_g), plus
`fused` (h*w, D), float32; `keys(num_groups)` names them and `decode_inputs` unpacks a batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from inpformer_jax import sharding
from inpformer_jax.data import pipeline
from inpformer_jax.models.inp_former import INPFormer

FUSED = "fused"


def keys(num_groups: int) -> tuple[str, ...]:
  """The cached arrays of a model with `num_groups` feature groups."""
  return (*(f"group_{g}" for g in range(num_groups)), FUSED)


def decode_inputs(batch: dict) -> tuple[list, jax.Array]:
  """A cached batch -> (en_tokens, fused), the arguments of `INPFormer.decode`."""
  names = keys(len(batch) - 1)
  return [batch[k] for k in names[:-1]], batch[FUSED]


def build_feature_cache(model, params, source, config, mesh, workdir) -> tuple[dict, bool]:
  """Encoder features of every training image, in source order.

  -> ({"group_0", ..., "fused": (N, n_tok, C)}, on_device). On device (replicated) when the
  arrays fit in config.train.cache_device_bytes, else float32 .npy files memory-mapped from
  config.train.cache_dir (default WORKDIR/feature_cache), reused by later runs of the same
  data and encoder.
  """
  src = (pipeline.ArraySource(source) if isinstance(source, np.ndarray)
         else pipeline.PathSource(source, config.data.resize))
  n = len(src)
  s = config.data.crop
  enc_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=INPFormer.encode))
  shapes = jax.eval_shape(enc_fn, params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  # per key: groups may be narrower than the fused input (fusion='concat')
  names = keys(len(shapes["en_tokens"]))
  tok_shape = {k: tuple(v.shape[1:]) for k, v in zip(names, [*shapes["en_tokens"],
                                                            shapes["fused"]])}
  nbytes = sum(n * int(np.prod(t)) * 4 for t in tok_shape.values())
  on_device = nbytes <= config.train.cache_device_bytes
  meta = {"n": n, "tok_shape": tok_shape, "encoder": config.model.encoder,
          "weights": str(config.model.encoder_weights), "resize": config.data.resize, "crop": s,
          "source": _source_fingerprint(source)}
  cache_dir = Path(config.train.cache_dir or Path(workdir) / "feature_cache")
  if not on_device and (cache_dir / "meta.json").is_file():
    if json.loads((cache_dir / "meta.json").read_text()) == json.loads(json.dumps(meta)):
      logging.info("feature cache: reusing %s", cache_dir)
      return {k: np.load(cache_dir / f"{k}.npy", mmap_mode="r") for k in names}, False
  if on_device:
    out = {k: np.zeros((n, *tok_shape[k]), np.float32) for k in names}
  else:
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "meta.json").unlink(missing_ok=True)
    out = {k: np.lib.format.open_memmap(cache_dir / f"{k}.npy", mode="w+", dtype=np.float32,
                                        shape=(n, *tok_shape[k])) for k in names}
  bs = config.train.batch_size
  ds = grain.MapDataset.source(src).map(pipeline.Finish(s)).batch(bs).to_iter_dataset()
  repl = sharding.replicated(mesh)
  pos = 0
  for batch in tqdm.tqdm(ds, total=math.ceil(n / bs), desc="feature cache",
                         disable=jax.process_index() != 0, dynamic_ncols=True):
    images = np.asarray(batch["image"])
    b = len(images)
    if b < bs:  # pad the last batch: one compiled shape.
      images = np.concatenate([images, np.zeros((bs - b, s, s, 3), np.float32)])
    feats = jax.device_get(enc_fn(params, jax.device_put(images, repl)))
    for k, v in zip(names, [*feats["en_tokens"], feats["fused"]]):
      out[k][pos:pos + b] = np.asarray(v)[:b]
    pos += b
  logging.info("feature cache: %d images, %.1f MiB, %s", n, nbytes / 2**20,
               "in device memory" if on_device else f"memory-mapped in {cache_dir}")
  if on_device:
    return {k: jax.device_put(v, repl) for k, v in out.items()}, True
  for v in out.values():
    v.flush()
  (cache_dir / "meta.json").write_text(json.dumps(meta))
  return {k: np.load(cache_dir / f"{k}.npy", mmap_mode="r") for k in names}, False


def _source_fingerprint(source) -> str:
  h = hashlib.sha1()
  if isinstance(source, np.ndarray):
    h.update(np.ascontiguousarray(source).tobytes())
  else:
    for s in source:
      h.update(s.image_path.encode())
  return h.hexdigest()


def index_stream(n: int, global_batch: int, seed: int):
  """The sample positions of `pipeline.train_dataset`'s batches (same seeded order)."""
  ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat()
  ds = ds.map(lambda i: {"index": np.int64(i)}).batch(global_batch, drop_remainder=True)
  return ds.to_iter_dataset()
