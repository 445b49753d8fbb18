"""Preprocessing equals a PIL-free, torchvision-free reference written here in numpy (masks:
equal to the official transforms restated with PIL and torch calls)."""

import numpy as np
import pytest
import torch
from PIL import Image

from inpformer_jax.data import preprocess

# Pillow's libImaging/Resample.c for 8-bit images: weights of a triangle filter whose support
# grows with the downscale factor (the antialias), normalised, then turned into 22-bit fixed
# point; a horizontal pass into an 8-bit buffer, then a vertical pass, each rounding
# (acc + 2^21) >> 22 and clipping to 0..255.
PRECISION_BITS = 32 - 8 - 2


def _coeffs(in_size, out_size):
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale  # bilinear filter support is 1
  bounds, weights = [], []
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size) - xmin
    w = np.array([max(0.0, 1.0 - abs((x + xmin - center + 0.5) / filterscale))
                  for x in range(xmax)])
    w = w / w.sum() if w.sum() != 0 else w
    k = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)),
                 np.trunc(0.5 + w * (1 << PRECISION_BITS))).astype(np.int64)
    bounds.append((xmin, xmax))
    weights.append(k)
  return bounds, weights


def _pass(img, out_size, axis):
  """Resamples uint8 img (H, W, C) along axis (1 horizontal, 0 vertical) in fixed point."""
  bounds, weights = _coeffs(img.shape[axis], out_size)
  img = np.moveaxis(img.astype(np.int64), axis, 0)
  out = np.empty((out_size,) + img.shape[1:], np.uint8)
  for i, ((xmin, n), k) in enumerate(zip(bounds, weights, strict=True)):
    acc = (1 << (PRECISION_BITS - 1)) + np.tensordot(k, img[xmin:xmin + n], axes=(0, 0))
    out[i] = np.clip(acc >> PRECISION_BITS, 0, 255)
  return np.moveaxis(out, 0, axis)


def pil_bilinear_reference(img, size):
  """uint8 (H, W, C) -> (size, size, C) as PIL Image.resize((size, size), BILINEAR)."""
  out = img
  if img.shape[1] != size:
    out = _pass(out, size, axis=1)
  if img.shape[0] != size:
    out = _pass(out, size, axis=0)
  return out


def _random_photo(h, w, seed=0):
  # Smooth structure plus noise plus hard edges, so every rounding path is exercised.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = 128 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 11.0)[..., None] * [1, -1, 0.5]
  base = base + rng.normal(0, 30, (h, w, 3))
  base[h // 3:h // 2, w // 4:w // 2] = [255, 0, 40]
  return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hw,size", [((300, 451), 448), ((512, 512), 448), ((700, 640), 448),
                                     ((97, 130), 64), ((64, 64), 64), ((50, 40), 448)])
def test_pil_resize_equals_numpy_fixed_point_reference(hw, size):
  img = _random_photo(*hw)
  ours = preprocess.resize_pil_only(Image.fromarray(img), size)
  ref = pil_bilinear_reference(img, size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
  np.testing.assert_array_equal(ours, ref)  # exact: the reference models PIL's fixed point


def test_crop_offsets_match_torchvision_center_crop():
  # torchvision: top = int(round((h - crop) / 2)); Python rounds halves to even.
  assert preprocess.center_crop_offsets(448, 448, 392) == (28, 28)
  assert preprocess.center_crop_offsets(225, 224, 224) == (0, 0)  # round(0.5) = 0
  assert preprocess.center_crop_offsets(227, 230, 224) == (2, 3)  # round(1.5)=2, round(3)=3
  with pytest.raises(ValueError, match="crop"):
    preprocess.center_crop_offsets(200, 200, 224)


def test_load_image_matches_reference_pipeline(tmp_path):
  img = _random_photo(300, 451, seed=1)
  path = tmp_path / "a.png"
  Image.fromarray(img).save(path)
  ours = preprocess.load_image(path, resize=448, crop=392)
  resized = pil_bilinear_reference(img, 448)[28:420, 28:420].astype(np.float32)
  mean = np.float32([0.485, 0.456, 0.406])
  std = np.float32([0.229, 0.224, 0.225])
  ref = (resized / np.float32(255) - mean) / std
  assert ours.shape == (392, 392, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)


def test_grey_and_rgba_images_are_converted_to_rgb(tmp_path):
  grey = _random_photo(80, 90)[..., 0]
  Image.fromarray(grey).save(tmp_path / "g.png")
  out = preprocess.load_image(tmp_path / "g.png", 64, 56)
  assert out.shape == (56, 56, 3)
  # the three channels hold the same grey level before normalisation
  unnorm = out * preprocess.IMAGENET_STD + preprocess.IMAGENET_MEAN
  np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 1], atol=1e-6)
  np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 2], atol=1e-6)
  rgba = np.dstack([_random_photo(80, 90), np.full((80, 90), 255, np.uint8)])
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(preprocess.load_image(tmp_path / "a.png", 64, 56),
                                preprocess.load_image(tmp_path / "rgb.png", 64, 56))


def test_resized_path_is_bit_identical_to_direct_path(tmp_path):
  img = _random_photo(333, 257, seed=2)
  path = tmp_path / "b.jpg"
  Image.fromarray(img).save(path, quality=90)
  direct = preprocess.load_image(path, 448, 392)
  stored = preprocess.resize_pil_only(path, 448)
  stored = np.frombuffer(stored.tobytes(), np.uint8).reshape(stored.shape)  # a round trip
  np.testing.assert_array_equal(preprocess.finish_from_resized(stored, 392), direct)
  mask = (_random_photo(333, 257, seed=3)[..., 0] > 128).astype(np.uint8) * 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  np.testing.assert_array_equal(
      preprocess.finish_mask_from_resized(preprocess.resize_mask_pil_only(tmp_path / "m.png", 448),
                                          392),
      preprocess.load_mask(tmp_path / "m.png", 448, 392))


def test_mask_is_resized_bilinear_and_kept_soft(tmp_path):
  mask = np.zeros((100, 100), np.uint8)
  mask[30:61, 40:75] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  out = preprocess.load_mask(tmp_path / "m.png", resize=64, crop=56)
  ref = pil_bilinear_reference(mask[..., None], 64)[4:60, 4:60, 0].astype(np.float32) / 255
  assert out.dtype == np.float32 and out.shape == (56, 56)
  np.testing.assert_array_equal(out, ref)
  assert ((out > 0) & (out < 1)).any()  # soft edges, as the official bilinear gt transform
  assert out.min() == 0 and out.max() == 1
  np.testing.assert_array_equal(preprocess.load_mask(None, 64, 56), np.zeros((56, 56)))


def test_binary_mode_mask_becomes_grey_levels(tmp_path):
  mask = np.zeros((40, 40), bool)
  mask[10:30, 10:30] = True
  Image.fromarray(mask).convert("1").save(tmp_path / "m1.png")
  out = preprocess.load_mask(tmp_path / "m1.png", 40, 40)
  np.testing.assert_array_equal(out, mask.astype(np.float32))


def test_unreadable_image_names_the_file(tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  with pytest.raises(preprocess.ImageReadError, match="broken.png"):
    preprocess.load_image(bad, 64, 56)
  with pytest.raises(preprocess.ImageReadError, match="missing.png"):
    preprocess.load_mask(tmp_path / "missing.png", 64, 56)


def test_normalisation_equals_torchvision_tensor_ops():
  # torchvision (not importable beside this torch) does, for a PIL image after Resize:
  #   ToTensor: torch.from_numpy(np.array(pic)).permute(2, 0, 1).contiguous().float().div(255)
  #   CenterCrop on the tensor, then Normalize: tensor.sub_(mean[:, None, None]).div_(std[...])
  resized = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
  t = torch.from_numpy(resized).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
  t = t[:, 28:420, 28:420]
  mean = torch.as_tensor([0.485, 0.456, 0.406], dtype=torch.float32)
  std = torch.as_tensor([0.229, 0.224, 0.225], dtype=torch.float32)
  t = t.sub(mean[:, None, None]).div(std[:, None, None])
  np.testing.assert_array_equal(preprocess.finish_from_resized(resized, 392),
                                t.permute(1, 2, 0).numpy())


def test_preprocessing_equals_load_image_and_load_mask(tmp_path):
  assert (preprocess.Preprocessing().resize, preprocess.Preprocessing().crop) == (448, 392)
  Image.fromarray(_random_photo(97, 130, seed=4)).save(tmp_path / "i.png")
  mask = (_random_photo(97, 130, seed=5)[..., 0] > 128).astype(np.uint8) * 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  p = preprocess.Preprocessing(resize=64, crop=56)
  image = p.image(tmp_path / "i.png")
  assert image.shape == (56, 56, 3) and image.dtype == np.float32
  np.testing.assert_array_equal(image, preprocess.load_image(tmp_path / "i.png", 64, 56))
  np.testing.assert_array_equal(p.mask(tmp_path / "m.png"),
                                preprocess.load_mask(tmp_path / "m.png", 64, 56))
  np.testing.assert_array_equal(p.mask(None), np.zeros((56, 56), np.float32))


def _mask_in_mode(mode, w=700, h=523):
  """A mask in `mode` with boxes, a ramp and noise, so that resizing interpolates."""
  rng = np.random.default_rng(len(mode))
  yy, xx = np.mgrid[:h, :w]
  box = ((yy > 100) & (yy < 300) & (xx > 150) & (xx < 420)) | (rng.random((h, w)) > 0.97)
  ramp = (xx * 255 // (w - 1)).astype(np.uint8)
  if mode == "1":
    return Image.fromarray(box).convert("1")
  if mode == "L":
    return Image.fromarray(np.where(box, 255, ramp // 3).astype(np.uint8), "L")
  if mode == "P":
    # indices >= 128 count in the official pipeline, whatever their colour: index 1 is white,
    # index 200 black, 127 and 130 grey.
    idx = np.select([box, xx < 200, xx < 400], [200, 1, 127], 130).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    palette = np.zeros((256, 3), np.uint8)
    palette[1], palette[127], palette[130] = 255, 128, 127
    img.putpalette(palette.ravel().tolist())
    return img
  alpha = np.select([xx < 100, xx < 250], [0, 100], 255).astype(np.uint8)
  if mode == "LA":
    return Image.fromarray(np.dstack([np.where(box, 255, 0).astype(np.uint8), alpha]), "LA")
  assert mode == "RGB"
  other = (yy > 350) & (xx > 500)
  return Image.fromarray(np.dstack([np.where(box, 255, 0), np.where(other, 200, 0), ramp // 2])
                         .astype(np.uint8), "RGB")


def _official_gt(path, resize, crop, threshold):
  """The official gt transform and evaluation, restated with PIL and torch calls.

  torchvision Resize((s, s)) on a PIL image: img.resize((s, s), BILINEAR)
  (transforms/_functional_pil.py::resize); CenterCrop on PIL: img.crop at int(round((s - c)
  / 2)); ToTensor (transforms/functional.py::to_tensor): np.array(pic, np.uint8), times 255
  for mode '1', viewed (H, W, len(bands)), permuted to CHW, float / 255. Evaluation (utils.py
  evaluation_batch): nearest resize to 256, gt > 0.5 (or gt.bool()), max over channels.
  """
  pic = Image.open(path)
  pic = pic.resize((resize, resize), Image.BILINEAR)
  top = round((resize - crop) / 2.0)
  pic = pic.crop((top, top, top + crop, top + crop))
  t = torch.from_numpy(np.array(pic, np.uint8, copy=True))
  if pic.mode == "1":
    t = 255 * t
  t = t.view(pic.size[1], pic.size[0], len(pic.getbands())).permute(2, 0, 1).contiguous()
  gt = torch.nn.functional.interpolate(t.to(torch.float32).div(255)[None], size=256,
                                       mode="nearest")
  return (gt > threshold).max(dim=1).values[0].numpy()


@pytest.mark.parametrize("mode", ["1", "P", "L", "LA", "RGB"])
def test_binarised_mask_is_the_official_one_in_every_mode(tmp_path, mode):
  path = tmp_path / f"m_{mode}.png"
  _mask_in_mode(mode).save(path)
  assert Image.open(path).mode == mode
  ours = torch.from_numpy(preprocess.load_mask(path, 448, 392))[None, None]
  ours = torch.nn.functional.interpolate(ours, size=256, mode="nearest")[0, 0].numpy()
  for threshold in (0.5, 0.0):  # official, paper era
    want = _official_gt(path, 448, 392, threshold)
    np.testing.assert_array_equal(ours > threshold, want)
  assert want.any() and not _official_gt(path, 448, 392, 0.5).all()
