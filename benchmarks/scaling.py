r"""Training throughput and communication against the number of devices (weak scaling).

  python benchmarks/scaling.py                         # CPU: 1, 2, 4, 8 simulated devices
  python benchmarks/scaling.py --platform gpu --model small --image 224 \
      --per-device-batch 16 --dtype bfloat16 --attention cudnn --cache off,on \
      --fsdp 1,2 --json scaling_gpu.json               # a GPU machine (as many GPUs as it has)

Each device count runs in its own subprocess (CPU: `--xla_force_host_platform_device_count=N`;
GPU: `CUDA_VISIBLE_DEVICES` = the first N GPUs), with the global batch = per-device batch x N,
so perfect scaling keeps the time per step constant and multiplies images/s by N. On the CPU
the simulated devices share the same cores: the figures show the program's overhead and
communication volume, not a speed-up.

Per row: time per step (median of the timed steps), images/s, and the communication of one
step read from the compiled program (`jitted.lower(...).compile().as_text()`): the count and
per-device operand bytes of every all-reduce / reduce-scatter / all-gather
(`inpformer_jax.sharding.collective_bytes`). Data parallelism all-reduces the trainable
gradients (plus a few scalars); FSDP (`--fsdp K`) reduce-scatters them and all-gathers the
parameter shards instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENCODERS = {"small": "dinov2reg_vit_small_14", "base": "dinov2reg_vit_base_14",
            "large": "dinov2reg_vit_large_14"}


def worker(args) -> dict:
  """One device count (this process sees exactly those devices): -> one row per setting."""
  from inpformer_jax import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.configure_cpu_flags()  # keeps an XLA_FLAGS set by the parent
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from inpformer_jax import feature_cache, sharding, train  # pylint: disable=g-import-not-at-top
  from inpformer_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from inpformer_jax.models.inp_former import INPFormer  # pylint: disable=g-import-not-at-top

  n = jax.device_count()
  rows = []
  for fsdp in [int(f) for f in args.fsdp.split(",")]:
    if n % fsdp:
      continue
    c = common.base_config()
    if args.model == "tiny":  # the runlocal ViT, but wider: a CPU-sized step
      c.model.encoder, c.model.width, c.model.depth = "custom", 64, 10
      c.model.num_heads, c.model.num_registers = 2, 4
    else:
      c.model.encoder = ENCODERS[args.model]
    c.model.encoder_weights = "random"
    c.model.dtype = args.dtype
    c.model.attention_impl = None if args.attention == "xla" else args.attention
    c.data.crop = args.image
    c.train.batch_size = args.per_device_batch * n
    c.mesh.fsdp = fsdp
    if fsdp > 1:  # every leaf of at least --fsdp-min-size elements sharded
      c.mesh.param_rules = ((r".*", f"auto:{args.fsdp_min_size}"),)
    r = train.Recipe.create(c, total_steps=1_000_000)
    mesh = r.mesh
    batch = c.train.batch_size
    with jax.set_mesh(mesh):
      encoder = jax.device_put(r.encoder, r.encoder_sh)
      state = r.init_state(r.trainable, c.seed)
      images = np.random.default_rng(0).standard_normal(
          (batch, args.image, args.image, 3)).astype(np.float32)
      for cache in args.cache.split(","):
        cached = cache == "on"
        if cached:  # the encoder's features, as config.train.cache_features feeds them
          enc = jax.jit(lambda p, x: r.model.apply({"params": p}, x, method=INPFormer.encode))
          feats = enc(params_lib.merge(encoder, r.trainable),
                      jax.device_put(images, sharding.batch_sharding(mesh)))
          host = dict(zip(feature_cache.keys(len(feats["en_tokens"])),
                          map(np.asarray, [*feats["en_tokens"], feats["fused"]])))
          data = sharding.global_batch(host, mesh)
        else:
          data = sharding.global_batch({"image": images}, mesh)
        step = r.train_step(c.loss, cached=cached)
        t0 = time.perf_counter()
        compiled = step.lower(state, encoder, data).compile()
        compile_s = time.perf_counter() - t0
        comm = sharding.collective_bytes(compiled.as_text())
        for _ in range(args.warmup):
          state, metrics = step(state, encoder, data)
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(args.steps):
          t0 = time.perf_counter()
          state, metrics = step(state, encoder, data)
          jax.block_until_ready((state, metrics))
          times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append({
            "devices": n, "data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"],
            "cache": cache, "global_batch": batch, "sec_per_step": t,
            "images_per_sec": batch / t, "compile_s": compile_s,
            "loss": float(metrics["loss"]),
            "all_reduce_bytes": comm["all-reduce"]["bytes"],
            "reduce_scatter_bytes": comm["reduce-scatter"]["bytes"],
            "all_gather_bytes": comm["all-gather"]["bytes"],
            "collective_bytes": sum(v["bytes"] for v in comm.values()),
            "collectives": {k: v["count"] for k, v in comm.items() if v["count"]},
            "trainable_param_bytes": int(sum(x.size * x.dtype.itemsize for x in
                                             jax.tree.leaves(r.trainable))),
            "device_kind": jax.devices()[0].device_kind})
  return {"rows": rows}


def run_count(n: int, args) -> list[dict]:
  env = dict(os.environ)
  if args.platform == "cpu":
    flags = env.get("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(n)))
  cmd = [sys.executable, __file__, "--worker", *sys.argv[1:]]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
  if r.returncode:
    print(f"{n} devices failed:\n{r.stderr[-3000:]}", file=sys.stderr)
    return []
  return json.loads(r.stdout.strip().splitlines()[-1])["rows"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--devices", default="1,2,4,8", help="device counts, each in a subprocess")
  p.add_argument("--model", default="tiny", choices=("tiny", *ENCODERS))
  p.add_argument("--image", type=int, default=56, help="input side (a multiple of the patch)")
  p.add_argument("--per-device-batch", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default="xla", choices=("xla", "cudnn"))
  p.add_argument("--cache", default="off,on", help="feature cache settings: off,on")
  p.add_argument("--fsdp", default="1,2", help="fsdp axis sizes to time (those dividing N)")
  p.add_argument("--fsdp-min-size", type=int, default=1024,
                 help="FSDP shards leaves of at least this many elements (the trainer's "
                      "default is 65536; the tiny CPU model needs a lower one)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=int, default=900, help="seconds per device count")
  p.add_argument("--json", help="write the figures to this file")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return None

  rows = []
  for n in [int(x) for x in args.devices.split(",")]:
    t0 = time.time()
    got = run_count(n, args)
    rows += got
    print(f"  {n} device(s): {len(got)} rows in {time.time() - t0:.0f}s", flush=True)
  base = {(r["fsdp"], r["cache"]): r for r in rows if r["devices"] == 1}
  print(f"\n{args.platform}: model {args.model}, image {args.image}, {args.dtype}, attention "
        f"{args.attention}, {args.per_device_batch} images per device, median of "
        f"{args.steps} steps; host {platform.machine()}, {os.cpu_count()} cores")
  print(f"{'dev':>4} {'data':>4} {'fsdp':>4} {'cache':>5} {'batch':>5} {'ms/step':>9} "
        f"{'img/s':>8} {'speedup':>7} {'all-red MB':>10} {'red-sc MB':>9} {'all-g MB':>8}")
  for r in rows:
    b = base.get((1, r["cache"]))
    speed = r["images_per_sec"] / b["images_per_sec"] if b else float("nan")
    print(f"{r['devices']:>4} {r['data']:>4} {r['fsdp']:>4} {r['cache']:>5} "
          f"{r['global_batch']:>5} {1e3 * r['sec_per_step']:>9.1f} "
          f"{r['images_per_sec']:>8.1f} {speed:>7.2f} {r['all_reduce_bytes'] / 1e6:>10.3f} "
          f"{r['reduce_scatter_bytes'] / 1e6:>9.3f} {r['all_gather_bytes'] / 1e6:>8.3f}")
  if rows:
    print(f"trainable parameters: {rows[0]['trainable_param_bytes'] / 1e6:.3f} MB float32 "
          f"(what data parallelism must all-reduce per step)")
  out = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
  return out


if __name__ == "__main__":
  main()
