"""Cost of the data check before training (`inpformer_jax.data.validate.validate_run`).

  python benchmarks/validate_data.py                        # 20,000 images, MVTec layout
  python benchmarks/validate_data.py --layout realiad --num_images 20000 --workers 1,8

Writes a synthetic dataset under --workdir (--num_images small images, a third of them
anomalous with a mask, as in Real-IAD: 51,329 of its 151,050 images), then times
`validate_run(config, 'train_and_eval')` (list both splits, read every image's and mask's
header and last KiB) with each --workers thread count, warm (page cache full: the files were
just written and read) and cold (every file's cached pages dropped with posix_fadvise first;
directory entries and inodes stay cached, so a really cold disk is slower still). For
comparison it times today's listing, `datasets.read_split` of both splits (it reads the
headers of the anomalous images and masks only). Prints images/s, files/s (images and
masks) and the extrapolation to Real-IAD's 151,050 images + 51,329 masks, with the CPU count
and load average: on a shared machine other jobs take the cores. Only --workdir is written
(removed unless --keep).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

# configs/ lives at the repository root, not in the installed package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
from PIL import Image

from configs import mvtec
from inpformer_jax.data import datasets, validate

REALIAD_IMAGES, REALIAD_MASKS = 151_050, 51_329


def _encoded(size: int, fmt: str) -> tuple[bytes, bytes]:
  """One image (noise, so it is as large as a photo of that size) and one mask, encoded."""
  rng = np.random.default_rng(0)
  image, mask = io.BytesIO(), io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(image, fmt)
  Image.fromarray(np.zeros((size, size), np.uint8)).save(mask, "PNG")
  return image.getvalue(), mask.getvalue()


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def write_mvtec(root, classes, per_class, anomalous, image, mask, ext):
  for c in classes:
    n_bad = int(per_class * anomalous)
    n_test_good = (per_class - n_bad) // 4
    for i in range(per_class - n_bad - n_test_good):
      _write(f"{root}/{c}/train/good/{i:05d}{ext}", image)
    for i in range(n_test_good):
      _write(f"{root}/{c}/test/good/{i:05d}{ext}", image)
    for i in range(n_bad):
      _write(f"{root}/{c}/test/crack/{i:05d}{ext}", image)
      _write(f"{root}/{c}/ground_truth/crack/{i:05d}_mask.png", mask)


def write_realiad(root, classes, per_class, anomalous, image, mask):
  os.makedirs(f"{root}/realiad_jsons/realiad_jsons", exist_ok=True)
  for c in classes:
    n_bad = int(per_class * anomalous)
    spec = {"train": [], "test": []}
    for i in range(per_class):
      bad = i < n_bad
      kind = "NG/AK" if bad else "OK"
      rel = f"{kind}/S{i // 5:04d}/{c}_{i // 5:04d}_{kind.replace('/', '_')}_C{i % 5 + 1}_0"
      _write(f"{root}/realiad_1024/{c}/{rel}.jpg", image)
      if bad:
        _write(f"{root}/realiad_1024/{c}/{rel}.png", mask)
      split = "test" if bad or i % 4 == 0 else "train"
      spec[split].append({"category": c, "anomaly_class": "AK" if bad else "OK",
                          "image_path": rel + ".jpg", "mask_path": rel + ".png" if bad else None})
    with open(f"{root}/realiad_jsons/realiad_jsons/{c}.json", "w") as f:
      json.dump(spec, f)


def drop_cache(root: str) -> None:
  os.sync()
  for d, _, names in os.walk(root):
    for n in names:
      fd = os.open(os.path.join(d, n), os.O_RDONLY)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      os.close(fd)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--num_images", type=int, default=20_000)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--anomalous", type=float, default=REALIAD_MASKS / REALIAD_IMAGES)
  p.add_argument("--size", type=int, default=64, help="image side in pixels")
  p.add_argument("--layout", choices=("mvtec", "realiad"), default="mvtec")
  p.add_argument("--ext", default=".png", help="mvtec layout: .png or .jpg (realiad: .jpg)")
  p.add_argument("--workers", default="1,8,16", help="thread counts to time")
  p.add_argument("--workdir", default="/tmp/inpformer_validate_bench")
  p.add_argument("--keep", action="store_true", help="keep the dataset in --workdir")
  args = p.parse_args(argv)

  name = args.layout
  classes = [f"c{i:02d}" for i in range(args.classes)]
  jpeg = name == "realiad" or args.ext.lower() in (".jpg", ".jpeg")
  image, mask = _encoded(args.size, "JPEG" if jpeg else "PNG")
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.perf_counter()
  per_class = args.num_images // args.classes
  if name == "mvtec":
    write_mvtec(args.workdir, classes, per_class, args.anomalous, image, mask, args.ext)
  else:
    write_realiad(args.workdir, classes, per_class, args.anomalous, image, mask)
  print(f"wrote {per_class * args.classes} {args.size}px images ({len(image)} B) in "
        f"{args.workdir} in {time.perf_counter() - t0:.0f} s")

  config = mvtec.get_config("runlocal=True")
  config.data.train = config.data.test = name
  config.data.roots[name] = args.workdir
  config.data.categories[name] = ",".join(classes)
  t0 = time.perf_counter()
  today = [datasets.read_split(config.data, w) for w in ("train", "test")]
  t_today = time.perf_counter() - t0
  n_img = sum(len(s.samples) for s in today)
  n_mask = sum(x.mask_path is not None for s in today for x in s.samples)
  print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
        f"{n_img} images + {n_mask} masks; read_split of both splits (today): {t_today:.2f} s")
  print(f"{'cache':>5} {'workers':>7} {'s':>7} {'images/s':>8} {'files/s':>8} "
        f"{'Real-IAD s':>10}")
  for cache in ("warm", "cold"):
    for workers in map(int, args.workers.split(",")):
      if cache == "cold":
        drop_cache(args.workdir)
      t0 = time.perf_counter()
      validate.validate_run(config, "train_and_eval", workers=workers)
      t = time.perf_counter() - t0
      rate = (n_img + n_mask) / t
      print(f"{cache:>5} {workers:>7} {t:7.2f} {n_img / t:8.0f} {rate:8.0f} "
            f"{(REALIAD_IMAGES + REALIAD_MASKS) / rate:10.0f}")
  print(f"load average {os.getloadavg()[0]:.1f} at the end")
  if not args.keep:
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
  main()
