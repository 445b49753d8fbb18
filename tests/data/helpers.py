"""Shared by the tests of inpformer_jax.data: small datasets written in the real layouts, and
shortcuts for the grain pipelines at a small size."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from inpformer_jax.data import pipeline
from inpformer_jax.data.records import Sample

RESIZE, CROP = 64, 56


# ---------------------------------------------------------------------------------------------
# Single files.


def write_image(path, size=(12, 10), value=100, mode="RGB"):
  """A constant image of size (w, h); 'L' images are masks."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  w, h = size
  arr = np.full((h, w, 3) if mode == "RGB" else (h, w), value, np.uint8)
  Image.fromarray(arr, mode).save(path)


def write_mask(path, size=(12, 10)):
  """An all-defect (255) mask of size (w, h)."""
  write_image(path, size, 255, "L")


def write_random_image(path, rng, height, width):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_box_mask(path, height, width):
  """A mask with one 255 box, so that the bilinear resize leaves soft edges."""
  m = np.zeros((height, width), np.uint8)
  m[5:height // 2, 10:width // 2] = 255
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(m).save(path)


def _random_size(rng):
  return tuple(int(v) for v in rng.integers(60, 90, 2))


# ---------------------------------------------------------------------------------------------
# Datasets.


def write_samples(root, n, *, label=0, category="c", dataset="t", masks=False, seed=0):
  """n random RGB PNGs of varied sizes as Sample records; anomalous ones get a same-size mask."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = _random_size(rng)
    path = os.path.join(root, f"{i:03d}.png")
    write_random_image(path, rng, h, w)
    mask_path = None
    if masks:
      mask_path = os.path.join(root, f"{i:03d}_mask.png")
      write_box_mask(mask_path, h, w)
    out.append(Sample(path, mask_path, label, dataset, category,
                      "good" if label == 0 else "crack", True))
  return out


def make_mvtec(root, cls="bottle", mask_suffix="_mask", ext=".png", mask_ext=".png",
               good="good", defects=("broken", "crack")):
  """Writes one MVTec-layout class of constant images, for the layout checks of the readers.

  3 train, 2 test good images; per defect the stems '1' and '1_a' (sorted image order and
  sorted mask order differ: '.' < '_' but '_a' < '_m'); anomalous images get distinct sizes
  (w = 20 + index), so a wrong image/mask pairing shows in the sizes.
  """
  base = os.path.join(root, cls)
  for i in range(3):
    write_image(os.path.join(base, "train", good, f"{i:03d}{ext}"))
  for i in range(2):
    write_image(os.path.join(base, "test", good, f"{i:03d}{ext}"))
  n = 0
  for d in defects:
    for stem in ("1", "1_a"):
      size = (20 + n, 10)
      write_image(os.path.join(base, "test", d, stem + ext), size)
      write_mask(os.path.join(base, "ground_truth", d, stem + mask_suffix + mask_ext), size)
      n += 1
  return base


def random_mvtec(root, categories, *, seed=0, counts=(3, 2, 2)):
  """MVTec-layout classes of random images of varied sizes, for the pixel checks.

  counts: images in train/good, test/good and test/crack (with box masks) per class.
  """
  rng = np.random.default_rng(seed)
  for c in categories:
    for sub, n in zip(("train/good", "test/good", "test/crack"), counts, strict=True):
      for i in range(n):
        h, w = _random_size(rng)
        write_random_image(os.path.join(root, c, sub, f"{i:03d}.png"), rng, h, w)
        if sub == "test/crack":
          write_box_mask(os.path.join(root, c, "ground_truth", "crack", f"{i:03d}_mask.png"),
                         h, w)


def make_realiad(root, cls="audiojack", res="256", nested=True, prefix_class=False, *,
                 views=(1, 2, 3, 4, 5), train_ids=(1, 2), test_ids=(3,), anomalous_ids=(9,),
                 defect="AK"):
  """One Real-IAD class (release layout + split JSON); every view of a sample is an image.

  Normal images are 12x10, anomalous ones 16x12 with an all-255 mask. The test list holds the
  normal samples first. Returns (class folder, JSON path).
  """
  cdir = os.path.join(root, f"realiad_{res}", cls)
  items = {"train": [], "test": []}
  for split, sample_ids in (("train", train_ids), ("test", test_ids)):
    for sid in sample_ids:
      for view in views:
        rel = f"OK/S{sid:04d}/{cls}_{sid:04d}_OK_C{view}_20231021.jpg"
        write_image(os.path.join(cdir, rel))
        items[split].append({"category": cls, "anomaly_class": "OK",
                             "image_path": (f"{cls}/" if prefix_class else "") + rel,
                             "mask_path": None})
  for sid in anomalous_ids:
    for view in views:
      rel = f"NG/{defect}/S{sid:04d}/{cls}_{sid:04d}_NG_{defect}_C{view}_20231021"
      write_image(os.path.join(cdir, rel + ".jpg"), (16, 12))
      write_mask(os.path.join(cdir, rel + ".png"), (16, 12))
      items["test"].append({"category": cls, "anomaly_class": defect,
                            "image_path": rel + ".jpg", "mask_path": rel + ".png"})
  jdir = os.path.join(root, "realiad_jsons", "realiad_jsons") if nested else os.path.join(
      root, "realiad_jsons")
  os.makedirs(jdir, exist_ok=True)
  spec = {"meta": {"prefix": cls, "normal_class": "OK"}, **items}
  with open(os.path.join(jdir, f"{cls}.json"), "w") as f:
    json.dump(spec, f)
  return cdir, os.path.join(jdir, f"{cls}.json")


# ---------------------------------------------------------------------------------------------
# Pipelines.


def take(ds, n):
  """The first n elements of a grain dataset."""
  it = iter(ds)
  return [next(it) for _ in range(n)]


def train(samples, **kw):
  """`pipeline.train_dataset` at RESIZE/CROP, batch 4, seed 0, one process, no workers."""
  args = dict(resize=RESIZE, crop=CROP, global_batch_size=4, seed=0, num_workers=0,
              process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_dataset(samples, **args)
