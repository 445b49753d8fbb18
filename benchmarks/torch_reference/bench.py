"""Steady-state throughput of the PyTorch INP-Former reference (the torch side of the
side-by-side benchmarks; benchmarks/train_step.py and benchmarks/gpu_suite.py add the JAX side
and print ratios).

  python -m benchmarks.torch_reference.bench --variant small --image-size 224 --batch 4 --steps 5
  python -m benchmarks.torch_reference.bench --device cuda --amp --variant base --image-size 392

Both functions build a randomly initialised model (throughput does not depend on the weight
values) on `device`, run `warmup` untimed iterations, then time `steps` iterations (each ended
by torch.cuda.synchronize on a GPU) and return batch * steps / (their total wall time). torch
gets one intra-op thread per available core. Two bfloat16 modes: `bf16`, the encoder under CPU
autocast (CPU only); `amp`, the whole forward and loss under torch.autocast(device, bfloat16),
as mixed-precision training does (backward, clipping and StableAdamW outside it, float32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from typing import Any

import torch
from torch import nn

from tests.torch_reference import inpformer as R

# The tiny model of the CPU smoke runs (benchmarks/inference.py --variant tiny, gpu_suite's
# dry run): the ViT of configs/common.apply_runlocal.
TINY = {"embed_dim": 32, "num_heads": 2, "depth": 10}


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


def _images(batch: int, image_size: int, seed: int, device: torch.device) -> torch.Tensor:
  g = torch.Generator().manual_seed(seed)
  return torch.randn(batch, 3, image_size, image_size, generator=g).to(device)


def _model(variant, image_size, attn_impl, bf16: bool, device: torch.device):
  if bf16 and device.type != "cpu":
    raise ValueError(f"bf16 is the encoder's CPU autocast; on {device} use amp=True")
  model = R.build_inpformer(variant, image_size=image_size, attn_impl=attn_impl).to(device)
  model.encoder_bf16 = bf16
  return model


def _synced(fn, device: torch.device):
  """fn, then wait for the GPU: the timing covers the device work, not only its launch."""
  if device.type != "cuda":
    return fn
  return lambda: (fn(), torch.cuda.synchronize(device))


def _amp(device: torch.device):
  return torch.autocast(device.type, dtype=torch.bfloat16)


def _amp_train_step(model, optimizer, scheduler, images=None, *, features=None):
  """R.train_step with its forward and loss under autocast(bfloat16); the rest (backward,
  clip, StableAdamW, scheduler) as there, outside autocast as PyTorch's AMP recipe says."""
  model.train()
  with _amp(next(model.parameters()).device):
    loss = R.training_loss(model, images, features=features)
  optimizer.zero_grad()
  loss.backward()
  nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                           max_norm=R.CLIP_NORM)
  optimizer.step()
  if scheduler is not None:
    scheduler.step()
  return loss


def train_step_fn(variant: Any, image_size: int, batch: int, *, bf16: bool = False,
                  cache_features: bool = False, attn_impl: str = "official",
                  num_threads: int | None = None, seed: int = 0, device: str = "cpu",
                  amp: bool = False):
  """-> a callable running one official training iteration (forward, loss, backward, clip,
  StableAdamW, scheduler) on one fixed batch, synchronised with the device.

  cache_features: the frozen encoder runs once, here, and every step starts from its stored
  outputs (what a trainer with an encoder-feature cache does). bf16: the encoder runs under
  CPU autocast(bfloat16); the trainable part stays float32. amp: forward and loss under
  autocast(device, bfloat16) (`_amp_train_step`)."""
  setup_torch(num_threads)
  torch.manual_seed(seed)
  dev = torch.device(device)
  model = _model(variant, image_size, attn_impl, bf16, dev)
  optimizer, scheduler = R.build_optimizer(model, total_iters=1_000_000)
  images = _images(batch, image_size, seed, dev)
  train_step = _amp_train_step if amp else R.train_step
  if cache_features:
    with torch.no_grad(), _amp(dev) if amp else contextlib.nullcontext():
      features = model.encode(images)
    step = lambda: train_step(model, optimizer, scheduler, features=features)
  else:
    step = lambda: train_step(model, optimizer, scheduler, images)
  return _synced(step, dev)


def train_step_times(variant: Any, image_size: int, batch: int, steps: int, *,
                     warmup: int = 2, **kw) -> list[float]:
  """Seconds per official training iteration, `steps` of them after `warmup`; kw: those of
  `train_step_fn`."""
  return time_calls(train_step_fn(variant, image_size, batch, **kw), warmup, steps)


def infer_fn(variant: Any, image_size: int, batch: int, *, bf16: bool = False,
             attn_impl: str = "official", num_threads: int | None = None, seed: int = 0,
             device: str = "cpu", amp: bool = False):
  """-> a callable running one inference batch (forward, maps, 256 resize, gaussian, top-1%
  score) on one fixed batch, synchronised with the device. amp: all of it under
  autocast(device, bfloat16)."""
  setup_torch(num_threads)
  torch.manual_seed(seed)
  dev = torch.device(device)
  model = _model(variant, image_size, attn_impl, bf16, dev)
  images = _images(batch, image_size, seed, dev)

  def call():
    with _amp(dev) if amp else contextlib.nullcontext():
      return R.infer(model, images, bf16=bf16)

  return _synced(call, dev)


def infer_step_times(variant: Any, image_size: int, batch: int, steps: int, *,
                     warmup: int = 2, **kw) -> list[float]:
  """Seconds per inference batch, `steps` of them after `warmup`; kw: those of `infer_fn`."""
  return time_calls(infer_fn(variant, image_size, batch, **kw), warmup, steps)


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
  ap.add_argument("--variant", default="small", choices=[*sorted(R.VARIANTS), "tiny"])
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--mode", default="both", choices=["train", "infer", "both"])
  ap.add_argument("--bf16", action="store_true", help="encoder under CPU autocast(bfloat16)")
  ap.add_argument("--cache-features", action="store_true", help="train from cached encoder outputs")
  ap.add_argument("--attn-impl", default="official", choices=["official", "sdpa"])
  ap.add_argument("--threads", type=int, default=None, help="default: all available cores")
  ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
  ap.add_argument("--amp", action="store_true",
                  help="forward and loss (inference: all of it) under autocast(device, bfloat16)")
  a = ap.parse_args(argv)
  variant = TINY if a.variant == "tiny" else a.variant
  common = {"warmup": a.warmup, "attn_impl": a.attn_impl, "num_threads": a.threads,
            "device": a.device, "amp": a.amp}
  cuda = torch.device(a.device).type == "cuda"
  rows = []
  for mode in (["train", "infer"] if a.mode == "both" else [a.mode]):
    if cuda:
      torch.cuda.reset_peak_memory_stats(a.device)
    if mode == "train":
      times = train_step_times(variant, a.image_size, a.batch, a.steps, bf16=a.bf16,
                               cache_features=a.cache_features, **common)
    else:
      times = infer_step_times(variant, a.image_size, a.batch, a.steps, bf16=a.bf16, **common)
    rows.append(dict(
        framework="torch", mode=mode, variant=a.variant, image_size=a.image_size, batch=a.batch,
        steps=len(times), warmup=a.warmup, bf16=a.bf16, amp=a.amp, device=a.device,
        gpu=torch.cuda.get_device_name(a.device) if cuda else None,
        peak_bytes=torch.cuda.max_memory_allocated(a.device) if cuda else None,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32 if cuda else None,
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
