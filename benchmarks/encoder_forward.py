r"""Images/s of the Flax DINOv2 encoder vs the same PyTorch model, in one run.

  python benchmarks/encoder_forward.py --batch 4 --iters 5 --size 392 --variant base

Random weights (speed does not depend on them). Flax runs float32 and bfloat16 compute;
torch runs float32 (the DINOv2 of `tests/torch_reference/inpformer.py`, explicit-matmul
attention as in DINOv2 without xFormers, and torch's fused SDPA as timm uses it). Flax runs its default
attention (jax.nn.dot_product_attention) and `explicit` (DINOv2's formulation). Both run the blocks INP-Former needs
(0..9 of 12) unless --layers says otherwise. On the CPU the XLA flags from
`inpformer_jax.xla_flags.configure_cpu_flags` are set first unless XLA_FLAGS is already set
(pass --no-xla-defaults to measure XLA's own defaults).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--size", type=int, default=392)
  p.add_argument("--variant", default="base", choices=["small", "base", "large"])
  p.add_argument("--registers", type=int, default=4)
  p.add_argument("--layers", default="2-9", help="blocks to return, e.g. 2-9 or 11")
  p.add_argument("--dtypes", default="float32,bfloat16", help="Flax compute dtypes")
  p.add_argument("--attention", default="default,explicit",
                 help="Flax attention paths to time, comma-separated: default "
                      "(jax.nn.dot_product_attention, JAX picks), xla, cudnn, explicit")
  p.add_argument("--torch", default="explicit,sdpa",
                 help="torch attention variants to time: explicit, sdpa, or '' for none")
  p.add_argument("--no-xla-defaults", action="store_true",
                 help="do not set this project's default XLA CPU flags")
  return p.parse_args()


def _layers(spec: str):
  if "-" in spec:
    a, b = spec.split("-")
    return tuple(range(int(a), int(b) + 1))
  return tuple(int(s) for s in spec.split(","))


def main():
  args = _parse()
  if not args.no_xla_defaults:
    from inpformer_jax.xla_flags import configure_cpu_flags  # pylint: disable=g-import-not-at-top
    configure_cpu_flags()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from inpformer_jax.models import vit  # pylint: disable=g-import-not-at-top
  from inpformer_jax.conversion import dinov2  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import dinov2 as ref  # pylint: disable=g-import-not-at-top

  width, depth, heads = vit.VARIANTS[args.variant]
  layers = _layers(args.layers)
  b, s = args.batch, args.size
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"torch threads {torch.get_num_threads()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"ViT-{args.variant[0].upper()}/14 reg{args.registers} at {s}x{s}, batch {b}, "
        f"blocks {layers[0]}..{max(layers)}, median of {args.iters} interleaved rounds after {args.warmup} warm-up")

  torch.manual_seed(0)
  tmodel = ref.randomize_(ref.DinoVisionTransformer(
      embed_dim=width, depth=depth, num_heads=heads,
      num_register_tokens=args.registers)).eval()
  params, arch = dinov2.convert(ref.state_dict_numpy(tmodel))
  params = jax.device_put(params)
  x = np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32)
  xj = jax.device_put(jnp.asarray(x.transpose(0, 2, 3, 1)))
  xt = torch.from_numpy(x)

  # Every runner is warmed up (and compiled) first, then all are timed in interleaved rounds:
  # on a shared machine the load drifts, and timing one after the other would bias the ratio.
  runners = {}
  for variant in [v for v in args.torch.split(",") if v]:
    def run_torch(impl="sdpa" if variant == "sdpa" else "official"):
      for blk in tmodel.blocks:
        blk.attn.attn_impl = impl
      with torch.inference_mode():
        return tmodel(xt, layers)
    runners[f"torch float32 ({variant})"] = run_torch

  for attn in [a for a in args.attention.split(",") if a]:
    for name in [d for d in args.dtypes.split(",") if d]:
      model = vit.DinoViT(**arch, dtype=jnp.dtype(name),
                          attention_impl=None if attn == "default" else attn)
      fwd = jax.jit(lambda p, im, m=model: m.apply({"params": p}, im, layers=layers))
      key = f"flax {name} ({attn})"
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(params, xj))
      print(f"  ({key}: first call incl. compile {time.perf_counter() - t0:.1f} s)")
      runners[key] = lambda f=fwd: jax.block_until_ready(f(params, xj))

  for fn in runners.values():
    for _ in range(args.warmup):
      fn()
  times = {k: [] for k in runners}
  for _ in range(args.iters):
    for key, fn in runners.items():
      t0 = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t0)
  results = {k: b / sorted(v)[len(v) // 2] for k, v in times.items()}  # median

  base_key = next((k for k in results if k.startswith("torch")), None)
  for key, ips in results.items():
    ratio = f"  {ips / results[base_key]:.2f}x {base_key}" if base_key and key != base_key else ""
    print(f"{key:32s} {ips:8.2f} images/s{ratio}")


if __name__ == "__main__":
  main()
