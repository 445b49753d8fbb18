"""Reader for any dataset in MVTec layout (MVTec AD, VisA 1cls, MPDD, BTAD, users' folders).

  <root>/<class>/train/<good>/*.png
  <root>/<class>/test/<good>/*.png
  <root>/<class>/test/<defect>/<stem>.png
  <root>/<class>/ground_truth/<defect>/<stem><mask_suffix>.png

Masks are paired with images by file stem (the official code pairs two sorted lists, which
silently mismatches when one file is missing). Every irregularity is an error that names the
file or folder and shows the expected layout: nothing is skipped.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

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


class DatasetLayoutError(ValueError):
  """The files on disk do not form the layout a reader expects (message names the path)."""


def layout_text(mask_suffix: str | None = "_mask") -> str:
  return LAYOUT.format(suffix="[_mask]" if mask_suffix is None else mask_suffix)


def _is_ignored(name: str) -> bool:
  return name.startswith(".") or name.lower() in IGNORED_FILES


def list_images(folder: str, layout: str) -> list[str]:
  """Sorted image paths of a folder; a sub-folder or a non-image file is an error."""
  paths = []
  for name in sorted(os.listdir(folder)):
    if _is_ignored(name):
      continue
    path = os.path.join(folder, name)
    if os.path.isdir(path):
      raise DatasetLayoutError(f"unexpected sub-folder {path}: image folders hold image files only"
                               f"\n{layout}")
    if os.path.splitext(name)[1].lower() not in preprocess.IMAGE_EXTENSIONS:
      raise DatasetLayoutError(
          f"{path} is not an image (extensions read: "
          f"{', '.join(preprocess.IMAGE_EXTENSIONS)}); move it out of the "
          f"dataset\n{layout}")
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


def _pair_masks(img_paths: list[str], gt_dir: str, mask_suffix: str | None,
                layout: str) -> dict[str, str]:
  """image path -> mask path, by stem. mask_suffix None accepts `<stem>_mask` or `<stem>`."""
  masks = list_images(gt_dir, layout)
  by_stem: dict[str, str] = {}
  for m in masks:
    by_stem.setdefault(_stem(m), m)
    if by_stem[_stem(m)] != m:
      raise DatasetLayoutError(f"two masks with the same name stem: {by_stem[_stem(m)]} and {m}")
  stems = [_stem(p) for p in img_paths]
  if len(set(stems)) != len(stems):
    dup = next(s for s in stems if stems.count(s) > 1)
    raise DatasetLayoutError(
        f"two images named {dup}.* in {os.path.dirname(img_paths[0])}: their masks would be "
        "the same file; rename one")
  suffixes = ("_mask", "") if mask_suffix is None else (mask_suffix,)
  pairs, used = {}, set()
  for img in img_paths:
    found = [by_stem[_stem(img) + s] for s in suffixes if _stem(img) + s in by_stem]
    if not found:
      want = " or ".join(f"{_stem(img)}{s}.png" for s in suffixes)
      raise DatasetLayoutError(
          f"no mask for {img}: expected {os.path.join(gt_dir, want)}\n{layout}")
    if len(found) > 1:
      raise DatasetLayoutError(f"two masks match {img}: {found}; keep one")
    pairs[img] = found[0]
    used.add(found[0])
  extra = [m for m in masks if m not in used]
  if extra:
    raise DatasetLayoutError(
        f"{len(extra)} mask(s) in {gt_dir} have no image in the test folder, e.g. {extra[0]} "
        f"(masks are paired with images by name stem)\n{layout}")
  return pairs


def read_class(class_dir: str, split: str, *, dataset: str, category: str | None = None,
               good: str | None = "good", mask_suffix: str | None = "_mask",
               masks_required: bool = True, check_sizes: bool = True) -> list[Sample]:
  """All samples of one class folder in MVTec layout.

  good: the normal folder name ('good'; BTAD uses 'ok'); None: 'good' or 'ok', whichever exists.
  mask_suffix: mask name is `<image stem><mask_suffix>.<ext>`; None accepts '_mask' or ''.
  masks_required: if False a class whose defect folders have no ground_truth at all is read
    with has_mask=False (pixel metrics are then skipped for it); partial masks are an error.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  category = category or os.path.basename(os.path.normpath(class_dir))
  layout = layout_text(mask_suffix)
  if not os.path.isdir(class_dir):
    raise DatasetLayoutError(f"class folder {class_dir} does not exist\n{layout}")
  split_dir = os.path.join(class_dir, split)
  if not os.path.isdir(split_dir):
    raise DatasetLayoutError(f"{split_dir} is missing (class {category!r})\n{layout}")
  if good is None:
    found = [g for g in ("good", "ok") if os.path.isdir(os.path.join(split_dir, g))]
    if not found:
      raise DatasetLayoutError(f"{split_dir} has neither good/ nor ok/ (normal images)\n{layout}")
    good = found[0]
  if split == "train":
    dirs = _subdirs(split_dir)
    if dirs != [good]:
      raise DatasetLayoutError(
          f"{split_dir} must hold exactly one folder {good}/ of normal images, found "
          f"{dirs or 'none'}\n{layout}")
    loose = [n for n in os.listdir(split_dir) if not _is_ignored(n) and n != good]
    if loose:
      raise DatasetLayoutError(f"unexpected file {os.path.join(split_dir, loose[0])}\n{layout}")
    paths = list_images(os.path.join(split_dir, good), layout)
    if not paths:
      raise DatasetLayoutError(f"class {category!r} has no training images in "
                               f"{os.path.join(split_dir, good)}\n{layout}")
    # has_mask does not matter for training images; keep the default.
    return [Sample(p, None, 0, dataset, category, "good") for p in paths]

  loose = [n for n in os.listdir(split_dir)
           if not _is_ignored(n) and not os.path.isdir(os.path.join(split_dir, n))]
  if loose:
    raise DatasetLayoutError(
        f"unexpected file {os.path.join(split_dir, loose[0])}: test images go into "
        f"test/{good}/ or test/<defect>/\n{layout}")
  defects = [d for d in _subdirs(split_dir) if d != good]
  gt_root = os.path.join(class_dir, "ground_truth")
  gt_dirs = _subdirs(gt_root) if os.path.isdir(gt_root) else []
  if good in gt_dirs:
    raise DatasetLayoutError(
        f"{os.path.join(gt_root, good)}: normal images have no masks (they count as all-zero); "
        f"remove that folder\n{layout}")
  extra_gt = [d for d in gt_dirs if d not in defects]
  if extra_gt:
    raise DatasetLayoutError(
        f"{os.path.join(gt_root, extra_gt[0])} has no matching test/{extra_gt[0]}/ folder "
        f"(ground_truth/ holds masks of anomalous test images only)\n{layout}")
  has_mask = True
  if defects and not gt_dirs:
    if masks_required:
      raise DatasetLayoutError(
          f"{gt_root} is missing or empty: class {category!r} has defect folders "
          f"{defects} but no masks. Add the masks, or read the folder with "
          f"masks_required=False to skip pixel metrics for this class\n{layout}")
    has_mask = False

  samples = []
  if os.path.isdir(os.path.join(split_dir, good)):
    for p in list_images(os.path.join(split_dir, good), layout):
      samples.append(Sample(p, None, 0, dataset, category, "good", has_mask))
  for defect in defects:
    paths = list_images(os.path.join(split_dir, defect), layout)
    if not paths:
      raise DatasetLayoutError(
          f"defect folder {os.path.join(split_dir, defect)} is empty\n{layout}")
    if not has_mask:
      samples.extend(Sample(p, None, 1, dataset, category, defect, False) for p in paths)
      continue
    gt_dir = os.path.join(gt_root, defect)
    if not os.path.isdir(gt_dir):
      raise DatasetLayoutError(
          f"{gt_dir} is missing: the masks of test/{defect}/ go there (other defect types of "
          f"class {category!r} have masks)\n{layout}")
    pairs = _pair_masks(paths, gt_dir, mask_suffix, layout)
    for p in paths:
      if check_sizes:
        check_same_size(p, pairs[p])
      samples.append(Sample(p, pairs[p], 1, dataset, category, defect, True))
  if not samples:
    raise DatasetLayoutError(f"class {category!r} has no test images in {split_dir}\n{layout}")
  return samples


def find_classes(root: str) -> list[str]:
  """Sub-folders of root that contain train/ or test/ (sorted)."""
  return [d for d in _subdirs(root)
          if any(os.path.isdir(os.path.join(root, d, s)) for s in SPLITS)]


def read_layout(root: str, categories: Sequence[str] | None, split: str, *, dataset: str,
                known_classes: Sequence[str] | None = None, verify: bool = False,
                **kw) -> list[Sample]:
  """Samples of several classes under root; categories None: known_classes, else all found."""
  layout = layout_text(kw.get("mask_suffix", "_mask"))
  if not os.path.isdir(root):
    raise DatasetLayoutError(f"dataset root {root} does not exist\n{layout}")
  if categories is None:
    categories = list(known_classes) if known_classes is not None else find_classes(root)
    if not categories:
      if any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        raise DatasetLayoutError(
            f"{root} looks like a single class folder (it holds train/ or test/): pass its "
            f"parent as the root and {os.path.basename(os.path.normpath(root))!r} as the "
            f"category\n{layout}")
      raise DatasetLayoutError(f"no class folders (with train/ or test/) in {root}\n{layout}")
  elif isinstance(categories, str):
    categories = [categories]
  missing = [c for c in categories if not os.path.isdir(os.path.join(root, c))]
  if missing:
    raise DatasetLayoutError(
        f"class folder(s) {missing} not found in {root} (found: {find_classes(root)}); pass the "
        f"categories that exist\n{layout}")
  samples = []
  for c in categories:
    samples.extend(read_class(os.path.join(root, c), split, dataset=dataset, category=c, **kw))
  if verify:
    verify_images(samples)
  return samples


def read_folder(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
                dataset: str = "folder", good: str | None = None, mask_suffix: str | None = None,
                masks_required: bool = False, check_sizes: bool = True,
                verify: bool = False) -> list[Sample]:
  """Any dataset in MVTec layout (MPDD, BTAD, your own).

  Defaults are lenient where real datasets differ: the normal folder may be good/ or ok/
  (BTAD), masks may be named <stem>_mask.* or <stem>.*, and a class without ground_truth/ is
  read with has_mask=False. categories None reads every sub-folder holding train/ or test/.
  """
  return read_layout(root, categories, split, dataset=dataset, good=good,
                     mask_suffix=mask_suffix, masks_required=masks_required,
                     check_sizes=check_sizes, verify=verify)
