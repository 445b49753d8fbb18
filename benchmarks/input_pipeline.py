"""Training input pipeline throughput: images/s delivered at crop 392 (resize 448).

python benchmarks/input_pipeline.py [--num_images 200] [--size 512] [--workers 0,2,4] \
    [--batch 16] [--workdir /tmp/inpformer_input_bench]

Writes a synthetic dataset (smooth random images of --size px, as PNG and as JPEG, plus the
ArrayRecord shards the `mvtec_ad` TFDS builder makes from the PNGs), then times
`pipeline.train_dataset` from each with 0, 2 and 4 grain worker processes. The first batch
(worker start-up) is timed separately; the rate is over the following batches, two epochs.
It also times the per-image stages in this process (one core) to show where the time goes.
Numbers depend on the machine's free cores: report them with `nproc` and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

from inpformer_jax.data import pipeline, preprocess, readers, tfds_builders
from inpformer_jax.data.records import Sample

# The official sizes (as loading.OFFICIAL): PIL resize to 448, centre crop to 392.
OFFICIAL = preprocess.Preprocessing(448, 392)
RESIZE, CROP = OFFICIAL.resize, OFFICIAL.crop


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


def rate(samples, source, workers: int, batch: int, batches: int, uint8: bool
         ) -> tuple[float, float]:
  """(seconds to the first batch, images/s over the next `batches` batches)."""
  ds = pipeline.train_dataset(samples, source=source, resize=RESIZE, crop=CROP,
                              global_batch_size=batch, seed=0, num_workers=workers,
                              process_index=0, process_count=1, uint8=uint8)
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    assert b["image"].shape == (batch, CROP, CROP, 3)
    assert b["image"].dtype == (np.uint8 if uint8 else np.float32)
  t2 = time.perf_counter()
  it.close() if hasattr(it, "close") else None
  return t1 - t0, batches * batch / (t2 - t1)


def stage_times(png_samples, jpg_samples, src, raw, k: int = 20) -> dict[str, float]:
  """Milliseconds per image for each stage, one core, this process (first k images)."""
  k = min(k, len(png_samples), len(jpg_samples), len(src), len(raw))

  def per(fn, items):
    t = time.perf_counter()
    for x in items:
      fn(x)
    return 1e3 * (time.perf_counter() - t) / len(items)
  resized = preprocess.resize_pil_only(png_samples[0].image_path, RESIZE)
  return {
      "PNG decode": per(lambda s: Image.open(s.image_path).load(), png_samples[:k]),
      "JPEG decode": per(lambda s: Image.open(s.image_path).load(), jpg_samples[:k]),
      "PNG decode+resize 448": per(lambda s: preprocess.resize_pil_only(s.image_path, RESIZE),
                                   png_samples[:k]),
      "JPEG decode+resize 448": per(lambda s: preprocess.resize_pil_only(s.image_path, RESIZE),
                                    jpg_samples[:k]),
      "ArrayRecord read+PNG decode (448)": per(lambda i: src[i], range(k)),
      "ArrayRecord read, raw (448)": per(lambda i: raw[i], range(k)),
      "crop+normalise (finish)": per(lambda _: preprocess.finish_from_resized(resized, CROP),
                                     range(k)),
      "PNG file -> model input (image)": per(lambda s: OFFICIAL.image(s.image_path),
                                             png_samples[:k]),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=200)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--workers", default="0,2,4")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--outputs", default="float32,uint8",
                 help="float32: normalised on the host; uint8: crops, normalised on device")
  p.add_argument("--workdir", default="/tmp/inpformer_input_bench")
  args = p.parse_args(argv)

  shutil.rmtree(args.workdir, ignore_errors=True)
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
  batches = 2 * args.num_images // args.batch

  load = os.getloadavg()
  print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} (shared machine: "
        "other jobs compete for the cores)")
  print(f"data: {args.num_images} images of {args.size}x{args.size}, made in {t_make:.1f} s; "
        f"ArrayRecord (448, PNG and raw) prepared in {t_prep:.1f} s")
  print("\nper-image stage cost, one core:")
  for k, v in stage_times(png, jpg, src, raw).items():
    print(f"  {k:36s} {v:7.2f} ms")
  print(f"\ntrain_dataset, batch {args.batch}, crop {CROP}: images/s over {batches} batches "
        "(first batch timed apart)")
  print(f"{'source':18s} {'output':>7s} {'workers':>7s} {'first batch s':>14s} {'images/s':>9s}")
  for name, samples, source in (("PNG files", png, None), ("JPEG files", jpg, None),
                                ("ArrayRecord png", None, src), ("ArrayRecord raw", None, raw)):
    for out in args.outputs.split(","):
      for w in (int(x) for x in args.workers.split(",")):
        first, r = rate(samples, source, w, args.batch, batches, out == "uint8")
        print(f"{name:18s} {out:>7s} {w:7d} {first:14.2f} {r:9.1f}", flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
