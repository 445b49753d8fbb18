"""Few-shot selection and the 22 official augmentations, checked against torch references.

The references below are the official functions (utils.py / RegAD aug_funcs) restated with
torch.nn.functional; kornia's rotate is restated from its source (pixel-space rotation matrix
about ((W-1)/2, (H-1)/2), normalised for align_corners=True, inverted, then affine_grid +
grid_sample) since kornia is not a dependency.
"""

import json
import math
import os
import random

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from inpformer_jax.data import fewshot, preprocess, readers, sources
from inpformer_jax.data.records import Sample
from tests.data.helpers import CROP, RESIZE, take, train, write_samples


def _sample(x, mat, align_corners=False):
  grid = F.affine_grid(mat[None], list(x.shape), align_corners=align_corners)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                       align_corners=align_corners)


def _rot_mat(theta, dtype):
  t = torch.tensor(theta, dtype=dtype)  # official: torch.tensor(theta) -> float32
  return torch.stack([torch.stack([torch.cos(t), -torch.sin(t), torch.zeros_like(t)]),
                      torch.stack([torch.sin(t), torch.cos(t), torch.zeros_like(t)])])


def _kornia_rotate(x, degrees):
  """kornia.geometry.transform.rotate(x, angle, padding_mode='reflection'), restated."""
  _, _, h, w = x.shape
  a = torch.deg2rad(torch.tensor(degrees, dtype=x.dtype))
  cx, cy = (w - 1) / 2, (h - 1) / 2
  alpha, beta = torch.cos(a), torch.sin(a)
  m = torch.tensor([[alpha, beta, (1 - alpha) * cx - beta * cy],
                    [-beta, alpha, beta * cx + (1 - alpha) * cy],
                    [0, 0, 1]], dtype=x.dtype)  # dst = M @ src, pixel coordinates
  n_w = torch.tensor([[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]], dtype=x.dtype)
  dst_from_src = n_w @ m @ torch.linalg.inv(n_w)
  src_from_dst = torch.linalg.inv(dst_from_src)
  return _sample(x, src_from_dst[:2], align_corners=True)


def official_augment(x):
  """(1, 3, H, W) -> (22, 3, H, W) in the official order, before the shuffle."""
  outs = [x]
  outs += [_sample(x, _rot_mat(t, x.dtype)) for t in fewshot.ROTATION_ANGLES]
  outs += [_sample(x, torch.tensor([[1, 0, a], [0, 1, b]], dtype=x.dtype))
           for a, b in fewshot.TRANSLATIONS]
  outs.append(torch.flip(x, [-1]))  # kornia hflip
  g = x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114  # kornia rgb_to_grayscale
  outs.append(g.repeat(1, 3, 1, 1))
  outs += [_kornia_rotate(x, d) for d in (90.0, 180.0, 270.0)]
  return torch.cat(outs)


@pytest.fixture(scope="module")
def shot_image():
  # A real photograph (scikit-image's astronaut, public domain), preprocessed as a shot is.
  return preprocess.preprocess_pil(Image.fromarray(skimage.data.astronaut()), RESIZE, CROP)


def test_official_order_and_angles():
  assert len(fewshot.ROTATION_ANGLES) == 8 and len(fewshot.TRANSLATIONS) == 8
  np.testing.assert_allclose(
      fewshot.ROTATION_ANGLES,
      [-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8,
       3 * math.pi / 16, math.pi / 4])


def test_formulas_equal_torch_in_float64(shot_image):
  x = torch.from_numpy(shot_image.astype(np.float64).transpose(2, 0, 1)[None].copy())
  ref = official_augment(x).numpy()
  ours = fewshot.augment_22(shot_image.astype(np.float64).transpose(2, 0, 1), seed=None,
                            layout="chw")
  assert ours.shape == (22, 3, 56, 56) and ours.dtype == np.float64
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)


def test_float32_matches_official_float32(shot_image):
  x = torch.from_numpy(shot_image.transpose(2, 0, 1)[None].copy())
  ref = official_augment(x).numpy().transpose(0, 2, 3, 1)
  ours = fewshot.augment_22(shot_image, seed=None)
  assert ours.shape == (22, 56, 56, 3) and ours.dtype == np.float32
  # Copy, flip and grey are computed the same way: equal up to float32 summation order.
  np.testing.assert_allclose(ours[[0, 17, 18]], ref[[0, 17, 18]], rtol=0, atol=1e-6)
  # Resampled ones: torch builds its float32 grid with a vectorised linspace whose rounding
  # depends on the CPU vector width; a 1-ulp grid difference times a sharp edge of the
  # normalised image (~4 per pixel) reaches a few 1e-5. Ours uses the exactly rounded grid
  # (equal to torch in float64 above, to 1e-10). Likewise kornia's 90-degree turns in float32
  # (cos(pi/2) = -4e-8, a float32 matrix inverse) sample ~1e-5 px away from the pixel centres
  # that np.rot90 copies exactly.
  err = np.abs(ours[1:] - ref[1:])
  assert err.max() < 1e-4, err.max()
  assert err.mean() < 2e-6, err.mean()


def test_shuffle_is_a_seeded_permutation(shot_image):
  plain = fewshot.augment_22(shot_image, seed=None)
  a, b = fewshot.augment_22(shot_image, seed=3), fewshot.augment_22(shot_image, seed=3)
  np.testing.assert_array_equal(a, b)
  perm = np.random.default_rng(3).permutation(22)
  np.testing.assert_array_equal(a, plain[perm])
  assert not np.array_equal(a, fewshot.augment_22(shot_image, seed=4))


def test_layout_checks(shot_image):
  with pytest.raises(ValueError, match="RGB"):
    fewshot.augment_22(shot_image[..., :2])
  with pytest.raises(ValueError, match="square"):
    fewshot.augment_22(shot_image[:50])


def _samples(n_per_class, classes=("a", "b", "c")):
  return [Sample(f"/d/{c}/train/good/{i:03d}.png", None, 0, "mvtec", c)
          for c in classes for i in range(n_per_class)]


# MVTec AD's classes in the official few-shot script's order, with their train/good counts.
MVTEC_TRAIN_COUNTS = {
    "carpet": 280, "grid": 264, "leather": 245, "tile": 230, "wood": 247, "bottle": 209,
    "cable": 224, "capsule": 219, "hazelnut": 391, "metal_nut": 220, "pill": 267, "screw": 320,
    "toothbrush": 60, "transistor": 213, "zipper": 240,
}
# A few Real-IAD classes (official order), each JSON's `train` list deliberately unsorted.
REALIAD_TRAIN_COUNTS = {"audiojack": 23, "toothbrush": 31, "zipper": 17}
# torchvision.datasets.folder.IMG_EXTENSIONS, which ImageFolder keeps (case-insensitively).
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")


@pytest.fixture(scope="module")
def mvtec_train_tree(tmp_path_factory):
  """MVTec AD train/good folders with the real class names and counts (empty files: the train
  reader lists names only)."""
  root = tmp_path_factory.mktemp("mvtec")
  for c, n in MVTEC_TRAIN_COUNTS.items():
    good = root / c / "train" / "good"
    good.mkdir(parents=True)
    for i in np.random.default_rng(len(c)).permutation(n):  # creation order is not list order
      (good / f"{i:03d}.png").touch()
  return str(root), readers.read_dataset("mvtec", str(root), split="train")


@pytest.fixture(scope="module")
def realiad_train_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("realiad")
  for c, n in REALIAD_TRAIN_COUNTS.items():
    items = []
    for i in np.random.default_rng(n).permutation(n):
      rel = f"OK/S{i:04d}/{c}_{i:04d}_OK_C1_2023.jpg"
      (root / "realiad_1024" / c / rel).parent.mkdir(parents=True, exist_ok=True)
      (root / "realiad_1024" / c / rel).touch()
      items.append({"category": c, "anomaly_class": "OK", "image_path": rel, "mask_path": None})
    (root / "realiad_jsons" / "realiad_jsons").mkdir(parents=True, exist_ok=True)
    with open(root / "realiad_jsons" / "realiad_jsons" / f"{c}.json", "w") as f:
      json.dump({"meta": {"prefix": c}, "train": items, "test": []}, f)
  return str(root), readers.read_dataset("realiad", str(root), list(REALIAD_TRAIN_COUNTS),
                                         split="train")


def _image_folder_samples(train_dir):
  """torchvision ImageFolder(train_dir).samples: (path, class index), classes and files
  sorted (datasets/folder.py: find_classes, make_dataset)."""
  classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
  samples = []
  for idx, c in enumerate(classes):
    for root, _, names in sorted(os.walk(os.path.join(train_dir, c), followlinks=True)):
      samples += [(os.path.join(root, n), idx) for n in sorted(names)
                  if n.lower().endswith(IMAGEFOLDER_EXTENSIONS)]
  return samples


def _official_shots(populations, k):
  """INP_Former_Few_Shot.py: setup_seed(1) (random.seed(1)), then per class in order
  `random.sample(population, k)`. populations: class -> that class's training list."""
  state = random.getstate()
  try:
    random.seed(1)
    return {c: random.sample(pop, k) for c, pop in populations.items()}
  finally:
    random.setstate(state)


def _official_mvtec(root, k):
  pops = {c: _image_folder_samples(os.path.join(root, c, "train")) for c in MVTEC_TRAIN_COUNTS}
  return [os.path.abspath(path) for shots in _official_shots(pops, k).values()
          for path, _ in shots]


def _official_realiad(root, k):
  """RealIADDataset(phase='train'): the class JSON's train entries, in file order."""
  pops = {}
  for c in REALIAD_TRAIN_COUNTS:
    with open(os.path.join(root, "realiad_jsons", "realiad_jsons", f"{c}.json")) as f:
      pops[c] = [os.path.join(root, "realiad_1024", c, item["image_path"])
                 for item in json.load(f)["train"]]
  return [os.path.abspath(p) for shots in _official_shots(pops, k).values() for p in shots]


def _paths(shots):
  return [s.image_path for s in shots]


def _indices(shots):
  return [int(os.path.basename(p)[:3]) for p in _paths(shots)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_select_shots_is_the_official_selection(mvtec_train_tree, realiad_train_tree, k):
  (mvtec_root, mvtec), (realiad_root, realiad) = mvtec_train_tree, realiad_train_tree
  assert list(dict.fromkeys(s.category for s in mvtec)) == list(readers.MVTEC_CLASSES)
  assert readers.MVTEC_CLASSES == tuple(MVTEC_TRAIN_COUNTS)  # SPEC §6.3's order
  assert _paths(fewshot.select_shots(mvtec, k, seed=1)) == _official_mvtec(mvtec_root, k)
  assert _paths(fewshot.select_shots(realiad, k, seed=1)) == _official_realiad(realiad_root, k)


def test_carpet_four_shots_are_spec_indices(mvtec_train_tree):
  carpet = [s for s in mvtec_train_tree[1] if s.category == "carpet"]
  assert _indices(fewshot.select_shots(carpet, 4, seed=1)) == [68, 32, 130, 60]  # SPEC §6.3


def test_joined_datasets_each_get_k_shots_per_class(mvtec_train_tree, realiad_train_tree):
  (mvtec_root, mvtec), (realiad_root, realiad) = mvtec_train_tree, realiad_train_tree
  shots = fewshot.select_shots(mvtec + realiad, 4, seed=1)
  # one stream per dataset, as the official script runs one dataset per process
  assert _paths(shots) == _official_mvtec(mvtec_root, 4) + _official_realiad(realiad_root, 4)
  for name in ("toothbrush", "zipper"):
    assert [s.dataset for s in shots if s.category == name] == ["mvtec"] * 4 + ["realiad"] * 4


def test_select_shots_depends_on_seed_and_class_order():
  s = _samples(20)
  shots = fewshot.select_shots(s, 4, seed=1)
  assert [x.category for x in shots] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
  assert len({x.image_path for x in shots}) == 12
  assert shots != fewshot.select_shots(s, 4, seed=2)
  # b draws after a from the same stream; b alone draws what a drew first
  only_b = fewshot.select_shots([x for x in s if x.category == "b"], 4, seed=1)
  assert _indices(only_b) == _indices(shots[:4]) != _indices(shots[4:8])


def test_select_shots_errors():
  with pytest.raises(fewshot.ShotsError, match="fewer than config.few_shot.shots=4"):
    fewshot.select_shots(_samples(3), 4, seed=0)
  with pytest.raises(fewshot.ShotsError, match="must be >= 1"):
    fewshot.select_shots(_samples(3), 0, seed=0)
  with pytest.raises(fewshot.ShotsError, match="integer"):
    fewshot.select_shots(_samples(3), 2.0, seed=0)
  bad = _samples(5) + [Sample("/d/a/test/x/0.png", "/m.png", 1, "mvtec", "a", "x")]
  with pytest.raises(ValueError, match="must be normal"):
    fewshot.select_shots(bad, 2, seed=0)


def test_augment_one_is_the_eager_augmentation(shot_image):
  plain = fewshot.augment_22(shot_image, seed=None)
  for i in range(fewshot.NUM_AUGMENTED):
    np.testing.assert_array_equal(fewshot.augment_one(shot_image, i), plain[i])
  with pytest.raises(ValueError, match="index"):
    fewshot.augment_one(shot_image, 22)


def test_support_set_permutes_each_shot_with_seed_plus_its_index(shot_image, tmp_path):
  path = tmp_path / "shot.png"
  Image.fromarray(skimage.data.astronaut()).save(path)  # PNG: the same pixels as shot_image
  other = write_samples(str(tmp_path / "other"), 1, category="a", dataset="demo")[0]
  shots = [Sample(str(path), None, 0, "demo", "a"), other]
  prep = preprocess.Preprocessing(RESIZE, CROP)
  out = fewshot.support_set(shots, prep, seed=5)
  assert out.shape == (2 * 22, CROP, CROP, 3) and out.dtype == np.float32
  plain = [fewshot.augment_22(shot_image, seed=None),
           fewshot.augment_22(prep.image(other.image_path), seed=None)]
  for i in range(2):  # shot i: its 22 augmentations once each, permuted with seed + i
    perm = np.random.default_rng(5 + i).permutation(22)
    np.testing.assert_array_equal(out[22 * i:22 * (i + 1)], plain[i][perm])
  # Deterministic by seed; augment=False: the preprocessed shots alone.
  np.testing.assert_array_equal(fewshot.support_set(shots, prep, seed=5), out)
  assert not np.array_equal(fewshot.support_set(shots, prep, seed=6), out)
  plain_set = fewshot.support_set(shots, prep, seed=5, augment=False)
  assert plain_set.shape == (2, CROP, CROP, 3) and plain_set.dtype == np.float32
  np.testing.assert_array_equal(plain_set, np.stack([shot_image, prep.image(other.image_path)]))
  with pytest.raises(ValueError, match="no few-shot images"):
    fewshot.support_set([], prep, seed=0)


def test_support_set_feeds_train_dataset(tmp_path):
  shots = write_samples(str(tmp_path), 2)
  src = sources.ArraySource(fewshot.support_set(shots, preprocess.Preprocessing(RESIZE, CROP),
                                                 seed=0))
  assert len(src) == 44
  # Shot 0's original image is where seed 0's permutation puts augmentation 0.
  first = int(np.flatnonzero(np.random.default_rng(0).permutation(22) == 0)[0])
  np.testing.assert_array_equal(src[first]["image"],
                                preprocess.load_image(shots[0].image_path, RESIZE, CROP))
  batch = take(train(None, source=src, global_batch_size=8), 1)[0]
  np.testing.assert_array_equal(batch["image"], src.images[batch["index"]])
