"""Few-shot support set: k normal images per (dataset, class) chosen as the official script
chooses them (SPEC §6.3), each expanded 22x offline (SPEC §6.2).

The official `utils.augmentation` (RegAD's `aug_funcs`) turns one normalised shot image into

  [original,
   8 rotations by -pi/4, -3pi/16, -pi/8, -pi/16, pi/16, pi/8, 3pi/16, pi/4
     (F.affine_grid + F.grid_sample, bilinear, reflection padding, align_corners=False),
   8 translations by (0.2,0.2), (-0.2,0.2), (-0.2,-0.2), (0.2,-0.2), (0.1,0.1), (-0.1,0.1),
     (-0.1,-0.1), (0.1,-0.1) in [-1, 1] grid units (same sampler),
   horizontal flip (kornia hflip),
   greyscale of the NORMALISED tensor, 0.299 R + 0.587 G + 0.114 B, repeated to 3 channels,
   rotations by 90, 180, 270 degrees (kornia rotate: counter-clockwise as displayed, about
     ((W-1)/2, (H-1)/2), align_corners=True -- on a square image exactly np.rot90)]

then shuffles the 22 with torch.randperm; here the shuffle is a numpy permutation of `seed`.
The sampler below follows torch's CPU grid_sample kernel formula by formula. In float64 it
equals torch to 1e-10; in float32 it stays within 1e-4 of torch, whose own float32 grid
rounding depends on the CPU's vector width (see `affine_grid`).
"""

from __future__ import annotations

import math
import operator
import os
import random
from collections.abc import Sequence

import numpy as np

from inpformer_jax import errors
from inpformer_jax.data import preprocess
from inpformer_jax.data.records import Sample

NUM_AUGMENTED = 22
# The official order: -pi/4, -3pi/16, -pi/8, -pi/16, pi/16, pi/8, 3pi/16, pi/4.
ROTATION_ANGLES = (-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
                   math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4)
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2),
                (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # kornia rgb_to_grayscale (ITU-R BT.601)


class ShotsError(errors.UserError, ValueError):
  """config.few_shot.shots that the training split cannot supply (names the class and folder)."""


def select_shots(samples: Sequence[Sample], k: int, seed: int) -> list[Sample]:
  """k normal images per (dataset, class), the ones the official few-shot script takes.

  The official `INP_Former_Few_Shot.py` calls setup_seed(1) (Python's `random` seeded once per
  run, one dataset per run) and then, class by class, `random.sample(train_samples, k)`
  (SPEC §6.3). So here each dataset of `samples` gets its own `random.Random(seed)`, drawn from
  class by class in the order the classes first appear in `samples`; a class with n images
  takes `rng.sample(range(n), k)` over them in list order, shots in the order sample returns.
  The readers list classes in the official order and each class's training images in the
  official order (sorted paths of train/good as ImageFolder sorts; Real-IAD: the class JSON's
  `train` order), so with seed 1 the shots are the official ones.

  The choice for a class therefore depends on its dataset's earlier classes (their image
  counts, k and their order), not on other datasets: a class name present in two datasets
  (toothbrush in MVTec AD and Real-IAD) gets k shots in each.
  """
  try:
    k = operator.index(k)
  except TypeError:
    raise ShotsError(f"config.few_shot.shots={k!r}: must be an integer >= 1") from None
  if k <= 0:
    raise ShotsError(f"config.few_shot.shots={k}: must be >= 1")
  by_class: dict[tuple[str, str], list[Sample]] = {}
  for s in samples:
    by_class.setdefault((s.dataset, s.category), []).append(s)
  streams: dict[str, random.Random] = {}
  out = []
  for (dataset, category), group in by_class.items():
    if any(s.label != 0 for s in group):
      raise ValueError(f"few-shot images must be normal; class {category!r} has anomalous ones "
                       "(pass the train split)")
    if len(group) < k:
      folder = os.path.dirname(group[0].image_path)
      raise ShotsError(f"class {category!r} has {len(group)} normal training images (in "
                       f"{folder}), fewer than config.few_shot.shots={k}: pass "
                       f"--config.few_shot.shots={len(group)} or add images")
    rng = streams.setdefault(dataset, random.Random(seed))
    out.extend(group[i] for i in rng.sample(range(len(group)), k))
  return out


def affine_grid(theta: np.ndarray, height: int, width: int,
                dtype=np.float32) -> np.ndarray:
  """F.affine_grid(theta[None], (1, C, H, W), align_corners=False)[0]: (H, W, 2) as (x, y).

  Computed in float64 and rounded once to `dtype`. torch builds its base grid with a
  vectorised linspace whose float32 rounding depends on the CPU's vector width (AVX2 vs
  AVX-512), so no float32 formula matches it on every machine; the exact grid is within one
  float32 ulp of each of them.
  """
  theta = np.asarray(theta, np.float64)
  # linspace(-1, 1, n) * (n - 1) / n == (2 i + 1 - n) / n: pixel centres in [-1, 1] units.
  x = ((2 * np.arange(width) + 1 - width) / width)[None, :]
  y = ((2 * np.arange(height) + 1 - height) / height)[:, None]
  gx = x * theta[0, 0] + y * theta[0, 1] + theta[0, 2]
  gy = x * theta[1, 0] + y * theta[1, 1] + theta[1, 2]
  return np.stack(np.broadcast_arrays(gx, gy), axis=-1).astype(dtype)


def _reflect_clip(coord: np.ndarray, size: int) -> np.ndarray:
  """Unnormalise (align_corners=False), reflect about -0.5 and size-0.5, clip to [0, size-1].

  The order of operations is torch's vectorised CPU kernel (ComputeLocationBase<false>).
  """
  f = coord.dtype.type
  x = (coord + f(1)) * f(size / 2) - f(0.5)
  twice_span = f(2 * size)
  a = np.abs(x - f(-0.5))
  extra = a - np.trunc(a / twice_span) * twice_span
  x = np.minimum(extra, twice_span - extra) + f(-0.5)
  return np.clip(x, f(0), f(size - 1))


def grid_sample(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """F.grid_sample(bilinear, padding_mode='reflection', align_corners=False) of one image.

  image: (H, W, C); grid: (Ho, Wo, 2) with (x, y) in [-1, 1] -> (Ho, Wo, C), image's dtype.
  """
  h, w = image.shape[:2]
  dt = image.dtype
  x = _reflect_clip(grid[..., 0].astype(dt), w)
  y = _reflect_clip(grid[..., 1].astype(dt), h)
  x0, y0 = np.floor(x), np.floor(y)
  dw, dn = x - x0, y - y0  # distances to the west / north neighbours
  de, ds = 1 - dw, 1 - dn
  x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
  x1, y1 = x0 + 1, y0 + 1
  # After clipping only the east/south neighbour can fall outside, and then its weight is 0;
  # torch reads it as 0, so clamp the index and zero the weight.
  ok_e, ok_s = x1 < w, y1 < h
  x1, y1 = np.minimum(x1, w - 1), np.minimum(y1, h - 1)
  nw, ne = ds * de, np.where(ok_e, ds * dw, 0).astype(dt)
  sw, se = np.where(ok_s, dn * de, 0).astype(dt), np.where(ok_e & ok_s, dn * dw, 0).astype(dt)
  out = (image[y0, x0] * nw[..., None] + image[y0, x1] * ne[..., None]
         + image[y1, x0] * sw[..., None] + image[y1, x1] * se[..., None])
  return out.astype(dt)


def rotate(image: np.ndarray, theta: float) -> np.ndarray:
  """Official rot_img: sample at [[cos, -sin, 0], [sin, cos, 0]] @ (x, y, 1). image (H, W, C)."""
  # get_rot_mat: torch.tensor(theta) is float32, so cos/sin are of the float32 angle
  # (torch rounds them correctly; numpy's float32 cos can be 1 ulp off, hence math.cos).
  t = float(np.float32(theta)) if image.dtype == np.float32 else theta
  c, s = math.cos(t), math.sin(t)
  mat = np.array([[c, -s, 0], [s, c, 0]], image.dtype)
  return grid_sample(image, affine_grid(mat, *image.shape[:2], dtype=image.dtype))


def translate(image: np.ndarray, a: float, b: float) -> np.ndarray:
  """Official translation_img: sample at (x + a, y + b) in [-1, 1] units. image (H, W, C)."""
  mat = np.array([[1, 0, a], [0, 1, b]], image.dtype)  # torch.tensor([[1, 0, a], ...]): float32
  return grid_sample(image, affine_grid(mat, *image.shape[:2], dtype=image.dtype))


def grey(image: np.ndarray) -> np.ndarray:
  """kornia rgb_to_grayscale on float input, repeated to 3 channels. image (H, W, 3)."""
  wr, wg, wb = (image.dtype.type(v) for v in GREY_WEIGHTS)
  g = image[..., 0] * wr
  g = g + image[..., 1] * wg
  g = g + image[..., 2] * wb
  return np.repeat(g[..., None], 3, axis=-1)


def rot90(image: np.ndarray, quarter_turns: int) -> np.ndarray:
  """kornia rotate by 90*k degrees (counter-clockwise as displayed). image (H, W, C), square."""
  if image.shape[0] != image.shape[1]:
    # kornia keeps the shape and fills with reflection; the official images are square crops.
    raise ValueError(f"rot90 expects a square image, got {image.shape[:2]}")
  return np.ascontiguousarray(np.rot90(image, k=quarter_turns, axes=(0, 1)))


def augment_one(image: np.ndarray, index: int) -> np.ndarray:
  """The index-th (0..21, official order) augmentation of one normalised (H, W, 3) image.

  Lets a pipeline build the 22 x k support set lazily, one element at a time.
  """
  if not 0 <= index < NUM_AUGMENTED:
    raise ValueError(f"augmentation index must be in [0, {NUM_AUGMENTED}), got {index}")
  if index == 0:
    return image
  if index <= 8:
    return rotate(image, ROTATION_ANGLES[index - 1])
  if index <= 16:
    return translate(image, *TRANSLATIONS[index - 9])
  if index == 17:
    return np.ascontiguousarray(image[:, ::-1])  # kornia hflip
  if index == 18:
    return grey(image)
  return rot90(image, index - 18)  # 19, 20, 21 -> 90, 180, 270 degrees


def augment_22(image: np.ndarray, seed: int | None = 0, *, layout: str = "hwc") -> np.ndarray:
  """One normalised image -> its 22 official augmentations, (22, ...) in the same layout.

  Computed in float32 (float64 if the input is float64, which the tests use to check the
  formulas against torch to 1e-10).

  image: (H, W, 3) for layout 'hwc' (this project's NHWC) or (3, H, W) for 'chw'.
  seed: permutation seed (the official code shuffles with torch.randperm); None keeps the
    official order [original, rotations, translations, hflip, grey, rot90 x3].
  """
  if layout not in ("hwc", "chw"):
    raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
  x = np.asarray(image)
  x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
  if layout == "chw":
    x = x.transpose(1, 2, 0)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"expected one RGB image ({layout}), got shape {np.shape(image)}")
  out = np.stack([augment_one(x, i) for i in range(NUM_AUGMENTED)])
  if seed is not None:
    out = out[np.random.default_rng(seed).permutation(len(out))]
  if layout == "chw":
    out = out.transpose(0, 3, 1, 2)
  return np.ascontiguousarray(out)


def support_set(shots: Sequence[Sample], preprocessing: preprocess.Preprocessing, *,
                seed: int, augment: bool = True) -> np.ndarray:
  """The few-shot training set: each shot expanded 22x (shot i's copies permuted with seed
  + i), or the shots alone (augment=False). float32 (22 k, crop, crop, 3), shot by shot."""
  if not shots:
    raise ValueError("no few-shot images: select them with fewshot.select_shots")
  return expand_shots([preprocessing.image(s.image_path) for s in shots], seed=seed,
                      augment=augment)


def expand_shots(images: Sequence[np.ndarray], *, seed: int, augment: bool = True
                 ) -> np.ndarray:
  """Finished float32 (crop, crop, 3) shot images -> the support set of `support_set`."""
  if not len(images):
    raise ValueError("no few-shot images: select them with fewshot.select_shots")
  return np.concatenate([augment_22(img, seed=seed + i) if augment else img[None]
                         for i, img in enumerate(images)]).astype(np.float32)
