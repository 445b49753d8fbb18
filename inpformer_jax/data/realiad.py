"""Real-IAD reader (SPEC §9): images of one resolution plus the per-class split JSONs.

  <root>/realiad_1024/<class>/OK/S0001/<class>_0001_OK_C1_<time>.jpg
  <root>/realiad_1024/<class>/NG/<defect>/S0123/<name>.jpg  (+ <name>.png, its mask)
  <root>/realiad_jsons/realiad_jsons/<class>.json   (also accepted: realiad_jsons/<class>.json)
  <root>/realiad_jsons/realiad_jsons_sv/<class>.json  (jsons='realiad_jsons_sv': single view)

Each JSON holds `train` and `test` lists of {category, anomaly_class ('OK' = normal),
image_path, mask_path}, paths relative to `realiad_<res>/<class>/`. Every view (C1..C5) of a
sample is an independent image, as in the official code; `views` keeps a subset.
Usage: read_realiad('/data/Real-IAD', split='test', resolution='1024', views=('C1',))
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

from inpformer_jax.data import folder
from inpformer_jax.data.records import Sample

REALIAD_CLASSES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint",
    "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll",
    "regulator", "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock",
    "toothbrush", "toy", "toy_brick", "transistor1", "usb", "usb_adaptor", "u_block", "vcpill",
    "wooden_beads", "woodstick", "zipper",
)
RESOLUTIONS = ("256", "512", "1024", "raw")
VIEWS = ("C1", "C2", "C3", "C4", "C5")
DEFAULT_RESOLUTION = "1024"
# The folder the release's split settings unpack into (realiad_jsons/realiad_jsons/,
# realiad_jsons/realiad_jsons_sv/, ...), and the default setting: all five views.
JSONS_DIR = "realiad_jsons"
DEFAULT_JSONS = "realiad_jsons"
NORMAL_CLASS = "OK"
_VIEW = re.compile(r"_(C[1-5])_")

LAYOUT = """expected layout (Real-IAD release):
  <root>/realiad_{res}/<class>/OK/S0001/<class>_0001_OK_C1_<time>.jpg
  <root>/realiad_{res}/<class>/NG/<defect>/S0123/<name>.jpg   and its mask <name>.png
  <root>/realiad_jsons/{jsons}/<class>.json   (or <root>/{jsons}/<class>.json)
  JSON: {{"train": [...], "test": [...]}}, items {{"category", "anomaly_class" ('OK' = normal),
        "image_path", "mask_path"}}, paths relative to realiad_{res}/<class>/"""


def _normalise_views(views: Iterable[str | int] | None) -> set[str] | None:
  if views is None:
    return None
  out = set()
  for v in ([views] if isinstance(views, (str, int)) else views):
    name = f"C{v}" if isinstance(v, int) or str(v).isdigit() else str(v).upper()
    if name not in {f"C{i}" for i in range(1, 6)}:
      raise ValueError(f"Real-IAD views are C1..C5 (or 1..5), got {v!r}")
    out.add(name)
  return out


def view_of(path: str, faults: list[folder.Fault] | None = None) -> str | None:
  """'C1'..'C5' from a Real-IAD file name (`..._OK_C3_20231021130208.jpg`); None: a fault."""
  m = _VIEW.search(os.path.basename(path))
  if m is None:
    folder.fault(faults, path, f"{path}: no camera view (_C1_ .. _C5_) in the file name, so "
                 "views= cannot filter it")
    return None
  return m.group(1)


def find_json(root: str, category: str, jsons: str = DEFAULT_JSONS,
              faults: list[folder.Fault] | None = None) -> str | None:
  """The split JSON of a class: jsons names a folder under <root>/realiad_jsons/ (the release
  unpacks every split setting there), or one under root itself (or an absolute path)."""
  candidates = list(dict.fromkeys([os.path.join(root, JSONS_DIR, jsons, f"{category}.json"),
                                   os.path.join(root, jsons, jsons, f"{category}.json"),
                                   os.path.join(root, jsons, f"{category}.json")]))
  for c in candidates:
    if os.path.isfile(c):
      return c
  folder.fault(faults, candidates[0],
               f"no split file for class {category!r}: looked for {' and '.join(candidates)}")
  return None


def _resolve(bases: list[str], rel: str, where: str, layout: str,
             faults: list[folder.Fault] | None) -> str | None:
  """The first of bases/rel that exists; the fault names the primary (class-folder) path."""
  for base in bases:
    path = os.path.join(base, rel)
    if os.path.isfile(path):
      return os.path.abspath(path)
  folder.fault(faults, os.path.join(bases[0], rel), f"{where} names {rel!r}, but "
               f"{os.path.join(bases[0], rel)} does not exist", layout)
  return None


def _load_split(json_path: str, split: str, layout: str,
                faults: list[folder.Fault] | None) -> dict | None:
  try:
    with open(json_path) as f:
      spec = json.load(f)
  except json.JSONDecodeError as e:
    folder.fault(faults, json_path, f"{json_path} is not valid JSON: {e}")
    return None
  if not isinstance(spec, dict) or split not in spec or not isinstance(spec[split], list):
    folder.fault(faults, json_path, f"{json_path} has no {split!r} list", layout)
    return None
  return spec


def read_realiad_class(root: str, category: str, split: str, *,
                       resolution: str = DEFAULT_RESOLUTION,
                       views: Iterable[str | int] | None = None, jsons: str = DEFAULT_JSONS,
                       dataset: str = "realiad", check_sizes: bool = True,
                       faults: list[folder.Fault] | None = None) -> list[Sample]:
  """Samples of one Real-IAD class for split 'train' or 'test'.

  faults: None raises at the first fault; a list collects them (`folder.read_class`).
  """
  if split not in folder.SPLITS:
    raise ValueError(f"split must be one of {folder.SPLITS}, got {split!r}")
  resolution = str(resolution)
  if resolution not in RESOLUTIONS:
    raise ValueError(f"Real-IAD resolution must be one of {RESOLUTIONS}, got {resolution!r}")
  layout = LAYOUT.format(res=resolution, jsons=jsons)
  want_views = _normalise_views(views)
  image_root = os.path.join(root, f"realiad_{resolution}")
  if not os.path.isdir(image_root):
    present = sorted(d for d in os.listdir(root) if d.startswith("realiad_"))
    folder.fault(faults, image_root, f"{image_root} does not exist (found {present}); pick "
                 "resolution= among the folders you have", layout)
    return []
  class_dir = os.path.join(image_root, category)
  if not os.path.isdir(class_dir):
    folder.fault(faults, class_dir, f"class folder {class_dir} does not exist", layout)
    return []
  json_path = find_json(root, category, jsons, faults)
  spec = None if json_path is None else _load_split(json_path, split, layout, faults)
  if spec is None:
    return []

  # Paths are relative to the class folder (official loader); the JSONs' meta.prefix (the
  # class name in the release) names the same folder relative to realiad_<res>/, and some
  # copies put the class name into the paths themselves.
  bases = [class_dir]
  prefix = spec.get("meta", {}).get("prefix") if isinstance(spec.get("meta"), dict) else None
  if isinstance(prefix, str) and prefix:
    bases.append(os.path.join(image_root, prefix))
  bases.append(image_root)
  samples, listed = [], 0
  for i, item in enumerate(spec[split]):
    where = f"{json_path} [{split}][{i}]"
    if not isinstance(item, dict) or "image_path" not in item or "anomaly_class" not in item:
      folder.fault(faults, json_path, f"{where} lacks image_path/anomaly_class: {item!r}", layout)
      continue
    if item.get("category", category) != category:
      folder.fault(faults, json_path, f"{where} belongs to category {item['category']!r}, not "
                   f"{category!r}: wrong JSON file?")
      continue
    if want_views is not None:
      view = view_of(item["image_path"], faults)
      if view not in want_views:
        continue
    listed += 1
    image = _resolve(bases, item["image_path"], where, layout, faults)
    defect = item["anomaly_class"]
    if defect == NORMAL_CLASS:
      if image is not None:
        samples.append(Sample(image, None, 0, dataset, category, "good", True))
      continue
    mask = None
    if not item.get("mask_path"):
      folder.fault(faults, image or json_path, f"{where}: anomalous image {image} ({defect}) "
                   "has no mask_path", layout)
    else:
      mask = _resolve(bases, item["mask_path"], where, layout, faults)
    if image is None:
      continue
    if check_sizes and mask is not None:
      folder.check_same_size(image, mask)
    samples.append(Sample(image, mask, 1, dataset, category, defect, mask is not None))
  if not listed:
    folder.fault(faults, json_path, f"class {category!r} has no {split} images in {json_path}"
                 + (f" for views {sorted(want_views)}" if want_views else ""))
  return samples


def read_realiad(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
                 resolution: str = DEFAULT_RESOLUTION, views: Iterable[str | int] | None = None,
                 jsons: str = DEFAULT_JSONS, dataset: str = "realiad",
                 check_sizes: bool = True, verify: bool = False,
                 faults: list[folder.Fault] | None = None) -> list[Sample]:
  """Samples of Real-IAD; categories None: all 30 classes. jsons picks the split setting;
  dataset is the samples' dataset name (the config's name for this root)."""
  if not os.path.isdir(root):
    folder.fault(faults, root, f"dataset root {root} does not exist",
                 LAYOUT.format(res=resolution, jsons=jsons))
    return []
  if categories is None:
    categories = REALIAD_CLASSES
  elif isinstance(categories, str):
    categories = [categories]
  samples = []
  for c in categories:
    samples.extend(read_realiad_class(root, c, split, resolution=resolution, views=views,
                                      jsons=jsons, dataset=dataset, check_sizes=check_sizes,
                                      faults=faults))
  if verify:
    folder.verify_images(samples)
  return samples
