r"""Training images/s of our jitted train step against the PyTorch reference, in one run.

  python benchmarks/train_step.py                                  # ViT-S/224 and ViT-B/392
  python benchmarks/train_step.py --configs small:224 --batch 4 --steps 5 --json out.json

Both sides: random weights (speed does not depend on them), the official recipe's step
(forward, soft-mining + coherence loss, backward, clip 0.1, StableAdamW), float32, the same
batch; with `--cache` both also run the step that starts from stored encoder features
(config.train.cache_features). Each side runs `--warmup` untimed steps (JAX: the compile),
then `--steps` timed ones; images/s = batch * steps / time. On the CPU the torch side gets
one thread per core and XLA the project's CPU flags (inpformer_jax/xla_flags.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax import xla_flags  # noqa: E402

xla_flags.configure_cpu_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from inpformer_jax import feature_cache, sharding, train  # noqa: E402
from inpformer_jax import params as params_lib  # noqa: E402
from inpformer_jax.models.inp_former import INPFormer  # noqa: E402

ENCODERS = {"small": "dinov2reg_vit_small_14", "base": "dinov2reg_vit_base_14",
            "large": "dinov2reg_vit_large_14"}


def jax_train_images_per_sec(variant: str, image_size: int, batch: int, steps: int, *,
                             cache_features: bool = False, warmup: int = 2,
                             dtype: str = "float32") -> float:
  """Steady-state images/s of train.make_train_step for ViT-`variant` at `image_size`."""
  c = common.base_config()
  c.model.encoder = ENCODERS[variant]
  c.model.encoder_weights = "random"
  c.model.dtype = dtype
  c.data.crop = image_size
  c.train.batch_size = batch
  r = train.Recipe.create(c, total_steps=1_000_000)
  mesh = r.mesh
  encoder = jax.device_put(r.encoder, r.encoder_sh)
  state = r.init_state(r.trainable, c.seed)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
  if cache_features:
    params = params_lib.merge(encoder, r.trainable)
    feats = jax.jit(lambda p, x: r.model.apply({"params": p}, x, method=INPFormer.encode))(
        params, images)
    host = dict(zip(feature_cache.keys(len(feats["en_tokens"])),
                    map(np.asarray, [*feats["en_tokens"], feats["fused"]])))
    batch_arrays = sharding.global_batch(host, mesh)
  else:
    batch_arrays = sharding.global_batch({"image": images}, mesh)
  step = r.train_step(c.loss, cached=cache_features)
  for _ in range(warmup):
    state, metrics = step(state, encoder, batch_arrays)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, encoder, batch_arrays)
  jax.block_until_ready((state, metrics))
  return batch * steps / (time.perf_counter() - t0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="small:224,base:392",
                 help="comma-separated variant:image_size pairs")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--cache", default="off,on", help="feature cache settings to time: off,on")
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
  p.add_argument("--json", help="also write the table to this file")
  args = p.parse_args(argv)

  rows = []
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, "
        f"host: {platform.machine()}, batch {args.batch}, {args.steps} timed steps")
  print(f"{'config':>12} {'cache':>5} {'jax img/s':>10} {'torch img/s':>12} {'jax/torch':>9}")
  for item in args.configs.split(","):
    variant, size = item.split(":")
    for cache in args.cache.split(","):
      on = cache == "on"
      ours = jax_train_images_per_sec(variant, int(size), args.batch, args.steps,
                                      cache_features=on, warmup=args.warmup)
      theirs = float("nan")
      if not args.no_torch:
        from benchmarks.torch_reference import bench  # pylint: disable=g-import-not-at-top
        theirs = bench.torch_train_images_per_sec(variant, int(size), args.batch, args.steps,
                                                  cache_features=on, warmup=args.warmup)
      row = {"variant": variant, "image_size": int(size), "cache_features": on,
             "batch": args.batch, "jax_images_per_sec": ours, "torch_images_per_sec": theirs,
             "ratio": ours / theirs if theirs == theirs else None}
      rows.append(row)
      ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
      print(f"{variant + '/' + size:>12} {cache:>5} {ours:>10.2f} {theirs:>12.2f} {ratio:>9}",
            flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                           "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
