r"""Inference speed: images/s and latency, live vs jax.export, float32 vs bfloat16, vs PyTorch.

  python benchmarks/inference.py --variant base --image-size 392 --batches 1,32   # accelerator
  python benchmarks/inference.py --variant small --image-size 224 --batches 8 --steps 3  # CPU

What is timed is the whole preprocessing-free inference: encoder, INP extraction, decoder,
anomaly map (cosine distances, upsampling, 256 resize, Gaussian) and the top-1% score, for a
batch already in memory (host -> device copy included for JAX, as a server would do). The
weights are random (speed does not depend on them). "exported" is the same function through
`jax.export` (`inpformer_jax.deploy.export`: serialize -> deserialize -> call). PyTorch runs
the official model code (tests/torch_reference, through benchmarks/torch_reference) in a
spawned worker process (`benchmarks/torch_reference/worker.py`), one thread per core; each
side is built and warmed up, then `--pairs` rounds alternate `--steps` calls of each, so a
change of machine load hits all of them. bfloat16 there is CPU autocast of the encoder (the
official code has no bf16 inference), here config.model.dtype=bfloat16. Ours runs under
tcmalloc when it is installed (inpformer_jax/allocator.py), PyTorch under the same allocator
or (`--torch-allocator system`) the system malloc.
images/s = batch * steps / time of a round, median over the rounds; latency = that round's
seconds per batch, median.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inpformer_jax import allocator  # noqa: E402
from inpformer_jax import xla_flags  # noqa: E402

if __name__ == "__main__":
  allocator.use_tcmalloc()  # as the command lines run; before JAX is imported
xla_flags.configure_cpu_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from inpformer_jax import anomaly_map  # noqa: E402
from inpformer_jax import loading  # noqa: E402
from inpformer_jax.data import preprocess  # noqa: E402
from inpformer_jax.deploy import export as export_lib  # noqa: E402
from inpformer_jax.models import factory  # noqa: E402
from benchmarks.torch_reference import worker as worker_lib  # noqa: E402


def build(variant: str, image_size: int, dtype: str, attention_impl: str | None = None):
  """Model + random params (from eval_shape: no init compile). attention_impl: the encoder's
  (config.model.attention_impl: None = XLA, 'cudnn' = the fused GPU kernel)."""
  if variant == "tiny":
    cfg = ml_collections.ConfigDict(dict(encoder="custom", width=32, depth=10, num_heads=2,
                                         num_registers=4))
  else:
    cfg = ml_collections.ConfigDict(dict(encoder=f"dinov2reg_vit_{variant}_14"))
  cfg.dtype = dtype
  cfg.attention_impl = attention_impl
  model = factory.build_model(cfg)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  return model, jax.device_put(params)


def jax_call(model, params, image_size, exported: bool):
  """The jitted inference (what predict / export serve; `loading.load` gives this for a
  checkpoint), live or through jax.export."""
  loaded = loading.Loaded(model, params, preprocess.Preprocessing(image_size, image_size),
                          "reconstruction", 0.01, None,
                          {"kind": "random", "path": "", "step": None, "checkpoint_id": "",
                           "calibration_path": ""})
  if exported:
    exp = export_lib.export_model(loaded, platforms=(jax.default_backend(),))
    exp = jax.export.deserialize(exp.serialize())
    return jax.jit(exp.call)
  return anomaly_map.jit_maps_and_scores(model, **loaded.scoring)  # the one jitted forward


def jax_times(model, params, image_size, batch, steps, warmup, exported: bool) -> list[float]:
  """Seconds of each of `steps` calls on one random batch, after `warmup` (gpu_suite's rows)."""
  call = jax_call(model, params, image_size, exported)
  x = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3))
  x = x.astype(np.float32)
  seconds(lambda: jax.block_until_ready(call(params, x)), warmup)
  return [seconds(lambda: jax.block_until_ready(call(params, x)), 1) for _ in range(steps)]


def seconds(fn, n: int) -> float:
  t0 = time.perf_counter()
  for _ in range(n):
    fn()
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", default="small", help="tiny | small | base | large")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--steps", type=int, default=10, help="timed calls per round")
  ap.add_argument("--pairs", type=int, default=2, help="alternating rounds; medians reported")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--torch-allocator", default=worker_lib.SAME,
                  choices=[worker_lib.SAME, worker_lib.SYSTEM],
                  help="PyTorch's malloc: ours (same) or the system's")
  # On a loaded machine torch's OpenMP threads spin-wait on oversubscribed cores (ViT-S/224,
  # batch 1, load 10 on 2 cores: 0.53 s/batch with 1 thread, 4.7 s with 2): set this to the
  # cores that are really free.
  ap.add_argument("--torch-threads", type=int, default=None, help="default: all cores")
  ap.add_argument("--no-export", action="store_true")
  a = ap.parse_args(argv)
  batches = [int(b) for b in a.batches.split(",")]
  dtypes = a.dtypes.split(",")
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f}); ViT-{a.variant} at {a.image_size}px, "
        f"{a.pairs} rounds of {a.steps} calls after {a.warmup} warm-up; torch threads: "
        f"{a.torch_threads or 'all'}; jax under {allocator.describe()}", flush=True)
  rows = []
  for dtype in dtypes:
    model, params = build(a.variant, a.image_size, dtype)
    for b in batches:
      x = np.random.default_rng(0).standard_normal((b, a.image_size, a.image_size, 3))
      x = x.astype(np.float32)
      calls = {name: jax_call(model, params, a.image_size, exported)
               for name, exported in [("jax live", False)]
               + ([] if a.no_export else [("jax exported", True)])}
      once = {name: (lambda c=c: jax.block_until_ready(c(params, x))) for name, c in calls.items()}
      for fn in once.values():
        seconds(fn, a.warmup)
      # Each side's round: the seconds of a.steps calls.
      fns = {name: (lambda fn=fn: seconds(fn, a.steps)) for name, fn in once.items()}
      with contextlib.ExitStack() as stack:
        if not a.no_torch:
          w = stack.enter_context(worker_lib.Worker(
              "infer", a.variant, a.image_size, b, warmup=a.warmup, bf16=dtype == "bfloat16",
              num_threads=a.torch_threads, allocator=a.torch_allocator))
          fns["torch (CPU)"] = lambda w=w: w.seconds(a.steps)
          print(f"  (torch worker under {w.allocator})", flush=True)
        rounds = {name: [] for name in fns}
        for _ in range(a.pairs):
          for name, fn in fns.items():
            rounds[name].append(fn() / a.steps)
      for name, per_batch in rounds.items():
        rows.append((name, dtype, b, per_batch))
        print(f"  {name:13s} {dtype:9s} b={b:<3d} "
              f"{b / statistics.median(per_batch):9.2f} img/s", flush=True)
  torch_ips = {(d, b): b / statistics.median(t) for n, d, b, t in rows if n.startswith("torch")}
  print()
  print("| impl | dtype | batch | images/s | latency p50 (ms) | vs torch | rounds (img/s) |")
  print("|---|---|---:|---:|---:|---:|---|")
  for name, dtype, b, t in rows:
    ips = b / statistics.median(t)
    ref = torch_ips.get((dtype, b))
    ratio = f"{ips / ref:.2f}x" if ref and not name.startswith("torch") else ""
    print(f"| {name} | {dtype} | {b} | {ips:.2f} | {1e3 * statistics.median(t):.1f} | "
          f"{ratio} | {', '.join(f'{b / v:.2f}' for v in t)} |")


if __name__ == "__main__":
  main()
