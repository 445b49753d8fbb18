"""Reader for any dataset in MVTec layout (MVTec AD, VisA 1cls, MPDD, BTAD, users' folders).

  <root>/<class>/train/<good>/*.png
  <root>/<class>/test/<good>/*.png
  <root>/<class>/test/<defect>/<stem>.png
  <root>/<class>/ground_truth/<defect>/<stem><mask_suffix>.png

Masks are paired with images by file stem (the official code pairs two sorted lists, which
silently mismatches when one file is missing). Every irregularity is an error that names the
file or folder and shows the expected layout: nothing is skipped.

Every reader takes `faults`: None (the default) raises DatasetLayoutError at the first fault;
a list collects every fault as (path, message) and reading goes on past it, so that
`validate` reports all of a dataset's faults at once.
"""

from __future__ import annotations

import collections
import os
from typing import Iterable, Sequence

from inpformer_jax import errors
from inpformer_jax.data import preprocess
from inpformer_jax.data.records import Sample

# OS droppings that are not data; anything else that is not an image is an error.
IGNORED_FILES = ("thumbs.db", "desktop.ini")
SPLITS = ("train", "test")

LAYOUT = """expected layout (MVTec AD style):
  <root>/<class>/train/good/<name>.png            normal training images
  <root>/<class>/test/good/<name>.png             normal test images
  <root>/<class>/test/<defect>/<name>.png         anomalous test images, one folder per defect type
  <root>/<class>/ground_truth/<defect>/<name>{suffix}.png   its mask, same size"""


class DatasetLayoutError(errors.UserError, ValueError):
  """The files on disk do not form the layout a reader expects (message names the path)."""

# (path, message) of one fault, collected instead of raised.
Fault = tuple[str, str]


def fault(faults: list[Fault] | None, path: str, message: str, layout: str | None = None
          ) -> None:
  """A layout fault: raised (faults None, with the expected layout) or appended to faults."""
  if faults is None:
    raise DatasetLayoutError(f"{message}\n{layout}" if layout else message)
  faults.append((path, message))


def layout_text(mask_suffix: str | None = "_mask") -> str:
  return LAYOUT.format(suffix="[_mask]" if mask_suffix is None else mask_suffix)


def _is_ignored(name: str) -> bool:
  return name.startswith(".") or name.lower() in IGNORED_FILES


def list_images(folder: str, layout: str, faults: list[Fault] | None = None) -> list[str]:
  """Sorted image paths of a folder; a sub-folder or a non-image file is a fault."""
  paths = []
  for name in sorted(os.listdir(folder)):
    if _is_ignored(name):
      continue
    path = os.path.join(folder, name)
    if os.path.isdir(path):
      fault(faults, path, f"unexpected sub-folder {path}: image folders hold image files only",
            layout)
    elif os.path.splitext(name)[1].lower() not in preprocess.IMAGE_EXTENSIONS:
      fault(faults, path, f"{path} is not an image (extensions read: "
            f"{', '.join(preprocess.IMAGE_EXTENSIONS)}); move it out of the dataset", layout)
    else:
      paths.append(os.path.abspath(path))
  return paths


def _subdirs(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if not _is_ignored(n) and os.path.isdir(os.path.join(folder, n)))


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def check_same_size(image_path: str, mask_path: str) -> None:
  """Compares the sizes in the two files' headers (no pixel decoding)."""
  isz, msz = preprocess.image_size(image_path), preprocess.image_size(mask_path)
  if isz != msz:
    raise DatasetLayoutError(
        f"mask {mask_path} is {msz[0]}x{msz[1]} but its image {image_path} is {isz[0]}x{isz[1]}; "
        "a mask must have its image's size (was one of them resized?)")


def verify_images(samples: Iterable[Sample]) -> None:
  """Decodes every image and mask once (slow); raises ImageReadError naming a bad file."""
  for s in samples:
    for p, what in ((s.image_path, "image"), (s.mask_path, "mask")):
      if p is not None:
        preprocess._open(p, what).close()  # pylint: disable=protected-access


def _pair_masks(img_paths: list[str], gt_dir: str, mask_suffix: str | None, layout: str,
                faults: list[Fault] | None = None) -> dict[str, str]:
  """image path -> mask path, by stem. mask_suffix None accepts `<stem>_mask` or `<stem>`.

  Collecting faults, an image without a mask is left out of the result.
  """
  masks = list_images(gt_dir, layout, faults)
  by_stem: dict[str, str] = {}
  for m in masks:
    first = by_stem.setdefault(_stem(m), m)
    if first != m:
      fault(faults, m, f"two masks with the same name stem: {first} and {m}")
  test_dir = os.path.dirname(img_paths[0])
  for dup in sorted(s for s, n in collections.Counter(map(_stem, img_paths)).items() if n > 1):
    fault(faults, os.path.join(test_dir, dup), f"two images named {dup}.* in {test_dir}: their "
          "masks would be the same file; rename one")
  suffixes = ("_mask", "") if mask_suffix is None else (mask_suffix,)
  pairs, used = {}, set()
  for img in img_paths:
    found = [by_stem[_stem(img) + s] for s in suffixes if _stem(img) + s in by_stem]
    if not found:
      want = " or ".join(f"{_stem(img)}{s}.png" for s in suffixes)
      fault(faults, img, f"no mask for {img}: expected {os.path.join(gt_dir, want)}", layout)
      continue
    if len(found) > 1:
      fault(faults, img, f"two masks match {img}: {found}; keep one")
    pairs[img] = found[0]
    used.update(found)
  extra = [m for m in masks if m not in used]
  if extra and faults is None:
    raise DatasetLayoutError(
        f"{len(extra)} mask(s) in {gt_dir} have no image in the test folder, e.g. {extra[0]} "
        f"(masks are paired with images by name stem)\n{layout}")
  for m in extra:
    fault(faults, m, f"mask {m} has no image in {test_dir} (masks are paired with images by "
          "name stem); add its image or move the mask out")
  return pairs


def read_class(class_dir: str, split: str, *, dataset: str, category: str | None = None,
               good: str | None = "good", mask_suffix: str | None = "_mask",
               masks_required: bool = True, check_sizes: bool = True,
               faults: list[Fault] | None = None) -> list[Sample]:
  """All samples of one class folder in MVTec layout.

  good: the normal folder name ('good'; BTAD uses 'ok'); None: 'good' or 'ok', whichever exists.
  mask_suffix: mask name is `<image stem><mask_suffix>.<ext>`; None accepts '_mask' or ''.
  masks_required: if False a class whose defect folders have no ground_truth at all is read
    with has_mask=False (pixel metrics are then skipped for it); partial masks are an error.
  faults: None raises at the first fault; a list collects them and the samples that could be
    read are returned (an anomalous image without its mask with has_mask=False).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  category = category or os.path.basename(os.path.normpath(class_dir))
  layout = layout_text(mask_suffix)
  if not os.path.isdir(class_dir):
    fault(faults, class_dir, f"class folder {class_dir} does not exist", layout)
    return []
  split_dir = os.path.join(class_dir, split)
  if not os.path.isdir(split_dir):
    fault(faults, split_dir, f"{split_dir} is missing (class {category!r})", layout)
    return []
  if good is None:
    found = [g for g in ("good", "ok") if os.path.isdir(os.path.join(split_dir, g))]
    if not found:
      fault(faults, split_dir, f"{split_dir} has neither good/ nor ok/ (normal images)", layout)
      return []
    good = found[0]
  loose = sorted(n for n in os.listdir(split_dir)
                 if not _is_ignored(n) and not os.path.isdir(os.path.join(split_dir, n)))
  if split == "train":
    return _read_train(split_dir, loose, good, layout, dataset, category, faults)
  for name in loose:
    fault(faults, os.path.join(split_dir, name),
          f"unexpected file {os.path.join(split_dir, name)}: test images go into "
          f"test/{good}/ or test/<defect>/", layout)
  defects = [d for d in _subdirs(split_dir) if d != good]
  gt_root = os.path.join(class_dir, "ground_truth")
  gt_dirs = _subdirs(gt_root) if os.path.isdir(gt_root) else []
  if good in gt_dirs:
    fault(faults, os.path.join(gt_root, good), f"{os.path.join(gt_root, good)}: normal images "
          "have no masks (they count as all-zero); remove that folder", layout)
  for d in gt_dirs:
    if d not in defects and d != good:
      fault(faults, os.path.join(gt_root, d), f"{os.path.join(gt_root, d)} has no matching "
            f"test/{d}/ folder (ground_truth/ holds masks of anomalous test images only)", layout)
  has_mask = True
  if defects and not gt_dirs:
    if masks_required:
      fault(faults, gt_root, f"{gt_root} is missing or empty: class {category!r} has defect "
            f"folders {defects} but no masks. Add the masks, or evaluate image metrics only: "
            f"--config.data.masks.{dataset}=False (masks_required=False in Python)", layout)
    has_mask = False

  samples = []
  if os.path.isdir(os.path.join(split_dir, good)):
    for p in list_images(os.path.join(split_dir, good), layout, faults):
      samples.append(Sample(p, None, 0, dataset, category, "good", has_mask))
  for defect in defects:
    paths = list_images(os.path.join(split_dir, defect), layout, faults)
    if not paths:
      fault(faults, os.path.join(split_dir, defect),
            f"defect folder {os.path.join(split_dir, defect)} is empty", layout)
      continue
    gt_dir = os.path.join(gt_root, defect)
    pairs = {}
    if has_mask and not os.path.isdir(gt_dir):
      fault(faults, gt_dir, f"{gt_dir} is missing: the masks of test/{defect}/ go there (other "
            f"defect types of class {category!r} have masks)", layout)
    elif has_mask:
      pairs = _pair_masks(paths, gt_dir, mask_suffix, layout, faults)
    for p in paths:
      mask = pairs.get(p)
      if check_sizes and mask is not None:
        check_same_size(p, mask)
      samples.append(Sample(p, mask, 1, dataset, category, defect, mask is not None))
  if not samples:
    fault(faults, split_dir, f"class {category!r} has no test images in {split_dir}", layout)
  return samples


def _read_train(split_dir: str, loose: list[str], good: str, layout: str, dataset: str,
                category: str, faults: list[Fault] | None) -> list[Sample]:
  dirs = _subdirs(split_dir)
  if dirs != [good]:
    fault(faults, split_dir, f"{split_dir} must hold exactly one folder {good}/ of normal "
          f"images, found {dirs or 'none'}", layout)
    if good not in dirs:
      return []
  for name in loose:
    fault(faults, os.path.join(split_dir, name),
          f"unexpected file {os.path.join(split_dir, name)}: training images go into "
          f"train/{good}/", layout)
  good_dir = os.path.join(split_dir, good)
  paths = list_images(good_dir, layout, faults)
  if not paths:
    fault(faults, good_dir, f"class {category!r} has no training images in {good_dir}", layout)
  # has_mask does not matter for training images; keep the default.
  return [Sample(p, None, 0, dataset, category, "good") for p in paths]


def find_classes(root: str) -> list[str]:
  """Sub-folders of root that contain train/ or test/ (sorted)."""
  return [d for d in _subdirs(root)
          if any(os.path.isdir(os.path.join(root, d, s)) for s in SPLITS)]


def read_layout(root: str, categories: Sequence[str] | None, split: str, *, dataset: str,
                known_classes: Sequence[str] | None = None, verify: bool = False,
                faults: list[Fault] | None = None, **kw) -> list[Sample]:
  """Samples of several classes under root; categories None: known_classes, else all found."""
  layout = layout_text(kw.get("mask_suffix", "_mask"))
  if not os.path.isdir(root):
    fault(faults, root, f"dataset root {root} does not exist", layout)
    return []
  if categories is None:
    categories = list(known_classes) if known_classes is not None else find_classes(root)
    if not categories:
      if any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        fault(faults, root, f"{root} looks like a single class folder (it holds train/ or "
              f"test/): pass its parent as the root and "
              f"{os.path.basename(os.path.normpath(root))!r} as the category", layout)
      else:
        fault(faults, root, f"no class folders (with train/ or test/) in {root}", layout)
      return []
  elif isinstance(categories, str):
    categories = [categories]
  missing = [c for c in categories if not os.path.isdir(os.path.join(root, c))]
  if missing:
    fault(faults, root, f"class folder(s) {missing} not found in {root} (found: "
          f"{find_classes(root)}); pass the categories that exist", layout)
  samples = []
  for c in categories:
    if c not in missing:
      samples.extend(read_class(os.path.join(root, c), split, dataset=dataset, category=c,
                                faults=faults, **kw))
  if verify:
    verify_images(samples)
  return samples


def read_folder(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
                dataset: str = "folder", good: str | None = None, mask_suffix: str | None = None,
                masks_required: bool = False, check_sizes: bool = True,
                verify: bool = False, faults: list[Fault] | None = None) -> list[Sample]:
  """Any dataset in MVTec layout (MPDD, BTAD, your own).

  Defaults are lenient where real datasets differ: the normal folder may be good/ or ok/
  (BTAD), masks may be named <stem>_mask.* or <stem>.*, and a class without ground_truth/ is
  read with has_mask=False. categories None reads every sub-folder holding train/ or test/.
  """
  return read_layout(root, categories, split, dataset=dataset, good=good,
                     mask_suffix=mask_suffix, masks_required=masks_required,
                     check_sizes=check_sizes, verify=verify, faults=faults)
