"""grain input pipelines: a shuffled, repeating training stream and an exactly-once evaluation.

Training (`train_dataset`):

  MapDataset.source(source) -> .seed(seed) -> .shuffle() -> .repeat()   # epoch-aware permutations
    -> .map(Finish(crop))                                               # uint8 -> normalised f32
    -> _ProcessSlice(global_bs, process)                                # disjoint slice per host
    -> .batch(global_bs // process_count, drop_remainder=True)
    -> .to_iter_dataset() [-> .mp_prefetch(num_workers)]

Every process builds the same seeded global order, so the processes need no communication; each
takes its contiguous slice of every global batch, and `sharding.global_batch` assembles the
slices into one `jax.Array` sharded over the data axis. `.repeat()` after `.shuffle()` draws a
fresh permutation per epoch, so every image is visited once per epoch; batches simply run
across the epoch boundary. The official recipe (`drop_last=True`) drops the N % global_bs
remainder of each epoch instead; we keep its step count, `steps_per_epoch = N // global_bs`,
so a run of E epochs makes the same number of optimizer steps, and the images seen are the
first E * steps_per_epoch * bs of the concatenated epochs -- nothing is skipped, the last
partial epoch simply ends early.

Evaluation (`eval_batches`): the test split is laid out in global batches of `batch_size`; the
last one is padded so that every process runs ceil(N / batch_size) batches (multi-host SPMD needs
the same number of steps everywhere), and each row carries `valid` and its `index` into the
sample list. Every sample appears exactly once with valid=True across all processes.

Sources (`inpformer_jax.data.sources`) are grain random-access sources of uint8 images resized
to the config's resize size (or, few-shot, finished float32 images):
  * `PathSource(samples, resize)`      -- image files on disk (Sample records from the readers);
  * `ArrayRecordSource(...)`           -- ArrayRecord shards written by `prepare`
                                          (`tfds_builders/`), decoded without TensorFlow;
  * `ArraySource(images)`              -- in-memory arrays (few-shot: 22 augmented copies/shot);
  * `ConcatSource(*sources)`           -- several sources as one (joint training);
  * `SubsetSource(source, rows)`       -- some records of a source (a class subset of a
                                          prepared dataset, `prepared.open_split`).
The finishing step (`preprocess.finish_from_resized`: crop, /255, ImageNet normalisation) is the
same for all of them, so stored shards reproduce the file pipeline bit for bit. For fast
accelerators, `train_dataset(..., uint8=True)` stops at the uint8 crop and `normalize` finishes
it on the device (same values, a quarter of the bytes through worker queues and host-to-device).

Worker processes (num_workers > 0) are spawned by grain; they unpickle the pipeline, so sources
hold paths and open files lazily. Scripts that start workers need the usual
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from inpformer_jax.data import preprocess
from inpformer_jax.data import sources
from inpformer_jax.data.records import Sample

# ---------------------------------------------------------------------------------------
# Transforms.
# ---------------------------------------------------------------------------------------


class Finish(grain.transforms.Map):
  """Resized uint8 -> normalised float32 (crop, crop, 3); uint8 mask -> soft float32 (crop, crop).

  Float32 images (ArraySource) are already finished and only checked. normalize=False keeps
  the centre-cropped uint8 image (4x fewer bytes through the worker queues and to the
  device; `normalize` then finishes it on the accelerator).
  """

  def __init__(self, crop: int, normalize: bool = True):
    self.crop = crop
    self.normalize = normalize

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    img = element["image"]
    if img.dtype == np.uint8:
      if self.normalize:
        out["image"] = preprocess.finish_from_resized(img, self.crop)
      else:
        top, left = preprocess.center_crop_offsets(img.shape[0], img.shape[1], self.crop)
        out["image"] = np.ascontiguousarray(img[top:top + self.crop, left:left + self.crop])
    elif not self.normalize:
      raise ValueError("uint8 output needs uint8 sources; in-memory float images (few-shot) "
                       "are already normalised: use the default float32 output")
    elif img.shape != (self.crop, self.crop, 3):
      raise ValueError(f"in-memory float image of shape {img.shape} does not match the config's "
                       f"crop {self.crop}: augment at the same crop size as the model input")
    if "mask" in element:
      out["mask"] = preprocess.finish_mask_from_resized(element["mask"], self.crop)
    return out


def _normalize_table() -> np.ndarray:
  """float32 (256, 3): the official normalised value of each uint8 level, per channel."""
  levels = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32)
  return (levels / np.float32(255) - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD


def normalize(images):
  """uint8 (..., 3) crops -> the official normalised float32, wherever `images` live.

  A 256-entry lookup per channel rather than arithmetic: XLA rewrites x / c as x * (1 / c),
  which differs from torchvision's division in the last bit; the table holds the host's exact
  values, so this equals `preprocess.finish_from_resized` bit for bit on any device. Use it
  inside the jitted step with `train_dataset(..., uint8=True)`.
  """
  images = jnp.asarray(images)
  return jnp.asarray(_normalize_table())[images.astype(jnp.int32), jnp.arange(3)]


class _ProcessSlice(grain.MapDataset):
  """Element i of process p = element (i // per) * G + p * per + i % per of the global stream."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global = global_batch
    self._per = global_batch // process_count
    self._offset = process_index * self._per
    self._length = (len(parent) // global_batch) * self._per

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    b, k = divmod(index, self._per)
    return b * self._global + self._offset + k

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"_ProcessSlice(global={self._global}, per={self._per}, offset={self._offset})"


def process_and_count(process_index: int | None, process_count: int | None
                      ) -> tuple[int, int]:
  """(this process's index, the process count): jax's unless given, checked."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index {pi} is not in [0, process_count={pc})")
  return pi, pc


def _per_process(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{what} {batch_size} must be a positive multiple of the number of "
                     f"processes ({process_count}); change it in the config")
  return batch_size // process_count


def _mark_flags_parsed() -> None:
  # grain 0.2.18 reads its absl flags in the worker processes (spawned); when the main program
  # did not go through absl.app.run (tests, notebooks, scripts) they are unparsed and the
  # workers die with UnparsedFlagAccessError. Marking them parsed keeps their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Batches read ahead per process (and per worker): grain's default, 500 batches in flight,
# fills host memory whenever the consumer is slower than the readers (14.7 GB at batch 16 of
# 392 px float32); 16 batches keep the read threads busy and hold ~0.5 GB.
READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=16)


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  it = ds.to_iter_dataset(READ_OPTIONS)
  if num_workers > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def _make_source(samples, source, resize: int, with_masks: bool):
  if source is not None:
    if samples is not None:
      raise ValueError("pass either samples or source, not both")
    return source
  if isinstance(samples, np.ndarray):
    return sources.ArraySource(samples)
  if samples is None:
    raise ValueError("no data: pass samples (Sample records or an array) or a source")
  return sources.PathSource(samples, resize, with_masks=with_masks)


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
  """Optimizer steps per epoch with the official drop_last=True: N // global_batch."""
  steps = num_samples // global_batch_size
  if steps == 0:
    raise ValueError(f"{num_samples} training images are fewer than one global batch of "
                     f"{global_batch_size}: lower config.batch_size")
  return steps


def train_dataset(samples: Sequence[Sample] | np.ndarray | None = None, *, resize: int,
                  crop: int, global_batch_size: int, seed: int, num_workers: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  source=None, uint8: bool = False) -> grain.IterDataset:
  """The infinite training stream of this process's batches.

  samples: Sample records (read from files), or an in-memory array (see `ArraySource`), or None
    with `source` given (e.g. an `ArrayRecordSource`).
  Returns a grain IterDataset; `iter(ds)` yields {"image": float32 (b, crop, crop, 3),
  "index": int64 (b,)} with b = global_batch_size // process_count, and the iterator's
  `get_state()` / `set_state()` checkpoint its position (see `checkpoint.py`).
  uint8: deliver centre-cropped uint8 images and normalise on the device with `normalize`
    (for fast accelerators: a quarter of the host bytes and no host float math).
  """
  src = _make_source(samples, source, resize, with_masks=False)
  pi, pc = process_and_count(process_index, process_count)
  per = _per_process(global_batch_size, pc, "global_batch_size")
  logging.info("train data: %d images, global batch %d (%d per process x %d), %d steps per "
               "epoch (official drop_last=True), %d workers", len(src), global_batch_size, per,
               pc, steps_per_epoch(len(src), global_batch_size), num_workers)
  ds = grain.MapDataset.source(src).seed(seed).shuffle().repeat()
  ds = ds.map(Finish(crop, normalize=not uint8))
  ds = _ProcessSlice(ds, global_batch_size, pi, pc)
  ds = ds.batch(per, drop_remainder=True)
  return _to_iter(ds, num_workers)


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------


def eval_layout(num_samples: int, batch_size: int, process_index: int, process_count: int
                ) -> np.ndarray:
  """Sample positions this process evaluates, -1 for padding: int64 (num_batches * per,)."""
  per = _per_process(batch_size, process_count, "eval batch_size")
  num_batches = math.ceil(num_samples / batch_size)
  pos = np.arange(num_batches * batch_size).reshape(num_batches, process_count, per)
  pos = pos[:, process_index].reshape(-1)
  return np.where(pos < num_samples, pos, -1)


class _EvalElement(grain.transforms.Map):
  """Position (or -1) -> a finished row with `valid`; padding rows are zeros and empty strings."""

  def __init__(self, source, crop: int, uint8: bool = False):
    self.source = source
    self.finish = Finish(crop, normalize=not uint8)
    self.crop = crop
    self.dtype = np.uint8 if uint8 else np.float32

  def map(self, position: int) -> dict[str, Any]:
    if position >= 0:
      row = self.finish.map(self.source[int(position)])
      row["valid"] = np.bool_(True)
      return row
    c = self.crop
    row = {"index": np.int64(-1), "image": np.zeros((c, c, 3), self.dtype),
           "mask": np.zeros((c, c), np.float32), "valid": np.bool_(False)}
    row.update(sources.meta(0, False, "", "", "", ""))
    return row


@dataclasses.dataclass
class EvalBatches:
  """Re-iterable evaluation batches of one process; `len()` is the same on every process."""
  dataset: grain.IterDataset
  num_batches: int
  num_samples: int

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.dataset)


def eval_batches(samples: Sequence[Sample] | None = None, *, resize: int, crop: int,
                 batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 0,
                 source=None, uint8: bool = False) -> EvalBatches:
  """Every test image exactly once, in padded batches.

  batch_size: the GLOBAL eval batch (a multiple of process_count, and of the local device
    count if the batch is sharded); each process gets batch_size // process_count rows.
  Each batch: image float32 (b, crop, crop, 3); mask float32 (b, crop, crop) soft, zeros for
  normal images and for classes without masks; label int32 (b,); has_mask bool (b,);
  valid bool (b,); index int64 (b,) (position in `samples`, -1 on padding); and host-side
  unicode arrays dataset/category/defect/path (b,) ("" on padding).
  uint8: images as centre-cropped uint8 (b, crop, crop, 3), to `normalize` on the device (a
    quarter of the bytes to stack and to transfer, no host float math).
  """
  src = _make_source(samples, source, resize, with_masks=True)
  pi, pc = process_and_count(process_index, process_count)
  per = _per_process(batch_size, pc, "eval batch_size")
  layout = eval_layout(len(src), batch_size, pi, pc)
  ds = grain.MapDataset.source(layout).map(_EvalElement(src, crop, uint8))
  if num_workers > 0:
    return EvalBatches(_to_iter(ds.batch(per), num_workers), len(layout) // per, len(src))
  # In this process: the threads read images, not batches, in order, so the first batch is
  # ready once its own images are (threads each reading a whole batch would finish the
  # first only with the others: ~8x later on 2 cores), two batches ahead. Decoding is CPU
  # work: more threads than cores only contend for the GIL (+25% CPU with 8 on 2 cores).
  threads = max(2, min(READ_OPTIONS.num_threads, os.cpu_count() or 1))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(16, 2 * per)))
  return EvalBatches(it.batch(per), len(layout) // per, len(src))
