"""Steady-state CPU throughput of the PyTorch INP-Former reference (the torch side of the
side-by-side benchmark; benchmarks/train_step.py adds the JAX side and prints ratios).

  python -m benchmarks.torch_reference.bench --variant small --image-size 224 --batch 4 --steps 5

Both functions build a randomly initialised model (throughput does not depend on the weight
values), run `warmup` untimed iterations, then time `steps` iterations and return
batch * steps / (their total wall time). torch gets one intra-op thread per available core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch

from tests.torch_reference import inpformer as R


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def setup_torch(num_threads: int | None = None) -> int:
  """One intra-op thread per core; flush denormals, as XLA:CPU does by default (tiny Adam
  second moments would otherwise hit the slow denormal path)."""
  n = num_threads or available_cores()
  torch.set_num_threads(n)
  torch.set_flush_denormal(True)
  return n


def time_calls(fn, warmup: int, steps: int) -> list[float]:
  """Wall seconds of `steps` calls of fn() after `warmup` untimed ones."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _images(batch: int, image_size: int, seed: int) -> torch.Tensor:
  g = torch.Generator().manual_seed(seed)
  return torch.randn(batch, 3, image_size, image_size, generator=g)


def train_step_times(variant: Any, image_size: int, batch: int, steps: int, *, bf16: bool = False,
                     cache_features: bool = False, warmup: int = 2, attn_impl: str = "official",
                     num_threads: int | None = None, seed: int = 0) -> list[float]:
  """Seconds per official training iteration (forward, loss, backward, clip, StableAdamW,
  scheduler). cache_features: the frozen encoder runs once, outside the timing, and every
  step starts from its stored outputs (what a trainer with an encoder-feature cache does).
  bf16: the encoder runs under CPU autocast(bfloat16); the trainable part stays float32."""
  setup_torch(num_threads)
  torch.manual_seed(seed)
  model = R.build_inpformer(variant, image_size=image_size, attn_impl=attn_impl)
  model.encoder_bf16 = bf16
  optimizer, scheduler = R.build_optimizer(model, total_iters=1_000_000)
  images = _images(batch, image_size, seed)
  if cache_features:
    with torch.no_grad():
      features = model.encode(images)
    step = lambda: R.train_step(model, optimizer, scheduler, features=features)  # noqa: E731
  else:
    step = lambda: R.train_step(model, optimizer, scheduler, images)  # noqa: E731
  return time_calls(step, warmup, steps)


def infer_step_times(variant: Any, image_size: int, batch: int, steps: int, *, bf16: bool = False,
                     warmup: int = 2, attn_impl: str = "official", num_threads: int | None = None,
                     seed: int = 0) -> list[float]:
  """Seconds per inference batch: forward, maps, 256 resize, gaussian, top-1% score."""
  setup_torch(num_threads)
  torch.manual_seed(seed)
  model = R.build_inpformer(variant, image_size=image_size, attn_impl=attn_impl)
  images = _images(batch, image_size, seed)
  return time_calls(lambda: R.infer(model, images, bf16=bf16), warmup, steps)


def torch_train_images_per_sec(variant: Any, image_size: int, batch: int, steps: int,
                               bf16: bool = False, cache_features: bool = False,
                               **kw) -> float:
  """Training images/s at steady state (warm-up excluded). kw: warmup, attn_impl,
  num_threads, seed (see train_step_times)."""
  times = train_step_times(variant, image_size, batch, steps, bf16=bf16,
                           cache_features=cache_features, **kw)
  return batch * len(times) / sum(times)


def torch_infer_images_per_sec(variant: Any, image_size: int, batch: int, steps: int,
                               bf16: bool = False, **kw) -> float:
  """Inference images/s at steady state (warm-up excluded)."""
  times = infer_step_times(variant, image_size, batch, steps, bf16=bf16, **kw)
  return batch * len(times) / sum(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--variant", default="small", choices=sorted(R.VARIANTS))
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--mode", default="both", choices=["train", "infer", "both"])
  ap.add_argument("--bf16", action="store_true", help="encoder under CPU autocast(bfloat16)")
  ap.add_argument("--cache-features", action="store_true", help="train from cached encoder outputs")
  ap.add_argument("--attn-impl", default="official", choices=["official", "sdpa"])
  ap.add_argument("--threads", type=int, default=None, help="default: all available cores")
  a = ap.parse_args(argv)
  common = dict(warmup=a.warmup, attn_impl=a.attn_impl, num_threads=a.threads)
  rows = []
  for mode in (["train", "infer"] if a.mode == "both" else [a.mode]):
    if mode == "train":
      times = train_step_times(a.variant, a.image_size, a.batch, a.steps, bf16=a.bf16,
                               cache_features=a.cache_features, **common)
    else:
      times = infer_step_times(a.variant, a.image_size, a.batch, a.steps, bf16=a.bf16, **common)
    rows.append(dict(
        framework="torch", mode=mode, variant=a.variant, image_size=a.image_size, batch=a.batch,
        steps=len(times), warmup=a.warmup, bf16=a.bf16,
        cache_features=a.cache_features if mode == "train" else None, attn_impl=a.attn_impl,
        threads=torch.get_num_threads(), cores=available_cores(), cpu=cpu_name(),
        torch=torch.__version__,
        images_per_sec=round(a.batch * len(times) / sum(times), 3),
        step_s_median=round(sorted(times)[len(times) // 2], 4),
        step_s_min=round(min(times), 4)))
    print(json.dumps(rows[-1]), flush=True)
  return rows


if __name__ == "__main__":
  main()
