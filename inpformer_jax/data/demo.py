"""A small anomaly-detection dataset made from photographs that ship inside scikit-image.

  python -m inpformer_jax.data.demo --out /tmp/inpformer_demo [--seed 0] [--overwrite]

writes, in MVTec AD layout (read it with `read_dataset('demo', root)`):

  <out>/<class>/train/good/000.png ... 039.png          normal crops
  <out>/<class>/test/good/000.png ... 009.png           normal crops
  <out>/<class>/test/{foreign,scratch,cutpaste}/000.png ... 003.png
  <out>/<class>/ground_truth/<defect>/000_mask.png      exact 0/255 masks
  <out>/demo_manifest.json   crop boxes, seeds, sources and licences
  <out>/SOURCES.txt          the same attribution, for people

Classes are textures, so that any crop of the source is "normal": brick, grass and gravel
(CC0 textures, greyscale) and galaxy (the Hubble eXtreme Deep Field, public domain, colour).
Training crops come from the top 60% of each source image and test crops from the bottom
40%: no pixel is shared between train and test. Images are 256x256 RGB.

Defects are pasted with hard edges (no blending), so the mask is exactly the set of changed
pixels, and are meant to be as visible as real ones: each spans several 14-px ViT patches at
224 px and differs from its surroundings by a mean of >= 40 grey levels (60 for scratches):
  foreign   a Perlin-noise blob filled with a crop of a colour photograph (coffee, cat,
            astronaut, rocket, tissue or retina -- also shipped with scikit-image);
  scratch   a 5-9 px wide polyline, dark on bright texture and bright on dark;
  cutpaste  a rectangle cut from elsewhere in the image, flipped and brightness-shifted.
Everything derives from --seed; the same seed gives byte-identical files. No network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import zlib

from absl import flags
import numpy as np
import skimage.data
from PIL import Image, ImageDraw
from scipy import ndimage

from inpformer_jax import cli
from inpformer_jax import errors


@dataclasses.dataclass(frozen=True)
class Source:
  file: str           # inside skimage/data/
  title: str
  licence: str
  url: str
  rotations: bool     # whether 90-degree turns keep the texture normal (not for bricks)


CLASS_SOURCES = {
    "brick": Source("brick.png", "Brick wall (CC0Textures Bricks25, via scikit-image)",
                    "CC0 1.0", "https://cc0textures.com/view.php?tex=Bricks25", False),
    "grass": Source("grass.png", "Grass (DeviantArt linolafett Grass-01, via scikit-image)",
                    "CC0 1.0", "https://www.deviantart.com/linolafett/art/Grass-01-434853879",
                    True),
    "gravel": Source("gravel.png", "Gravel (CC0Textures Gravel04, via scikit-image)", "CC0 1.0",
                     "https://cc0textures.com/view.php?tex=Gravel04", True),
    "galaxy": Source("hubble_deep_field.jpg", "Hubble eXtreme Deep Field (NASA, via scikit-image)",
                     "public domain (NASA)",
                     "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/", True),
}
# Colour photographs whose crops fill the "foreign" blobs.
FOREIGN_SOURCES = {
    "coffee": Source("coffee.png", "Coffee cup (Rachel Michetti, via scikit-image)", "CC0 1.0",
                     "https://github.com/scikit-image/scikit-image", False),
    "chelsea": Source("chelsea.png", "Chelsea the cat (Stefan van der Walt, via scikit-image)",
                      "CC0 1.0", "https://github.com/scikit-image/scikit-image", False),
    "astronaut": Source("astronaut.png", "Astronaut Eileen Collins (NASA, via scikit-image)",
                        "public domain (NASA)", "https://flic.kr/p/r9qvLn", False),
    "rocket": Source("rocket.jpg", "DSCOVR launch on Falcon 9 (SpaceX, via scikit-image)",
                     "public domain (SpaceX)",
                     "https://www.flickr.com/photos/spacexphotos/16511594820/", False),
    "ihc": Source("ihc.png", "Immunohistochemistry (CMMI, via scikit-image)",
                  "no known copyright restrictions", "https://github.com/scikit-image/scikit-image",
                  False),
    "retina": Source("retina.jpg", "Fundus photograph (Mikael Haggstrom, via scikit-image)",
                     "CC0 1.0",
                     "https://commons.wikimedia.org/wiki/"
                     "File:Fundus_photograph_of_normal_left_eye.jpg",
                     False),
}
DEMO_CLASSES = tuple(CLASS_SOURCES)
DEFECTS = ("foreign", "scratch", "cutpaste")
TRAIN_FRACTION = 0.6  # rows of the source image that train crops may use; test gets the rest
# Side of the source square cut for one 256-px image: 192 px of a 512-px texture (upsampled
# x1.33 so the bottom 40% still holds a full crop), the Hubble field at its own scale.
CROP_FRACTION = {"brick": 0.375, "grass": 0.375, "gravel": 0.375, "galaxy": 0.256}
MIN_CONTRAST = {"foreign": 40.0, "scratch": 60.0, "cutpaste": 40.0}
# Every defect's bounding box is at least this fraction of the side: 51 px of 256, i.e. more
# than three 14-px patches once resized to 224.
MIN_EXTENT = 0.2


class DemoClassError(errors.UserError, ValueError):
  """A --classes name that is not a demo class."""


def skimage_data_dir() -> str:
  return os.path.dirname(skimage.data.__file__)


def load_source(src: Source) -> np.ndarray:
  """uint8 (H, W, 3) straight from the file in the scikit-image wheel (no pooch, no network)."""
  path = os.path.join(skimage_data_dir(), src.file)
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"{path} is missing: the demo needs scikit-image's bundled sample images "
        "(pip install 'scikit-image>=0.25'; they are part of the wheel)")
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"), np.uint8)


# ---------------------------------------------------------------------------------------------
# Defects. Each takes a clean uint8 (S, S, 3) image and returns (defective image, bool mask);
# pixels outside the mask are untouched.


def perlin_noise(size: int, res: int, rng: np.random.Generator) -> np.ndarray:
  """2-D Perlin gradient noise, float (size, size) in about [-1, 1]; size % res == 0."""
  angles = rng.uniform(0, 2 * np.pi, (res + 1, res + 1))
  grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  t = (np.arange(size) + 0.5) * res / size
  cell, frac = np.floor(t).astype(int), t - np.floor(t)
  fy, fx = frac[:, None], frac[None, :]
  iy, ix = cell[:, None], cell[None, :]

  def corner(dy, dx):
    g = grads[iy + dy, ix + dx]
    return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

  fade = lambda f: 6 * f**5 - 15 * f**4 + 10 * f**3
  wy, wx = fade(fy), fade(fx)
  top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
  bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
  return np.sqrt(2) * (top * (1 - wy) + bottom * wy)


def blob_mask(size: int, rng: np.random.Generator, min_frac=0.025, max_frac=0.08) -> np.ndarray:
  """One connected Perlin-shaped blob covering min_frac..max_frac of the image."""
  yy, xx = np.mgrid[:size, :size]
  for _ in range(100):
    noise = perlin_noise(size, int(rng.choice([4, 8])), rng)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.12, 0.22, 2) * size
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    labels, n = ndimage.label(inside & (noise > rng.uniform(-0.2, 0.1)))
    if n == 0:
      continue
    sizes = np.bincount(labels.ravel())[1:]
    mask = ndimage.binary_fill_holes(labels == 1 + np.argmax(sizes))
    if (min_frac * size * size <= mask.sum() <= max_frac * size * size
        and _extent(mask) >= MIN_EXTENT * size):
      return mask
  raise RuntimeError("could not draw a blob of the requested size")


def _extent(mask: np.ndarray) -> int:
  """Side of the larger bounding-box dimension of a mask, in pixels."""
  ys, xs = np.nonzero(mask)
  return int(max(np.ptp(ys), np.ptp(xs))) + 1 if len(ys) else 0


def _contrast(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  return float(np.abs(a[mask].astype(np.float32) - b[mask].astype(np.float32)).mean())


def foreign_defect(img: np.ndarray, rng: np.random.Generator,
                   foreign: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  mask = blob_mask(size, rng)
  names = sorted(foreign)
  for _ in range(20):
    src = foreign[names[rng.integers(len(names))]]
    side = int(rng.integers(size // 2, min(src.shape[:2]) + 1))
    y, x = rng.integers(0, src.shape[0] - side + 1), rng.integers(0, src.shape[1] - side + 1)
    fill = np.asarray(Image.fromarray(src[y:y + side, x:x + side]).resize(
        (size, size), Image.Resampling.BILINEAR))
    out = img.copy()
    out[mask] = fill[mask]
    if _contrast(out, img, mask) >= MIN_CONTRAST["foreign"]:
      return out, mask
  # 20 fills all too close to the texture (rare): push the last one away from its level.
  dark = img[mask].mean() > 128
  shifted = fill[mask].astype(np.float32) * 0.3 + (0 if dark else 170)
  out[mask] = np.clip(shifted, 0, 255).astype(np.uint8)
  return out, mask


def scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
  """A 5-9 px wide wandering polyline, drawn without antialiasing (exact 0/1)."""
  while True:
    canvas = Image.new("L", (size, size), 0)
    y, x = rng.uniform(0.2, 0.8, 2) * size
    angle, points = rng.uniform(0, 2 * np.pi), [(x, y)]
    for _ in range(int(rng.integers(5, 9))):
      angle += rng.uniform(-0.5, 0.5)
      step = rng.uniform(0.06, 0.1) * size
      nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
      if not (0.05 * size < nx < 0.95 * size and 0.05 * size < ny < 0.95 * size):
        angle += np.pi  # bounce off the border
        nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
      x, y = nx, ny
      points.append((x, y))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(5, 10)), joint="curve")
    mask = np.asarray(canvas) > 0
    if _extent(mask) >= MIN_EXTENT * size:  # a bounce can fold it onto itself
      return mask


def scratch_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  mask = scratch_mask(img.shape[0], rng)
  out = img.copy()
  region = img[mask].astype(np.float32)
  if region.mean() > 110:  # dark scratch on bright texture, with a rust tint
    paint = region * 0.15 + np.array([40, 20, 10], np.float32)
  else:  # bright scratch on dark texture
    paint = 200 + region * 0.2
  out[mask] = np.clip(paint, 0, 255).astype(np.uint8)
  return out, mask


def cutpaste_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  for attempt in range(50):
    h, w = (int(v) for v in rng.integers(int(0.2 * size), int(0.32 * size), 2))
    sy, sx = rng.integers(0, size - h), rng.integers(0, size - w)
    dy, dx = rng.integers(0, size - h), rng.integers(0, size - w)
    if abs(int(sy) - int(dy)) < h and abs(int(sx) - int(dx)) < w:
      continue  # cut and paste sites must not overlap
    patch = img[sy:sy + h, sx:sx + w]
    patch = patch[::-1, :] if rng.random() < 0.5 else patch[:, ::-1]
    # Brighten onto dark texture (an offset, as gain alone leaves black black), darken onto
    # bright texture.
    if img[dy:dy + h, dx:dx + w].mean() < 110:
      patch = patch.astype(np.float32) * rng.uniform(1.2, 1.5) + rng.uniform(50, 80)
    else:
      patch = patch.astype(np.float32) * rng.uniform(0.3, 0.5)
    patch = np.clip(patch, 0, 255).astype(np.uint8)
    out = img.copy()
    out[dy:dy + h, dx:dx + w] = patch
    mask = np.zeros((size, size), bool)
    mask[dy:dy + h, dx:dx + w] = True
    if _contrast(out, img, mask) >= MIN_CONTRAST["cutpaste"] or attempt == 49:
      return out, mask
  raise AssertionError("unreachable")


def make_defect(kind: str, img: np.ndarray, rng: np.random.Generator,
                foreign: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  if kind == "foreign":
    return foreign_defect(img, rng, foreign)
  if kind == "scratch":
    return scratch_defect(img, rng)
  if kind == "cutpaste":
    return cutpaste_defect(img, rng)
  raise ValueError(f"unknown defect {kind!r}; known: {DEFECTS}")


# ---------------------------------------------------------------------------------------------
# Crops and the dataset.


def render_crop(src: np.ndarray, info: dict, size: int) -> np.ndarray:
  """The crop a manifest entry describes: uint8 (size, size, 3)."""
  y, x, h, w = info["box_yxhw"]
  img = Image.fromarray(src[y:y + h, x:x + w])
  if (h, w) != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  arr = np.asarray(img)
  arr = np.rot90(arr[:, ::-1] if info["hflip"] else arr, info["rot90"])
  return np.ascontiguousarray(arr)


def _crop(src: np.ndarray, rows: tuple[int, int], side: int, size: int, rotations: bool,
          rng: np.random.Generator) -> tuple[np.ndarray, dict]:
  """A random side x side crop inside rows [r0, r1), resized to size, randomly flipped."""
  r0, r1 = rows
  y = int(rng.integers(r0, r1 - side + 1))
  x = int(rng.integers(0, src.shape[1] - side + 1))
  flip, turns = bool(rng.random() < 0.5), int(rng.integers(4)) if rotations else 0
  info = {"box_yxhw": [y, x, side, side], "hflip": flip, "rot90": turns}
  return render_crop(src, info, size), info


def _save(arr: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # zlib level 1: 5x faster than the default 6 and lossless all the same.
  Image.fromarray(arr).save(path, compress_level=1)


def make_class(out_dir: str, name: str, seed: int, *, size: int = 256, n_train: int = 40,
               n_good: int = 10, n_per_defect: int = 4,
               foreign: dict[str, np.ndarray] | None = None) -> dict:
  """Writes one class; returns its manifest entry."""
  src_info = CLASS_SOURCES[name]
  src = load_source(src_info)
  if foreign is None:
    foreign = {k: load_source(v) for k, v in FOREIGN_SOURCES.items()}
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  split_row = int(round(src.shape[0] * TRAIN_FRACTION))
  side = int(round(CROP_FRACTION[name] * min(src.shape[:2])))
  if min(split_row, src.shape[0] - split_row) < side:
    raise ValueError(f"{name}: crop side {side} does not fit in both row ranges")
  cls_dir = os.path.join(out_dir, name)
  entry = {"source": dataclasses.asdict(src_info), "split_row": split_row, "crop_side": side,
           "train": [], "test": []}
  for i in range(n_train):
    arr, info = _crop(src, (0, split_row), side, size, src_info.rotations, rng)
    _save(arr, os.path.join(cls_dir, "train", "good", f"{i:03d}.png"))
    entry["train"].append(info)
  for i in range(n_good):
    arr, info = _crop(src, (split_row, src.shape[0]), side, size, src_info.rotations, rng)
    _save(arr, os.path.join(cls_dir, "test", "good", f"{i:03d}.png"))
    entry["test"].append({**info, "defect": "good"})
  for kind in DEFECTS:
    for i in range(n_per_defect):
      arr, info = _crop(src, (split_row, src.shape[0]), side, size, src_info.rotations, rng)
      bad, mask = make_defect(kind, arr, rng, foreign)
      _save(bad, os.path.join(cls_dir, "test", kind, f"{i:03d}.png"))
      _save(mask.astype(np.uint8) * 255,
            os.path.join(cls_dir, "ground_truth", kind, f"{i:03d}_mask.png"))
      entry["test"].append({**info, "defect": kind, "mask_pixels": int(mask.sum()),
                            "contrast": round(_contrast(bad, arr, mask), 2)})
  return entry


def make_demo_dataset(out_dir: str, seed: int = 0, *, classes=DEMO_CLASSES, size: int = 256,
                      n_train: int = 40, n_good: int = 10, n_per_defect: int = 4,
                      overwrite: bool = False) -> dict:
  """Writes the demo dataset; returns the manifest (also saved as demo_manifest.json)."""
  for name in classes:
    if name not in CLASS_SOURCES:
      raise DemoClassError(f"unknown demo class {name!r} (--classes); known: "
                           f"{','.join(DEMO_CLASSES)}")
    cls_dir = os.path.join(out_dir, name)
    if os.path.exists(cls_dir):
      if not overwrite:
        raise errors.OutputExistsError(f"{cls_dir} exists; pass --overwrite to replace it")
      shutil.rmtree(cls_dir)
  os.makedirs(out_dir, exist_ok=True)
  foreign = {k: load_source(v) for k, v in FOREIGN_SOURCES.items()}
  manifest = {"seed": seed, "size": size, "classes": {}, "foreign_sources":
              {k: dataclasses.asdict(v) for k, v in FOREIGN_SOURCES.items()}}
  for name in classes:
    manifest["classes"][name] = make_class(out_dir, name, seed, size=size, n_train=n_train,
                                           n_good=n_good, n_per_defect=n_per_defect,
                                           foreign=foreign)
  with open(os.path.join(out_dir, "demo_manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  with open(os.path.join(out_dir, "SOURCES.txt"), "w") as f:
    f.write("Images made by `python -m inpformer_jax.data.demo` from scikit-image sample data.\n")
    for role, table in (("texture (class)", CLASS_SOURCES), ("foreign fill", FOREIGN_SOURCES)):
      for key, s in table.items():
        f.write(f"{role:16s} {key:10s} {s.title}; licence: {s.licence}; {s.url}\n")
  return manifest


def _main(args: flags.FlagValues) -> int:
  classes = tuple(c for c in args.classes.split(",") if c)
  manifest = make_demo_dataset(args.out, args.seed, classes=classes, size=args.size,
                               overwrite=args.overwrite)
  for name, entry in manifest["classes"].items():
    print(f"{name}: {len(entry['train'])} train, {len(entry['test'])} test images")
  print(f"wrote {os.path.abspath(args.out)}")
  return 0


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", None, "output folder (MVTec layout)", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "every crop, defect and colour derives from it", flag_values=fv)
  flags.DEFINE_integer("size", 256, "side of the square images", flag_values=fv)
  flags.DEFINE_string("classes", ",".join(DEMO_CLASSES),
                      f"comma-separated subset of {','.join(DEMO_CLASSES)}", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace existing class folders", flag_values=fv)


def main(argv=None) -> int:
  return cli.run_flags(_main, _define, argv, prog="python -m inpformer_jax.data.demo",
                       doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
