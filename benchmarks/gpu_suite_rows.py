r"""One JAX measurement of benchmarks/gpu_suite.py, in a process of its own, printed as JSON.

  python benchmarks/gpu_suite_rows.py train --variant base --image_size 392 --batch 16

gpu_suite.py runs each row in a fresh process so that its peak device memory is its own and a
crash or a timeout loses only that row; run by hand it prints the row's JSON line. Rows:
  train, train_cached: the training step (benchmarks/train_step.py), compiled ahead of time so
    the compile is timed apart and the compiled program's cost analysis gives its FLOPs.
  infer: the jitted inference (benchmarks/inference.py: maps and scores, host->device copy in).
  cache_build: feature_cache.build_feature_cache over random uint8 images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks import inference, train_step  # train_step sets the XLA CPU flags
from configs import common
from inpformer_jax import feature_cache, train
from inpformer_jax import params as params_lib
from inpformer_jax.reproduce import plan

ROWS = ("train", "train_cached", "infer", "cache_build")
# The attention implementation names of config.model.attention_impl; 'auto' = None (XLA).
ATTENTION = ("auto", "xla", "cudnn", "explicit")


def peak_device_bytes() -> int | None:
  """Peak bytes in use on device 0 since the process started (None where not reported)."""
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def flops(stage) -> float | None:
  """'flops' of a Lowered or Compiled cost analysis (a dict, or a list of one per program in
  older jax versions); None where the backend gives none."""
  try:
    cost = stage.cost_analysis()
  except NotImplementedError:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def recipe_steps() -> int:
  """Optimizer steps of the official MVTec multi-class recipe (45,200), as the planner counts."""
  return plan.steps_of(common.base_config(), plan.MVTEC_TRAIN)[0]


def train_row(a, cached: bool) -> dict:
  c = train_step.train_config(a.variant, a.image_size, a.batch, dtype=a.dtype,
                              attention_impl=a.attention_impl)
  r, step, state, encoder, batch = train_step.prepare_train_step(c, cached)
  lowered = step.lower(state, encoder, batch)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  state, _ = train_step.run_steps(compiled, state, encoder, batch, a.warmup)
  state, seconds = train_step.run_steps(compiled, state, encoder, batch, a.steps)
  flops_xla = flops(lowered)
  if a.attention_impl not in (None, "xla"):
    # XLA's cost analysis counts no FLOPs inside a cuDNN attention custom call: the same
    # step lowered (not compiled) with XLA attention gives what that call hides.
    model = r.model.clone(encoder=r.model.encoder.clone(attention_impl="xla"))
    twin = train.make_train_step(model, r.tx, r.schedule, c.loss, state_sh=r.state_sh,
                                 encoder_sh=r.encoder_sh, mesh=r.mesh, cached=cached)
    flops_xla = flops(twin.lower(state, encoder, batch))
  return {"step_s": seconds / a.steps, "images_per_sec": a.batch * a.steps / seconds,
          "compile_s": compile_s, "flops_compiled": flops(compiled),
          "flops_lowered": flops(lowered), "flops_lowered_xla_attention": flops_xla,
          "recipe_steps": recipe_steps(), "peak_bytes": peak_device_bytes()}


def infer_row(a) -> dict:
  model, params = inference.build(a.variant, a.image_size, a.dtype, a.attention_impl)
  times = inference.jax_times(model, params, a.image_size, a.infer_batch, a.infer_steps,
                              a.warmup, exported=False)
  return {"images_per_sec": a.infer_batch * len(times) / sum(times),
          "latency_s_median": statistics.median(times), "peak_bytes": peak_device_bytes()}


def cache_build_row(a) -> dict:
  """Images/s of build_feature_cache, from builds of two sizes, the faster of two of each
  (their difference leaves out the per-build work: tracing, the compile cache's load; the
  feature arrays' allocation and copy to the device stay in). A first, untimed build
  compiles the encoder into the persistent compilation cache (gpu_suite.py's, else a
  temporary one) that the timed builds load from: each build jits a fresh closure."""
  c = train_step.train_config(a.variant, a.image_size, a.batch, dtype=a.dtype,
                              attention_impl=a.attention_impl)
  r = train.Recipe.create(c, total_steps=1_000_000)
  params = jax.device_put(params_lib.merge(r.encoder, r.trainable))
  small, large = 2 * a.batch, max(a.cache_images, 4 * a.batch)
  images = np.random.default_rng(0).integers(0, 256, (large, c.data.resize, c.data.resize, 3),
                                             dtype=np.uint8)
  with tempfile.TemporaryDirectory() as tmp:
    if not jax.config.values["jax_compilation_cache_dir"]:
      jax.config.update("jax_compilation_cache_dir", tmp)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    def build(n: int) -> float:
      t0 = time.perf_counter()
      cache, _ = feature_cache.build_feature_cache(r.model, params, images[:n], c, r.mesh, tmp)
      jax.block_until_ready(cache)
      return time.perf_counter() - t0

    build(a.batch)
    t_small, t_large = min(build(small), build(small)), min(build(large), build(large))
  if t_large <= t_small:
    raise SystemExit(f"cache build: {large} images took no longer than {small} ({t_large:.2f} "
                     f"s vs {t_small:.2f} s): raise --cache_images")
  return {"images_per_sec": (large - small) / (t_large - t_small), "images": large,
          "build_s": t_large, "build_s_small": t_small, "peak_bytes": peak_device_bytes()}


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("row", choices=ROWS)
  ap.add_argument("--variant", default="base", help="tiny | small | base | large")
  ap.add_argument("--image_size", type=int, default=392)
  ap.add_argument("--batch", type=int, default=16, help="train and cache-build batch")
  ap.add_argument("--infer_batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=20, help="timed train steps")
  ap.add_argument("--infer_steps", type=int, default=10, help="timed inference batches")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--dtype", default="bfloat16", help="config.model.dtype")
  ap.add_argument("--attention", default="cudnn", choices=ATTENTION,
                  help="config.model.attention_impl of the encoder ('auto': None)")
  ap.add_argument("--cache_images", type=int, default=512, help="images of the timed build")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  a.attention_impl = None if a.attention == "auto" else a.attention
  if a.row == "infer":
    out = infer_row(a)
  elif a.row == "cache_build":
    out = cache_build_row(a)
  else:
    out = train_row(a, cached=a.row == "train_cached")
  dev = jax.devices()[0]
  out.update(row=a.row, attention=a.attention, device=f"{dev.platform} {dev.device_kind}",
             jax=jax.__version__)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
