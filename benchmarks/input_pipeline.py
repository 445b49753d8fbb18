"""Training input rate: images/s `pipeline.train_dataset` delivers at resize 448 -> crop 392,
next to what one GPU needs, and the host memory of the feature cache per process.

  python benchmarks/input_pipeline.py            # default
  python benchmarks/input_pipeline.py --workers 0,1    # a shorter run

The default run decodes about 12,300 images (4 sources x 3,072: see "images/s" below for why
the work does not shrink with --num_images); it took 18 min on the 2-core development machine
at load average 9-42 (docs/pipeline.md, "Measured input rates").

Full run, every option at its default:

  python benchmarks/input_pipeline.py --num_images 96 --size 512 --workers 0,1,2,4 \
      --batch 16 --outputs float32 --timed_batches 16 --cache_images 70000 \
      --cache_processes 1,2 --workdir /tmp/inpformer_input_bench

  --outputs float32,uint8  also times the uint8 path (`train_dataset(..., uint8=True)`, crops
                           normalised on the device by `pipeline.normalize`); float32 is what
                           the trainer uses now.
  --workers 0,1,2,4,8      more worker processes (only worth it with that many free cores).

What it does:
  1. Writes --num_images synthetic images of --size px (smooth random structure plus noise, so
     they compress like photos) as PNG and JPEG (q=95) folders, and prepares the PNG folder with
     `tfds_builders.prepare` (the `mvtec_ad` builder) in both encodings, 'png' and 'raw'.
  2. Times each decode/resize/finish stage in this process on one core (per image).
  3. Times `train_dataset` from each of the four sources with each --workers count:
     - "first batch s": iter() to the first batch: worker spawn and imports, plus grain's first
       read wave. Every grain process reads with grain.ReadOptions().num_threads (16) threads
       that each assemble a whole batch, so the first 16 batches per process finish together.
     - "images/s": the rest of that first wave (16 * max(workers, 1) batches) is skipped, then
       --timed_batches batches are timed (default 16, one whole wave: timing a part of a wave
       would catch its burst, or miss it).
     Each rate is shown next to one GPU's need (the ratio measured / required).
  4. Prints the feature cache's host memory per process for a Real-IAD-size training set
     (--cache_images rows over --cache_processes processes), computed from the shapes of the
     Real-IAD config's model, ViT-B/14 and ViT-S/14 (not measured).
The machine's CPU count and load average are printed with the numbers: on a shared machine
other jobs take cores, so the rates are lower bounds. Only --workdir is written.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

# configs/ lives at the repository root, not in the installed package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import grain
import numpy as np
from PIL import Image

from configs import realiad
from inpformer_jax.data import pipeline, preprocess, readers, tfds_builders
from inpformer_jax.data.records import Sample
from inpformer_jax.models import factory

# The official sizes (as loading.OFFICIAL): PIL resize to 448, centre crop to 392.
OFFICIAL = preprocess.Preprocessing(448, 392)
RESIZE, CROP = OFFICIAL.resize, OFFICIAL.crop
# Threads per grain process that each assemble a whole batch (pipeline._to_iter keeps the default).
READ_THREADS = grain.ReadOptions().num_threads

# One GPU's need. Training: the official MVTec recipe (45,200 steps x batch 16) in 10 minutes
# on one H200, the target. Inference: the bfloat16 rate on one H200.
TRAIN_STEPS, TRAIN_BATCH, TRAIN_SECONDS = 45_200, 16, 600
TRAIN_NEED = TRAIN_STEPS * TRAIN_BATCH / TRAIN_SECONDS
INFER_NEED = 1_500.0

# Marks a --workdir this script made, the only kind it deletes.
MARKER = ".input_pipeline_bench"
FLOAT32_BYTES = 4


def make_images(root: str, n: int, size: int, seed: int = 0) -> None:
  """MVTec-layout PNGs (bottle/train/good, one test image) and the same images as JPEG (q=95)."""
  rng = np.random.default_rng(seed)
  png = os.path.join(root, "png", "bottle", "train", "good")
  jpg = os.path.join(root, "jpeg")
  os.makedirs(png)
  os.makedirs(jpg)
  for i in range(n):
    # Low-frequency structure plus sensor-like noise: compresses like a photo, unlike pure noise.
    base = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)
    arr = np.clip(np.asarray(base, np.int16) + rng.integers(-6, 7, (size, size, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    img.save(os.path.join(png, f"{i:04d}.png"))
    img.save(os.path.join(jpg, f"{i:04d}.jpg"), quality=95)
  # The builder writes both splits; a token test split keeps the layout valid.
  test = os.path.join(root, "png", "bottle", "test", "good")
  os.makedirs(test)
  shutil.copy(os.path.join(png, "0000.png"), test)


def fresh_workdir(path: str) -> None:
  if os.path.exists(path):
    if not os.path.isfile(os.path.join(path, MARKER)):
      sys.exit(f"--workdir {path} exists and was not made by this benchmark; pass a new path "
               "(it is deleted and rewritten on every run)")
    shutil.rmtree(path)
  os.makedirs(path)
  open(os.path.join(path, MARKER), "w").close()


def rate(samples, source, workers: int, batch: int, timed: int, uint8: bool
         ) -> tuple[float, float]:
  """(seconds to the first batch, images/s over `timed` batches after the first read wave)."""
  ds = pipeline.train_dataset(samples, source=source, resize=RESIZE, crop=CROP,
                              global_batch_size=batch, seed=0, num_workers=workers,
                              process_index=0, process_count=1, uint8=uint8)
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  t1 = time.perf_counter()
  for _ in range(READ_THREADS * max(workers, 1) - 1):
    next(it)
  t2 = time.perf_counter()
  for _ in range(timed):
    b = next(it)
    assert b["image"].shape == (batch, CROP, CROP, 3)
    assert b["image"].dtype == (np.uint8 if uint8 else np.float32)
  t3 = time.perf_counter()
  it.close()  # stops the worker processes before the next configuration starts its own
  return t1 - t0, timed * batch / (t3 - t2)


def stage_times(png_samples, jpg_samples, src, raw, k: int = 20) -> dict[str, float]:
  """Milliseconds per image for each stage, one core, this process (first k images)."""
  k = min(k, len(png_samples), len(jpg_samples), len(src), len(raw))

  def per(fn, items):
    t = time.perf_counter()
    for x in items:
      fn(x)
    return 1e3 * (time.perf_counter() - t) / len(items)

  resized = preprocess.resize_pil_only(png_samples[0].image_path, RESIZE)
  top, left = preprocess.center_crop_offsets(RESIZE, RESIZE, CROP)
  return {
      "PNG decode": per(lambda s: Image.open(s.image_path).load(), png_samples[:k]),
      "JPEG decode": per(lambda s: Image.open(s.image_path).load(), jpg_samples[:k]),
      "PNG decode+resize 448": per(lambda s: preprocess.resize_pil_only(s.image_path, RESIZE),
                                   png_samples[:k]),
      "JPEG decode+resize 448": per(lambda s: preprocess.resize_pil_only(s.image_path, RESIZE),
                                    jpg_samples[:k]),
      "ArrayRecord read+PNG decode (448)": per(lambda i: src[i], range(k)),
      "ArrayRecord read, raw (448)": per(lambda i: raw[i], range(k)),
      "crop+normalise (float32)": per(lambda _: preprocess.finish_from_resized(resized, CROP),
                                      range(k)),
      "crop (uint8)": per(lambda _: np.ascontiguousarray(
          resized[top:top + CROP, left:left + CROP]), range(k)),
  }


def print_cores_needed(stages: dict[str, float], outputs: list[str]) -> None:
  """Cores busy with nothing else that one GPU's rate needs, from the one-core stage times."""
  read = {"PNG files": "PNG decode+resize 448", "JPEG files": "JPEG decode+resize 448",
          "ArrayRecord png": "ArrayRecord read+PNG decode (448)",
          "ArrayRecord raw": "ArrayRecord read, raw (448)"}
  finish = {"float32": "crop+normalise (float32)", "uint8": "crop (uint8)"}
  print("\ncores one GPU needs, from the stage times above (sum of stages; no queue or "
        "transfer cost): cores = rate x ms/image")
  print(f"{'source':18s} {'output':>7s} {'ms/image':>9s} {'train':>7s} {'infer':>7s}")
  for name, stage in read.items():
    for out in outputs:
      ms = stages[stage] + stages[finish[out]]
      print(f"{name:18s} {out:>7s} {ms:9.2f} {TRAIN_NEED * ms / 1e3:7.1f} "
            f"{INFER_NEED * ms / 1e3:7.1f}")


def print_cache_memory(num_images: int, processes: list[int]) -> None:
  """Feature-cache bytes per process from the shapes of the Real-IAD config's model."""
  config = realiad.get_config()
  crop = config.data.crop
  print(f"\nfeature cache, host memory per process: COMPUTED from the shapes, not measured.\n"
        f"N = {num_images:,} training images (Real-IAD size), crop {crop}, float32; bytes/row = "
        f"{FLOAT32_BYTES} x tokens x sum of the stored widths (the groups; the fused input "
        "only where the groups do not determine it), as feature_cache stores them (bfloat16: "
        "half);\neach of P processes stores its N/P rows (the shard-wise "
        "cache)")
  print(f"{'encoder':24s} {'tokens':>6s} {'widths':>15s} {'MB/row':>7s} {'P':>3s} "
        f"{'rows/host':>10s} {'GB/host':>8s} {'GiB/host':>9s}")
  base = config.model.encoder
  variant = factory.parse_encoder_name(base)["variant"]
  for name in (base, base.replace(variant, "small")):
    config.model.encoder = name
    model = factory.build_model(config.model)  # shapes only: no parameters are made
    tokens = model.encoder.grid_size(crop) ** 2
    widths = [*model.group_dims(), *([] if model.fused_derivable else [model.embed_dim])]
    row = FLOAT32_BYTES * tokens * sum(widths)
    for p in processes:
      rows = math.ceil(num_images / p)
      print(f"{name:24s} {tokens:6d} {'+'.join(map(str, widths)):>15s} {row / 1e6:7.2f} "
            f"{p:3d} {rows:10,d} {rows * row / 1e9:8.1f} {rows * row / 2**30:9.1f}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_images", type=int, default=96)
  p.add_argument("--size", type=int, default=512, help="side of the synthetic originals, px")
  p.add_argument("--workers", default="0,1,2,4", help="grain worker process counts to time")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--timed_batches", type=int, default=READ_THREADS,
                 help=f"batches timed after the first read wave (keep it a multiple of "
                 f"{READ_THREADS}: whole waves)")
  p.add_argument("--outputs", default="float32",
                 help="float32: normalised on the host (the trainer); uint8: crops, "
                 "normalised on the device")
  p.add_argument("--cache_images", type=int, default=70_000)
  p.add_argument("--cache_processes", default="1,2")
  p.add_argument("--workdir", default="/tmp/inpformer_input_bench")
  args = p.parse_args(argv)
  outputs = args.outputs.split(",")
  if not set(outputs) <= {"float32", "uint8"}:
    p.error(f"--outputs {args.outputs}: use float32, uint8 or float32,uint8")
  workers = [int(x) for x in args.workers.split(",")]
  if args.num_images < args.batch:
    p.error(f"--num_images {args.num_images} is fewer than one --batch {args.batch}")

  start = time.perf_counter()
  load = os.getloadavg()
  print(f"machine: nproc {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()}), "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the start; "
        "other jobs on a shared machine compete for the cores")
  fresh_workdir(args.workdir)
  t = time.perf_counter()
  make_images(args.workdir, args.num_images, args.size)
  png = readers.read_dataset("mvtec", os.path.join(args.workdir, "png"), ["bottle"], "train")
  jpg = [Sample(os.path.join(args.workdir, "jpeg", f), None, 0, "bench", "bottle")
         for f in sorted(os.listdir(os.path.join(args.workdir, "jpeg")))]
  t_make = time.perf_counter() - t
  t = time.perf_counter()
  data_dir = os.path.join(args.workdir, "tfds")
  for enc in ("png", "raw"):
    tfds_builders.prepare(tfds_builders.MvtecAd, manual_dir=os.path.join(args.workdir, "png"),
                          data_dir=data_dir, resize=RESIZE, categories=["bottle"], encoding=enc)
  t_prep = time.perf_counter() - t
  src = tfds_builders.source(data_dir, "mvtec_ad", "train", resize=RESIZE, categories=["bottle"])
  raw = tfds_builders.source(data_dir, "mvtec_ad", "train", resize=RESIZE, categories=["bottle"],
                             encoding="raw")
  print(f"data: {args.num_images} images of {args.size}x{args.size}, made in {t_make:.1f} s; "
        f"ArrayRecord (448, PNG and raw) prepared in {t_prep:.1f} s")

  stages = stage_times(png, jpg, src, raw)
  print("\nper-image stage cost, one core (this process):")
  for k, v in stages.items():
    print(f"  {k:36s} {v:7.2f} ms")

  print(f"\none GPU needs: training {TRAIN_NEED:,.0f} images/s ({TRAIN_STEPS:,} steps x batch "
        f"{TRAIN_BATCH} in {TRAIN_SECONDS} s on one H200, the official MVTec recipe); "
        f"inference {INFER_NEED:,.0f} images/s (bfloat16)")
  print(f"train_dataset, batch {args.batch}, resize {RESIZE} -> crop {CROP}: first batch timed "
        f"apart; images/s over {args.timed_batches} batches after the first read wave; "
        "x train / x infer = measured / needed; load = 1-min load average after the row")
  print(f"{'source':18s} {'output':>7s} {'workers':>7s} {'first batch s':>14s} {'images/s':>9s} "
        f"{'x train':>8s} {'x infer':>8s} {'load':>5s}")
  for name, samples, source in (("PNG files", png, None), ("JPEG files", jpg, None),
                                ("ArrayRecord png", None, src), ("ArrayRecord raw", None, raw)):
    for out in outputs:
      for w in workers:
        first, r = rate(samples, source, w, args.batch, args.timed_batches, out == "uint8")
        print(f"{name:18s} {out:>7s} {w:7d} {first:14.2f} {r:9.1f} {r / TRAIN_NEED:8.3f} "
              f"{r / INFER_NEED:8.3f} {os.getloadavg()[0]:5.1f}", flush=True)

  print_cores_needed(stages, outputs)
  print_cache_memory(args.cache_images, [int(x) for x in args.cache_processes.split(",")])
  load = os.getloadavg()
  print(f"\nload average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end; "
        f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
