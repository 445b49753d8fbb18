"""Dataset readers by name: `read_dataset('mvtec', root, categories, split)` -> list[Sample].

Names: mvtec (alias mvtec_ad), visa, realiad (alias real_iad), demo (what
`python -m inpformer_jax.data.demo` writes), folder (any MVTec-layout folder), and mpdd / btad
(MVTec-layout datasets read with `read_folder` under their own name).

A config's dataset NAME (config.data.roots.NAME) is read by the reader of its layout:
`read_dataset(NAME, root, ..., layout='folder')` returns samples whose `dataset` is NAME;
`detect_layout(root)` guesses the layout of a root no reader name describes.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

from inpformer_jax.data import folder
from inpformer_jax.data import realiad
from inpformer_jax.data.folder import DatasetLayoutError, read_folder  # noqa: F401 (re-export)
from inpformer_jax.data.mvtec import MVTEC_CLASSES, read_mvtec
from inpformer_jax.data.preprocess import ImageReadError  # noqa: F401 (re-export)
from inpformer_jax.data.realiad import REALIAD_CLASSES, read_realiad
from inpformer_jax.data.records import Sample
from inpformer_jax.data.visa import VISA_CLASSES, read_visa

CLASSES: dict[str, tuple[str, ...]] = {
    "mvtec": MVTEC_CLASSES,
    "visa": VISA_CLASSES,
    "realiad": REALIAD_CLASSES,
}


def read_demo(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
              dataset: str = "demo", masks_required: bool = True, check_sizes: bool = True,
              verify: bool = False, faults: list[folder.Fault] | None = None) -> list[Sample]:
  """The generated demo dataset (strict MVTec layout, every class found under root)."""
  return folder.read_layout(root, categories, split, dataset=dataset, good="good",
                            mask_suffix="_mask", masks_required=masks_required,
                            check_sizes=check_sizes, verify=verify, faults=faults)


READERS: dict[str, Callable[..., list[Sample]]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "realiad": read_realiad,
    "demo": read_demo,
    "folder": read_folder,
    "mpdd": functools.partial(read_folder, dataset="mpdd"),
    "btad": functools.partial(read_folder, dataset="btad"),
}
ALIASES = {"mvtec_ad": "mvtec", "real_iad": "realiad"}


def canonical_name(name: str) -> str:
  key = ALIASES.get(name.lower(), name.lower())
  if key not in READERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(READERS) + sorted(ALIASES)} "
                     "(use 'folder' for any dataset in MVTec layout)")
  return key


def read_dataset(name: str, root: str, categories: Sequence[str] | None = None,
                 split: str = "test", *, layout: str | None = None, **kw) -> list[Sample]:
  """The reader of `layout` (None: of `name`); kw go to it (e.g. resolution=, views= for
  realiad). With a layout the samples' dataset is `name`."""
  if layout is not None:
    kw["dataset"] = name
  return READERS[canonical_name(layout or name)](root, categories, split, **kw)


def detect_layout(root: str) -> str | None:
  """'realiad' (a realiad_jsons/ folder), 'folder' (class folders holding train/ or test/),
  else None. Cheap: two directory listings."""
  if os.path.isdir(os.path.join(root, realiad.JSONS_DIR)):
    return "realiad"
  if folder.find_classes(root):
    return "folder"
  return None


def classes_of(samples: Sequence[Sample]) -> list[str]:
  """Categories in first-seen order."""
  return list(dict.fromkeys(s.category for s in samples))
