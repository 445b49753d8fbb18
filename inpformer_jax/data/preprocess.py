"""Image and mask preprocessing, identical to the official transforms (SPEC §6.1).

The official `dataset.py::get_data_transforms(448, 392)` is

  image: PIL .convert('RGB') -> Resize((448, 448)) (PIL BILINEAR, with PIL's antialias)
         -> ToTensor (/255) -> CenterCrop(392) -> Normalize(ImageNet mean, std)
  mask:  PIL Resize((448, 448)) of the mask as opened (BILINEAR too, so 'L' masks get soft
         edges; PIL itself resizes '1' and 'P' NEAREST) -> ToTensor -> CenterCrop

The resize is done by PIL itself (not re-implemented), so the uint8 pixels are PIL's. Cropping
commutes with the elementwise /255 and normalisation, and the float32 arithmetic follows
torchvision's order ((x / 255 - mean) / std), so the results equal the torch pipeline bit for bit.

Two entry points produce the same arrays:
  * `load_image(path, resize, crop)` -- from the original file;
  * `resize_pil_only(path, resize)` (stored, e.g. in ArrayRecord shards) followed later by
    `finish_from_resized(uint8, crop)`.
`load_image` is literally the composition of the two, so both paths are bit-identical.

Layout is NHWC: an image is float32 (crop, crop, 3); a mask is float32 (crop, crop) in [0, 1],
kept soft -- the evaluation decides the binarisation (> 0.5 official, > 0 paper era); a
multi-band mask is stored as its maximum band (see `resize_mask_pil_only`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image, ImageMode

from inpformer_jax import errors

# torchvision's ImageNet statistics; the pipeline applies them in float32 as torch does.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
IMAGENET_MEAN = np.array(IMAGENET_MEAN_RGB, np.float32)
IMAGENET_STD = np.array(IMAGENET_STD_RGB, np.float32)
# numpy type strings of the PIL modes whose bands are single bytes ('1' is read as bool).
_BYTE_PIXELS = ("|u1", "|b1")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(errors.UserError, OSError):
  """An image or mask file that PIL cannot decode (the message names the file)."""


def _open(path: str | os.PathLike, what: str) -> Image.Image:
  try:
    img = Image.open(path)
    img.load()
  except FileNotFoundError as e:
    raise ImageReadError(f"{what} file not found: {path}") from e
  except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...).
    raise ImageReadError(
        f"cannot read {what} {path}: {type(e).__name__}: {e}. Replace or delete the file "
        "(a truncated download or a non-image file with an image extension?)") from e
  return img


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
  """Top/left offsets exactly as torchvision CenterCrop: int(round((size - crop) / 2))."""
  if crop > height or crop > width:
    # torchvision would zero-pad; the official sizes never need it, so treat it as a config error.
    raise ValueError(f"crop {crop} is larger than the resized image {height}x{width}; "
                     "set the config's crop size <= its resize size")
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _center_crop(x: np.ndarray, crop: int) -> np.ndarray:
  top, left = center_crop_offsets(x.shape[0], x.shape[1], crop)
  return x[top:top + crop, left:left + crop]


def _pil_resize(img: Image.Image, size: int) -> Image.Image:
  # torchvision.transforms.Resize((s, s)) on a PIL image calls img.resize((s, s), BILINEAR);
  # PIL's bilinear filter widens its support when downscaling (antialias).
  return img.resize((size, size), Image.Resampling.BILINEAR)


def resize_pil_only(path_or_img, size: int) -> np.ndarray:
  """RGB image resized by PIL to (size, size): uint8 (size, size, 3).

  This is the part of the pipeline that can be precomputed and stored (the other part is
  `finish_from_resized`).
  """
  img = path_or_img if isinstance(path_or_img, Image.Image) else _open(path_or_img, "image")
  # PIL's own convert to the same mode and resize to the same size are copies: skipped.
  if img.mode != "RGB":
    img = img.convert("RGB")
  if img.size != (size, size):
    img = _pil_resize(img, size)
  return np.asarray(img, dtype=np.uint8)


def finish_from_resized(resized: np.ndarray, crop: int) -> np.ndarray:
  """uint8 (R, R, 3) from `resize_pil_only` -> normalised float32 (crop, crop, 3)."""
  if resized.dtype != np.uint8 or resized.ndim != 3 or resized.shape[-1] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {resized.dtype} {resized.shape}")
  x = _center_crop(resized, crop).astype(np.float32)
  # torchvision: ToTensor does img.float().div(255); Normalize does sub_(mean).div_(std),
  # all in float32. In place, on rows with the statistics tiled along them: broadcasting
  # (3,) against the last axis runs NumPy's inner loop 3 elements at a time (4x slower).
  rows = x.reshape(x.shape[0], -1)
  np.divide(rows, np.float32(255), out=rows)
  np.subtract(rows, np.tile(IMAGENET_MEAN, x.shape[1]), out=rows)
  np.divide(rows, np.tile(IMAGENET_STD, x.shape[1]), out=rows)
  return x


def preprocess_pil(img: Image.Image, resize: int = 448, crop: int = 392) -> np.ndarray:
  """A PIL image (any mode) -> normalised float32 (crop, crop, 3)."""
  return finish_from_resized(resize_pil_only(img, resize), crop)


def load_image(path: str | os.PathLike, resize: int = 448, crop: int = 392) -> np.ndarray:
  """Image file -> normalised float32 (crop, crop, 3), as the official test/train transform."""
  return finish_from_resized(resize_pil_only(path, resize), crop)


def _mask_tensor_bytes(resized: Image.Image, mode: str) -> np.ndarray:
  """torchvision to_tensor's values of a resized mask, as uint8 (H, W[, C]) before the /255.

  to_tensor (pytorch/vision torchvision/transforms/functional.py) reads
  np.array(pic, np.uint8) -- the mode's raw bytes: palette INDICES for 'P', one channel per band
  for 'LA' / 'RGB' -- and multiplies mode '1' (0/1) by 255.
  """
  x = np.asarray(resized, dtype=np.uint8)
  return x * np.uint8(255) if mode == "1" else x


def resize_mask_pil_only(path_or_img, size: int) -> np.ndarray:
  """Mask read as the official gt transform reads it, resized by PIL: uint8 (size, size).

  Official: Image.open(gt) (no convert) -> Resize((s, s)) (img.resize(..., BILINEAR): PIL
  itself resizes modes '1' and 'P' NEAREST, and 'LA' / 'RGBA' bilinearly with premultiplied
  alpha) -> ToTensor (raw bytes / 255, see `_mask_tensor_bytes`). The evaluation then
  binarises each channel (> 0.5, or > 0 in the paper era) and max-reduces the channels (SPEC
  §7.1 step 4). Both thresholds commute with a max over channels, so a multi-band mask is
  stored as its per-pixel maximum band: the binarised ground truth is the official one for
  every 8-bit mode ('1', 'P', 'L', 'LA', 'RGB', 'RGBA', ...). A 'P' mask is thus positive
  where its palette index is >= 128 (not where its colour is bright), and an 'LA' / 'RGBA'
  mask wherever its alpha is >= 128, whatever its grey level -- as in the official code. Modes
  with wider pixels ('I', 'I;16', 'F'), which to_tensor would not divide by 255, are converted
  to 'L' first.
  """
  img = path_or_img if isinstance(path_or_img, Image.Image) else _open(path_or_img, "mask")
  if ImageMode.getmode(img.mode).typestr not in _BYTE_PIXELS:
    img = img.convert("L")
  x = _mask_tensor_bytes(_pil_resize(img, size), img.mode)
  return x.max(axis=-1) if x.ndim == 3 else x


def finish_mask_from_resized(resized: np.ndarray, crop: int) -> np.ndarray:
  """uint8 (R, R) from `resize_mask_pil_only` -> float32 (crop, crop) in [0, 1] (soft)."""
  if resized.dtype != np.uint8 or resized.ndim != 2:
    raise ValueError(f"expected a uint8 (H, W) mask, got {resized.dtype} {resized.shape}")
  return _center_crop(resized, crop).astype(np.float32) / np.float32(255)


def load_mask(path: str | os.PathLike | None, resize: int = 448, crop: int = 392) -> np.ndarray:
  """Mask file -> float32 (crop, crop) in [0, 1]; None (a normal image) -> zeros."""
  if path is None:
    return np.zeros((crop, crop), np.float32)
  return finish_mask_from_resized(resize_mask_pil_only(path, resize), crop)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """(width, height) from the file header, without decoding the pixels."""
  try:
    with Image.open(path) as img:
      return img.size
  except FileNotFoundError as e:
    raise ImageReadError(f"file not found: {path}") from e
  except Exception as e:
    raise ImageReadError(f"cannot read the header of {path}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The sizes a model was trained with: PIL resize to `resize`, centre crop to `crop`."""
  resize: int = 448
  crop: int = 392

  def image(self, path: str | os.PathLike) -> np.ndarray:
    return load_image(path, self.resize, self.crop)

  def mask(self, path: str | os.PathLike | None) -> np.ndarray:
    return load_mask(path, self.resize, self.crop)

