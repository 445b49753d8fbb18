r"""Inference speed: images/s and latency, live vs jax.export, float32 vs bfloat16, vs PyTorch.

  python benchmarks/inference.py --variant base --image-size 392 --batches 1,32   # accelerator
  python benchmarks/inference.py --variant small --image-size 224 --batches 1,4 --steps 5  # CPU

What is timed is the whole preprocessing-free inference: encoder, INP extraction, decoder,
anomaly map (cosine distances, upsampling, 256 resize, Gaussian) and the top-1% score, for a
batch already in memory (host -> device copy included for JAX, as a server would do). The
weights are random (speed does not depend on them). "exported" is the same function through
`jax.export` (`inpformer_jax.deploy.export`: serialize -> deserialize -> call). PyTorch runs
the official model code (tests/torch_reference, through benchmarks/torch_reference) on the CPU
in the same process; bfloat16 there is CPU autocast of the encoder (the official code has no
bf16 inference), here config.model.dtype=bfloat16.
Latency = median seconds per batch; images/s = batch * steps / total time (warm-up excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from inpformer_jax import anomaly_map  # noqa: E402
from inpformer_jax import loading  # noqa: E402
from inpformer_jax.data import preprocess  # noqa: E402
from inpformer_jax.deploy import export as export_lib  # noqa: E402
from inpformer_jax.models import factory  # noqa: E402


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


def jax_times(model, params, image_size, batch, steps, warmup, exported: bool) -> list[float]:
  # What predict / export serve: `loading.load` gives this for a checkpoint.
  loaded = loading.Loaded(model, params, preprocess.Preprocessing(image_size, image_size),
                          "reconstruction", 0.01, None,
                          {"kind": "random", "path": "", "step": None, "checkpoint_id": "",
                           "calibration_path": ""})
  if exported:
    exp = export_lib.export_model(loaded, platforms=(jax.default_backend(),))
    exp = jax.export.deserialize(exp.serialize())
    call = jax.jit(exp.call)
  else:
    call = anomaly_map.jit_maps_and_scores(model, **loaded.scoring)  # the one jitted forward
  x = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3))
  x = x.astype(np.float32)
  from benchmarks.torch_reference.bench import time_calls  # pylint: disable=g-import-not-at-top
  return time_calls(lambda: jax.block_until_ready(call(params, x)), warmup, steps)


def torch_times(variant, image_size, batch, steps, warmup, bf16, threads) -> list[float]:
  from benchmarks.torch_reference import bench  # pylint: disable=g-import-not-at-top
  v = bench.TINY if variant == "tiny" else variant
  return bench.infer_step_times(v, image_size, batch, steps, bf16=bf16, warmup=warmup,
                                num_threads=threads)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", default="small", help="tiny | small | base | large")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--no-torch", action="store_true")
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
        f"{a.steps} steps after {a.warmup} warm-up; torch threads: {a.torch_threads or 'all'}")
  rows = []
  for dtype in dtypes:
    model, params = build(a.variant, a.image_size, dtype)
    for b in batches:
      impls = [("jax live", False)] + ([] if a.no_export else [("jax exported", True)])
      for name, exported in impls:
        t = jax_times(model, params, a.image_size, b, a.steps, a.warmup, exported)
        rows.append((name, dtype, b, t))
        print(f"  {name:13s} {dtype:9s} b={b:<3d} {b * len(t) / sum(t):9.2f} img/s", flush=True)
      if not a.no_torch:
        t = torch_times(a.variant, a.image_size, b, a.steps, a.warmup, dtype == "bfloat16",
                        a.torch_threads)
        rows.append(("torch (CPU)", dtype, b, t))
        print(f"  {'torch (CPU)':13s} {dtype:9s} b={b:<3d} {b * len(t) / sum(t):9.2f} img/s",
              flush=True)
  torch_ips = {(d, b): b * len(t) / sum(t) for n, d, b, t in rows if n.startswith("torch")}
  print()
  print("| impl | dtype | batch | images/s | latency p50 (ms) | vs torch |")
  print("|---|---|---:|---:|---:|---:|")
  for name, dtype, b, t in rows:
    ips = b * len(t) / sum(t)
    ref = torch_ips.get((dtype, b))
    ratio = f"{ips / ref:.2f}x" if ref and not name.startswith("torch") else ""
    print(f"| {name} | {dtype} | {b} | {ips:.2f} | {1e3 * statistics.median(t):.1f} | "
          f"{ratio} |")


if __name__ == "__main__":
  main()
