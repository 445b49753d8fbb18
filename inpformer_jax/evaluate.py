"""Evaluation: test images -> anomaly maps -> streaming per-class metrics.

  maps      (B, 256, 256)  `anomaly_map.maps_and_scores`: the reconstruction map (SPEC §7.1)
                           or, zero-shot, the distance to the nearest INP (SPEC §7.3)
  scores    (B,)           mean of the top 1% map pixels
  masks     (B, 256, 256)  soft GT at the crop size, nearest-resized to 256 as the official
                           `F.interpolate(gt, 256, mode='nearest')`; the metric binarises it

Maps are reduced per class as they arrive (`metrics.MetricAccumulator`), so host memory is
bounded by one class, never by the test set. Every process runs the same number of padded
batches and accumulates only its own valid rows (`pipeline.eval_batches` gives each its slice
of every global batch), so each test image is evaluated once. One process finishes each
class (metrics, threshold, gallery panels) in a worker thread as soon as the class's last
image is in; with several, at the end every class is merged exactly across processes
(`result(reduce)`, in the order of `samples`, the same everywhere): the anomalous pixels
(score + region area) and the image labels and scores are gathered to every process and the
negatives' counts summed; the normal pixels never leave their process. Process 0 returns
the results (and `reports` writes).

Per-process memory of the merge, for a class of N test images of which a fraction f of the
256x256 pixels is anomalous, on P processes: the local state, 4 B per normal and 8 B per
anomalous pixel of the process's own N/P images, plus, during `result()`, ~35-40 B per
anomalous pixel of the WHOLE class (all positives gathered, concatenated, argsorted), 9 B per
image and at most `metrics.SUM_BYTES` (64 MiB) of count vectors. N = 5,000, f = 2% (6.6 M
anomalous pixels; benchmark with the other processes simulated, numpy side): P = 1 holds
1.34 GB + 0.36-0.54 GB in result(); P = 2: 0.67 + 0.33-0.38 GB; P = 8: 0.17 + 0.23-0.26 GB.
Each gather also passes through the local devices (`process_allgather`: P x the largest
part on each, briefly), i.e. ~26 MB per device for those 6.6 M positives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from inpformer_jax import anomaly_map
from inpformer_jax import checkpoint
from inpformer_jax import metrics as metrics_lib
from inpformer_jax import report_page
from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax import visuals
from inpformer_jax.data import pipeline
from inpformer_jax.data.records import Sample
from inpformer_jax.deploy import calibration


# uint8 crops -> the official normalised float32, bit for bit, where the batch lives.
_normalize = jax.jit(pipeline.normalize)


def make_forward(model, config, mesh):
  """The jitted forward of `config.eval`, its outputs split over the mesh's batch axes."""
  return anomaly_map.jit_maps_and_scores(
      model, image_size=config.data.crop, map_kind=settings.map_kind(config),
      top_ratio=config.eval.top_ratio, out_sharding=sharding.batch_sharding(mesh))


def evaluate(model, params, samples: Sequence[Sample], config, mesh, *,
             workdir: str | os.PathLike | None = None, desc: str = "eval",
             forward=None, source=None) -> dict:
  """Runs the test set through the model and returns {dataset: {category: metrics}}.

  `params` is the full parameter tree (encoder + trainable), placed on `mesh`; `forward` a
  jitted function from `make_forward` to reuse (one is made if None); `source` the grain
  source of the samples' images (record i: samples[i]; None: the image files). With several
  processes every one calls this with the same `samples`; process 0 gets the results, the
  others {}.
  """
  ec = config.eval
  sharding.check_batch_size(ec.batch_size, mesh, "config.eval.batch_size")
  forward = forward or make_forward(model, config, mesh)
  batches = pipeline.eval_batches(None if source is not None else samples,
                                  resize=config.data.resize, crop=config.data.crop,
                                  batch_size=ec.batch_size, num_workers=config.data.num_workers,
                                  source=source, uint8=True)
  is_main = jax.process_index() == 0
  # Every class of `samples`, in one order on every process (the merge's collectives follow
  # it), with masks decided per class: a process may see no rows of a class.
  has_mask: dict[tuple[str, str], bool] = {}
  for s in samples:
    key = (s.dataset, s.category)
    has_mask[key] = has_mask.get(key, True) and s.has_mask
  accs = {key: metrics_lib.MetricAccumulator(protocol=ec.protocol, gt_threshold=ec.gt_threshold)
          for key in has_mask}
  # This process's test images per class still to come: a class is complete at 0.
  left: dict[tuple[str, str], int] = {}
  for i in pipeline.eval_layout(len(samples), ec.batch_size, jax.process_index(),
                                jax.process_count()):
    if i >= 0:
      key = (samples[i].dataset, samples[i].category)
      left[key] = left.get(key, 0) + 1
  # The gallery is drawn only where the report is written.
  gallery = (visuals.Gallery(ec.gallery_size) if ec.gallery_size and workdir is not None
             else None)
  # One process: each class is finished (metrics, threshold, gallery panels) in a thread as
  # soon as its last image is in, beside the forwards of the next classes. Several processes
  # merge the classes in one order at the end (collectives).
  early = _Early() if jax.process_count() == 1 else None
  finish = _Finish(workdir, gallery) if early is not None else None
  n_rows, t0 = 0, time.time()
  outputs = _ahead(lambda b: forward(params, _normalize(
      sharding.global_batch({"image": b["image"]}, mesh)["image"])), batches)
  for batch, out in tqdm.tqdm(outputs, total=len(batches), desc=desc, disable=not is_main,
                              dynamic_ncols=True):
    maps, scores = _local_rows(out["anomaly_map"]), _local_rows(out["score"])
    index = np.asarray(batch["index"])
    masks = anomaly_map.resize_masks_to_map(np.asarray(batch["mask"], np.float32))
    n_rows += int((index >= 0).sum())
    for key, rows in _group_rows(samples, index).items():
      picked = [samples[i] for i in index[rows]]
      labels = np.array([s.label for s in picked], np.int32)
      accs[key].add(maps[rows], masks[rows] if has_mask[key] else None, labels, scores[rows])
      if gallery is not None:
        gallery.add(key, np.asarray(batch["image"])[rows],
                    masks[rows] if has_mask[key] else None, maps[rows], scores[rows], labels,
                    [_name(s) for s in picked], [s.defect for s in picked])
      left[key] -= len(picked)
      if left[key] == 0:
        if early is not None:
          early.submit(key, lambda key=key: finish(key, accs[key].result()))
        elif gallery is not None:
          gallery.close(key)  # only its kept images' tiles stay until the merge
  logging.info("process %d/%d evaluated %d of %d test images in %.1fs", jax.process_index(),
               jax.process_count(), n_rows, len(samples), time.time() - t0)
  results: dict[str, dict[str, dict]] = {}
  if early is not None:
    for key in accs:
      results.setdefault(key[0], {})[key[1]] = early.result(key)
    return results
  reduce = _ProcessGather()
  merged = {key: acc.result(reduce) for key, acc in accs.items()}
  if gallery is not None:
    gallery = _merged(gallery, list(accs), reduce)  # collectives: every process takes part
  if not is_main:
    return {}
  finish = _Finish(workdir, gallery)
  for key, res in merged.items():
    results.setdefault(key[0], {})[key[1]] = finish(key, res)
  return results


class _Finish:
  """A class's metrics as the report takes them (process 0): the F1-optimal image
  threshold, the calibration, and the gallery panels under WORKDIR/report_files."""

  def __init__(self, workdir, gallery: visuals.Gallery | None):
    # WORKDIR/calibration.json (`deploy.calibrate`): its image threshold and pixel range then
    # decide the page's mistakes and colour scale.
    self.cal_path = workdir and checkpoint.calibration_path(workdir)
    self.calibrated = self.cal_path and checkpoint.read_calibration(self.cal_path)
    self.workdir, self.gallery = workdir, gallery

  def __call__(self, key, res: metrics_lib.Metrics) -> metrics_lib.Metrics:
    # Metrics keep their info: reports read from it why pixel metrics are absent.
    m = metrics_lib.Metrics({k: float(v) for k, v in res.items()}, res.info)
    m.info["threshold"] = _f1_threshold(m.info)
    if self.calibrated:
      m.info["calibrated"] = dict(self.calibrated["image"], source=str(self.cal_path))
    if self.gallery is not None and key in self.gallery.keys():
      scale = calibration.pixel_range(self.calibrated)
      decide = m.info.get("calibrated") or m.info["threshold"]
      m.info["gallery"] = self.gallery.write(
          key, Path(self.workdir) / report_page.FILES / key[0] / key[1],
          decide and decide["threshold"], scale,
          decided_by="calibrated" if m.info.get("calibrated") else "F1-optimal",
          **({"scale_source": f"{checkpoint.CALIBRATION_FILE}'s pixel range"} if scale else {}))
      self.gallery.drop(key)  # written: its images (some never drawn) are not needed again
    return m


class _Early:
  """Each class finished in a worker thread once all its rows are in (one process only).
  NumPy and PIL release the GIL, so on a CPU the other core finishes a class while this one
  feeds the next batches, and little is left after the last batch."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="class-finish")
    self._futures: dict = {}

  def submit(self, key, job) -> None:
    self._futures[key] = self._pool.submit(job)

  def result(self, key) -> metrics_lib.Metrics:
    out = self._futures.pop(key).result()
    if not self._futures:
      self._pool.shutdown()
    return out


def _ahead(forward, batches):
  """(batch, forward(batch)) for each batch, the next batch's forward dispatched before this
  one is handed out: the device computes it while the host accumulates this one's metrics
  (JAX dispatch is asynchronous; only reading the outputs waits)."""
  pending = None
  for batch in batches:
    out = forward(batch)
    if pending is not None:
      yield pending
    pending = (batch, out)
  if pending is not None:
    yield pending


def _merged(gallery: visuals.Gallery, keys, reduce: "_ProcessGather") -> visuals.Gallery:
  """The gallery of every process's kept images (each process keeps those of its own rows;
  every process calls this with the same keys, in the same order)."""
  merged = visuals.Gallery(gallery.k, gallery.tile)
  for key in keys:
    gathered = {name: reduce.gather(x) for name, x in gallery.export(key).items()}
    for p in range(jax.process_count()):
      merged.absorb(key, {name: parts[p] for name, parts in gathered.items()})
  return merged


def _f1_threshold(info: dict) -> dict | None:
  """The F1-optimal image threshold of the class (`calibrate --val`'s rule), or None when
  its test set holds one label only."""
  labels = info["labels"]
  if labels.all() or not labels.any():
    return None
  return calibration.f1_threshold(info["scores"], labels)


def _name(s: Sample) -> str:
  """What the gallery calls a test image: its defect folder and file name."""
  return f"{s.defect}/{Path(s.image_path).name}"


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in the order of its local batch.

  `jax.make_array_from_process_local_data` (`sharding.global_batch`) lays the local rows
  over this process's row blocks in ascending global order, contiguous or not: reading
  the addressable shards sorted by their first row undoes it.
  """
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # one per block
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


class _ProcessGather:
  """`metrics.MetricAccumulator.result`'s reducer over the processes.

  Variable-length all-gathers of raw bytes: exact for every dtype (int64 and float64 too,
  which JAX's 32-bit default would cast); the padded length is bucketed so the gathers
  compile for a few shapes, not one per class.
  """

  def gather(self, x: np.ndarray) -> list[np.ndarray]:
    x = np.ascontiguousarray(x).reshape(-1)
    data = x.view(np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
    sizes = sizes.reshape(-1).tolist()
    size = _bucket(max(sizes))
    if size == 0:
      return [x[:0]] * len(sizes)
    padded = np.zeros(size, np.uint8)
    padded[:len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))  # (processes, size)
    return [everyone[p, :n].view(x.dtype) for p, n in enumerate(sizes)]


def _bucket(n: int) -> int:
  """n rounded up to 8 steps per power of two (at most 1/8 of padding)."""
  if n <= 64:
    return 0 if n == 0 else 64
  step = 1 << (n.bit_length() - 4)
  return -(-n // step) * step


def _group_rows(samples, index: np.ndarray) -> dict[tuple[str, str], slice | np.ndarray]:
  """The rows of a batch per class, padding (-1) left out: a slice where they are contiguous
  (test sets are stored class by class), so the batch's arrays are viewed, not copied."""
  groups: dict[tuple[str, str], list[int]] = {}
  for row, i in enumerate(index):
    if i >= 0:
      s = samples[int(i)]
      groups.setdefault((s.dataset, s.category), []).append(row)
  return {k: slice(v[0], v[-1] + 1) if v[-1] - v[0] == len(v) - 1 else np.asarray(v)
          for k, v in groups.items()}
