"""Evaluation: test images -> anomaly maps -> streaming per-class metrics.

  maps      (B, 256, 256)  `anomaly_map.maps_and_scores`: the reconstruction map (SPEC §7.1)
                           or, zero-shot, the distance to the nearest INP (SPEC §7.3)
  scores    (B,)           mean of the top 1% map pixels
  masks     (B, 256, 256)  soft GT at the crop size, nearest-resized to 256 as the official
                           `F.interpolate(gt, 256, mode='nearest')`; the metric binarises it

Maps are reduced per class as they arrive (`metrics.MetricAccumulator`), so host memory is
bounded by one class, never by the test set. Every process runs the same padded batches; the
maps are gathered once to process 0, which alone accumulates (and `reports` writes).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from inpformer_jax import anomaly_map
from inpformer_jax import metrics as metrics_lib
from inpformer_jax import reports
from inpformer_jax import sharding
from inpformer_jax.data import pipeline
from inpformer_jax.data.records import Sample


def make_forward(model, config, mesh):
  """The jitted forward of `config.eval`, its outputs split over the mesh's batch axes."""
  return anomaly_map.jit_maps_and_scores(
      model, image_size=config.data.crop, map_kind=config.eval.map,
      top_ratio=config.eval.top_ratio, out_sharding=sharding.batch_sharding(mesh))


def _to_host(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the full numpy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate(model, params, samples: Sequence[Sample], config, mesh, *,
             workdir: str | os.PathLike | None = None, desc: str = "eval",
             forward=None) -> dict:
  """Runs the test set through the model and returns {dataset: {category: metrics}}.

  `params` is the full parameter tree (encoder + trainable), placed on `mesh`; `forward` a
  jitted function from `make_forward` to reuse (one is made if None).
  """
  ec = config.eval
  sharding.check_batch_size(ec.batch_size, mesh, "config.eval.batch_size")
  forward = forward or make_forward(model, config, mesh)
  batches = pipeline.eval_batches(samples, resize=config.data.resize, crop=config.data.crop,
                                  batch_size=ec.batch_size, num_workers=config.data.num_workers)
  is_main = jax.process_index() == 0
  accs: dict[tuple[str, str], Any] = {}
  overlays: dict[tuple[str, str], list] = {}
  t0 = time.time()
  for batch in tqdm.tqdm(batches, total=len(batches), desc=desc, disable=not is_main,
                         dynamic_ncols=True):
    out = forward(params, sharding.global_batch({"image": batch["image"]}, mesh)["image"])
    maps, scores = _to_host(out["anomaly_map"]), _to_host(out["score"])
    index = _gather_local(np.asarray(batch["index"]), mesh)
    masks = _gather_local(np.asarray(batch["mask"], np.float32), mesh)
    if not is_main:
      continue
    masks = anomaly_map.resize_masks_to_map(masks)
    valid = index >= 0
    for key, rows in _group_rows(samples, index[valid]).items():
      rows = np.flatnonzero(valid)[rows]
      if key not in accs:
        accs[key] = metrics_lib.MetricAccumulator(protocol=ec.protocol,
                                                  gt_threshold=ec.gt_threshold)
      labels = np.array([samples[i].label for i in index[rows]], np.int32)
      has_mask = all(samples[i].has_mask for i in index[rows])
      accs[key].add(maps[rows], masks[rows] if has_mask else None, labels, scores[rows])
      if ec.num_overlays:
        _keep_overlays(overlays.setdefault(key, []), ec.num_overlays, batch, index, rows,
                       maps, masks, scores, samples)
  if not is_main:
    return {}
  logging.info("evaluated %d test images in %.1fs", len(samples), time.time() - t0)
  results: dict[str, dict[str, dict]] = {}
  for (dataset, category), acc in accs.items():
    results.setdefault(dataset, {})[category] = {k: float(v) for k, v in acc.result().items()}
  if workdir is not None and ec.num_overlays:
    reports.save_overlays(overlays, Path(workdir) / "overlays")
  return results


def _gather_local(x: np.ndarray, mesh) -> np.ndarray:
  """Host-local rows of every process, concatenated in process order (== global order)."""
  if jax.process_count() == 1:
    return x
  return _to_host(sharding.global_batch({"x": x}, mesh)["x"])


def _group_rows(samples, index: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
  groups: dict[tuple[str, str], list[int]] = {}
  for row, i in enumerate(index):
    s = samples[int(i)]
    groups.setdefault((s.dataset, s.category), []).append(row)
  return {k: np.asarray(v) for k, v in groups.items()}


def _keep_overlays(store, limit, batch, index, rows, maps, masks, scores, samples):
  """Keeps the first `limit` anomalous images of a class (normal ones if it has none)."""
  if jax.process_count() > 1:
    return  # images are process-local; overlays come from single-process runs.
  for r in rows:
    if len(store) >= limit:
      return
    s = samples[int(index[r])]
    store.append(dict(image=np.asarray(batch["image"][r]), mask=masks[r], map=maps[r],
                      score=float(scores[r]), path=s.image_path, label=s.label, defect=s.defect))
