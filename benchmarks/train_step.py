r"""Training images/s of our jitted train step against the PyTorch reference, in one run.

  python benchmarks/train_step.py              # ViT-S/224 batch 8 and ViT-B/392 batch 4
  python benchmarks/train_step.py --configs small:224:8 --steps 5 --pairs 3 --json out.json

Both sides: random weights (speed does not depend on them), the official recipe's step
(forward, soft-mining + coherence loss, backward, clip 0.1, StableAdamW), float32, the same
batch. With `--cache on` our step starts from stored encoder features
(config.train.cache_features); the PyTorch side is then still the official step, which has no
cache. Each side is built and runs `--warmup` untimed steps (JAX: the compile); then
`--pairs` rounds alternate `--steps` timed steps of ours and of PyTorch's, so load changes
hit both; images/s = batch * steps / time of a round, median over the rounds. Two processes
(PyTorch in a spawned worker that waits on a pipe while ours runs, so neither side's idle
threads spin beside the other): torch gets one thread per core, XLA the project's CPU flags
(inpformer_jax/xla_flags.py). Ours runs as the command lines do, under tcmalloc when it is
installed (inpformer_jax/allocator.py); PyTorch under the same allocator, or with
`--torch-allocator system` under the system malloc (the official code launched plainly).
The header names both sides' allocators."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax import allocator  # noqa: E402
from inpformer_jax import xla_flags  # noqa: E402

if __name__ == "__main__":
  allocator.use_tcmalloc()  # as the command lines run; before JAX is imported
xla_flags.configure_cpu_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.torch_reference import worker as worker_lib  # noqa: E402
from configs import common  # noqa: E402
from inpformer_jax import feature_cache, sharding, train  # noqa: E402
from inpformer_jax import params as params_lib  # noqa: E402
from inpformer_jax.models.inp_former import INPFormer  # noqa: E402

ENCODERS = {"small": "dinov2reg_vit_small_14", "base": "dinov2reg_vit_base_14",
            "large": "dinov2reg_vit_large_14"}


# The tiny random ViT of configs/common.apply_runlocal (CPU dry runs of benchmarks/gpu_suite.py).
TINY = "tiny"


def train_config(variant: str, image_size: int, batch: int, *, dtype: str = "float32",
                 attention_impl: str | None = None):
  """The official recipe's config for ViT-`variant` (or TINY) with random encoder weights."""
  c = common.base_config()
  if variant == TINY:
    common.apply_runlocal(c)
    c.train.total_steps = None
  else:
    c.model.encoder = ENCODERS[variant]
    c.model.encoder_weights = "random"
  c.model.dtype = dtype
  c.model.attention_impl = attention_impl
  c.data.crop = image_size
  c.data.resize = image_size * 8 // 7  # the official 448 -> 392 ratio (feature-cache sources)
  c.train.batch_size = batch
  return c


def prepare_train_step(c, cached: bool):
  """-> (recipe, step, state, encoder, batch): `recipe.train_step` and its arguments for one
  random batch of c.train.batch_size images (cached: their encoder features)."""
  r = train.Recipe.create(c, total_steps=1_000_000)
  batch, size = c.train.batch_size, c.data.crop
  encoder = jax.device_put(r.encoder, r.encoder_sh)
  state = r.init_state(r.trainable, c.seed)
  images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  if cached:
    params = params_lib.merge(encoder, r.trainable)
    feats = jax.jit(lambda p, x: r.model.apply({"params": p}, x, method=INPFormer.encode))(
        params, images)
    host = {k: np.asarray(v) for k, v in feature_cache.cached_arrays(
        r.model, feats, c.train.cache_dtype).items()}
    batch_arrays = sharding.global_batch(host, r.mesh)
  else:
    batch_arrays = sharding.global_batch({"image": images}, r.mesh)
  return r, r.train_step(c.loss, cached=cached), state, encoder, batch_arrays


def run_steps(step, state, encoder, batch, n: int):
  """-> (state after n steps, their wall seconds), the device work included."""
  metrics = None
  t0 = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, encoder, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0


def jax_train_images_per_sec(variant: str, image_size: int, batch: int, steps: int, *,
                             cache_features: bool = False, warmup: int = 2,
                             dtype: str = "float32", attention_impl: str | None = None) -> float:
  """Steady-state images/s of train.make_train_step for ViT-`variant` at `image_size`."""
  c = train_config(variant, image_size, batch, dtype=dtype, attention_impl=attention_impl)
  _, step, state, encoder, batch_arrays = prepare_train_step(c, cache_features)
  state, _ = run_steps(step, state, encoder, batch_arrays, warmup)
  _, seconds = run_steps(step, state, encoder, batch_arrays, steps)
  return batch * steps / seconds


def _pair_rows(variant, size, batch, cached, args):
  """Alternating timed rounds of our step (this process) and the official PyTorch step (a
  worker process; the official code has no feature cache, so it is our cached step's
  reference too), both built and warmed up first -> {"jax": [images/s per round], "torch",
  "torch_allocator"}."""
  c = train_config(variant, size, batch)
  _, step, state, encoder, arrays = prepare_train_step(c, cached)
  state, _ = run_steps(step, state, encoder, arrays, args.warmup)
  out = {"jax": [], "torch": [], "torch_allocator": None}
  with contextlib.ExitStack() as stack:
    torch_side = None
    if not args.no_torch:
      torch_side = stack.enter_context(worker_lib.Worker(
          "train", variant, size, batch, warmup=args.warmup,
          allocator=args.torch_allocator))
      out["torch_allocator"] = torch_side.allocator
    for _ in range(args.pairs):
      state, seconds = run_steps(step, state, encoder, arrays, args.steps)
      out["jax"].append(batch * args.steps / seconds)
      if torch_side is not None:
        out["torch"].append(batch * args.steps / torch_side.seconds(args.steps))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="small:224:8,base:392:4",
                 help="comma-separated variant:image_size[:batch] (batch default: --batch)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="timed steps per round")
  p.add_argument("--pairs", type=int, default=2,
                 help="alternating rounds (ours, PyTorch); the medians are reported")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--cache", default="off,on", help="feature cache settings to time: off,on")
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
  p.add_argument("--torch-allocator", default=worker_lib.SAME,
                 choices=[worker_lib.SAME, worker_lib.SYSTEM],
                 help="PyTorch's malloc: ours (same) or the system's")
  p.add_argument("--json", help="also write the table to this file")
  args = p.parse_args(argv)

  rows, printed_torch_allocator = [], False
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, host: "
        f"{platform.machine()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}),"
        f" {args.steps} timed steps x {args.pairs} alternating rounds, float32; jax under "
        f"{allocator.describe()}", flush=True)
  print("| config | batch | cache | jax img/s | torch img/s | jax/torch | rounds jax / torch |")
  print("|---|---:|---|---:|---:|---:|---|")
  for item in args.configs.split(","):
    variant, size, *rest = item.split(":")
    batch = int(rest[0]) if rest else args.batch
    for cache in args.cache.split(","):
      on = cache == "on"
      r = _pair_rows(variant, int(size), batch, on, args)
      ours = statistics.median(r["jax"])
      theirs = statistics.median(r["torch"]) if r["torch"] else float("nan")
      row = {"variant": variant, "image_size": int(size), "cache_features": on,
             "batch": batch, "jax_images_per_sec": ours, "torch_images_per_sec": theirs,
             "ratio": ours / theirs if theirs == theirs else None, "rounds": r}
      rows.append(row)
      if r["torch_allocator"] and not printed_torch_allocator:
        print(f"(torch worker under {r['torch_allocator']})", flush=True)
        printed_torch_allocator = True
      ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
      rounds = (", ".join(f"{v:.2f}" for v in r["jax"]) + " / "
                + ", ".join(f"{v:.2f}" for v in r["torch"]))
      print(f"| {variant}/{size} | {batch} | {cache} | {ours:.2f} | {theirs:.2f} | {ratio} | "
            f"{rounds} |", flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                           "jax_allocator": allocator.describe(),
                                           "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
