"""grain random-access sources (`__len__`, `__getitem__`) of the images the pipelines read.

Each returns a dict with `index` and a uint8 `image` resized to the config's resize size (the
expensive PIL part of the official transform) or, for the few-shot in-memory path, already
finished float32 images; with `with_masks` also the uint8 `mask` and the sample's metadata.
`fingerprint()` names a source's content (paths, build directory, pixels) for caches keyed on
the training data. Sources hold paths and open files lazily: grain's worker processes
unpickle them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Sequence

import numpy as np

from inpformer_jax.data import preprocess
from inpformer_jax.data.records import Sample



class PathSource:
  """Image files listed by `Sample` records -> {"index", "image" uint8 (R, R, 3), ...}.

  with_masks: also read the ground-truth mask ("mask" uint8 (R, R), zeros for normal images
    and for classes without masks) and the metadata fields; training does not need them.
  """

  def __init__(self, samples: Sequence[Sample], resize: int, *, with_masks: bool = False):
    if not samples:
      raise ValueError("PathSource got no samples: the reader found no images (check the "
                       "dataset root and the category list in the config)")
    bad = [s for s in samples if not isinstance(s, Sample)]
    if bad:
      raise TypeError(f"PathSource expects inpformer_jax.data.records.Sample records, got "
                      f"{type(bad[0]).__name__}; build them with inpformer_jax.data.readers")
    self.samples = list(samples)
    self.resize = resize
    self.with_masks = with_masks

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    s = self.samples[index]
    out = {"index": np.int64(index),
           "image": preprocess.resize_pil_only(s.image_path, self.resize)}
    if self.with_masks:
      if s.mask_path is None:
        out["mask"] = np.zeros((self.resize, self.resize), np.uint8)
      else:
        out["mask"] = preprocess.resize_mask_pil_only(s.mask_path, self.resize)
      out.update(meta(s.label, s.has_mask, s.dataset, s.category, s.defect, s.image_path))
    return out

  def fingerprint(self) -> str:
    return _sha1("PathSource", self.resize, *(s.image_path for s in self.samples))

  def __repr__(self) -> str:
    return f"PathSource(n={len(self)}, resize={self.resize}, with_masks={self.with_masks})"


class ArraySource:
  """In-memory images -> {"index", "image"}.

  images: float32 (N, crop, crop, 3), already normalised (few-shot: `fewshot.augment_22`
    output), or uint8 (N, R, R, 3) resized images that still need `finish_from_resized`.
  """

  def __init__(self, images: np.ndarray):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.float32, np.uint8):
      raise ValueError("ArraySource expects float32 (N, crop, crop, 3) normalised images or "
                       f"uint8 (N, R, R, 3) resized ones; got {images.dtype} {images.shape}")
    if len(images) == 0:
      raise ValueError("ArraySource got no images")
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"index": np.int64(index), "image": self.images[index]}

  def fingerprint(self) -> str:
    return _sha1("ArraySource", self.images.dtype, self.images.shape,
                 np.ascontiguousarray(self.images).tobytes())

  def __repr__(self) -> str:
    return f"ArraySource({self.images.dtype} {self.images.shape})"


class ArrayRecordSource:
  """A split written by `tfds_builders` (ArrayRecord shards), read with TFDS, no TensorFlow.

  builder_dir: `<data_dir>/<name>/<config>/<version>` (`tfds_builders.builder_dir` finds it).
  Records are in the reader's order (the builders disable shuffling), so record i is the i-th
  sample `readers.read_dataset` returns for the split and the pipelines give the same batches
  as from the files. The TFDS handle is opened lazily so that the source pickles cheaply into
  grain's worker processes.
  """

  def __init__(self, builder_dir: str, split: str, *, with_masks: bool = False):
    self.builder_dir = str(builder_dir)
    self.split = split
    self.with_masks = with_masks
    self._lock = threading.Lock()
    self._ds = None
    self._len = len(self._open())

  def _open(self):
    # grain reads a batch's elements from several threads; TFDS's lazy imports deadlock when
    # two threads trigger them at once, so the first open is serialised.
    with self._lock:
      if self._ds is None:
        # The optional `tfds` extra, heavy to import: only this source needs it.
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        builder = tfds.builder_from_directory(self.builder_dir)
        if self.split not in builder.info.splits:
          raise ValueError(f"{self.builder_dir} has no split {self.split!r} "
                           f"(it has {sorted(builder.info.splits)})")
        decoders = None if self.with_masks else {"mask": tfds.decode.SkipDecoding()}
        self._ds = builder.as_data_source(split=self.split, decoders=decoders)
      return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._open()  # In the unpickling (main) thread of the worker, before grain's threads.

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self._open()[index]
    out = {"index": np.int64(index), "image": np.asarray(r["image"], np.uint8)}
    if self.with_masks:
      out["mask"] = np.asarray(r["mask"], np.uint8)[..., 0]
      out.update(meta(r["label"], r["has_mask"], r["dataset"], r["category"], r["defect"],
                       r["path"]))
    return out

  def fingerprint(self) -> str:
    return _sha1("ArrayRecordSource", os.path.realpath(self.builder_dir), self.split, len(self))

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.builder_dir!r}, split={self.split!r}, n={len(self)})"


class ConcatSource:
  """Several sources as one; `index` is the position in the concatenation."""

  def __init__(self, *sources):
    if not sources:
      raise ValueError("ConcatSource needs at least one source")
    self.sources = sources
    self._ends = np.cumsum([len(s) for s in sources])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    which = int(np.searchsorted(self._ends, index, side="right"))
    start = 0 if which == 0 else int(self._ends[which - 1])
    out = dict(self.sources[which][index - start])
    out["index"] = np.int64(index)
    return out

  def fingerprint(self) -> str:
    return _sha1("ConcatSource", *(s.fingerprint() for s in self.sources))

  def __repr__(self) -> str:
    return f"ConcatSource({', '.join(map(repr, self.sources))})"


class SubsetSource:
  """The records `rows` of `source`, in that order; `index` is the position in `rows`."""

  def __init__(self, source, rows: Sequence[int]):
    self.source = source
    self.rows = np.asarray(rows, np.int64)
    if len(self.rows) == 0:
      raise ValueError(f"SubsetSource of {source!r} selects no records")

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    out = dict(self.source[int(self.rows[index])])
    out["index"] = np.int64(index)
    return out

  def fingerprint(self) -> str:
    return _sha1("SubsetSource", self.source.fingerprint(), self.rows.tobytes())

  def __repr__(self) -> str:
    return f"SubsetSource({self.source!r}, n={len(self)})"


def _sha1(*parts) -> str:
  h = hashlib.sha1()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
    h.update(b"\0")
  return h.hexdigest()


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def meta(label, has_mask, dataset, category, defect, path) -> dict[str, Any]:
  return {"label": np.int32(label), "has_mask": np.bool_(has_mask), "dataset": _text(dataset),
          "category": _text(category), "defect": _text(defect), "path": _text(path)}
