"""Evaluation: test images -> anomaly maps -> streaming per-class metrics -> reports.

  maps      (B, 256, 256)  reconstruction map (1 - cos(en, de), SPEC §7.1) or, zero-shot,
                           the distance to the nearest INP (SPEC §7.3); smoothed
  scores    (B,)           mean of the top 1% map pixels
  masks     (B, 256, 256)  soft GT at the crop size, nearest-resized to 256 as the official
                           `F.interpolate(gt, 256, mode='nearest')`; the metric binarises it

Maps are reduced per class as they arrive (`metrics.MetricAccumulator`), so host memory is
bounded by one class, never by the test set. Every process runs the same padded batches; the
maps are gathered once to process 0, which alone accumulates and writes the reports:
  results.json  per dataset, per class, the seven metrics, the means, protocol and encoder
  results.md    the paper's per-class table (x100, one decimal) with the Mean row
  results.csv   one row per class and per dataset mean
  overlays/     optional PNGs of image / GT / map (config.eval.num_overlays per class)
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from inpformer_jax import sharding
from inpformer_jax.data.records import Sample

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
MAP_SIZE = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def nearest_resize_masks(masks: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
  """(B, S, S) -> (B, size, size) with torch 'nearest': source index floor(dst * S / size)."""
  s = masks.shape[-1]
  idx = np.floor(np.arange(size) * (s / size)).astype(np.int64)
  return masks[:, idx][:, :, idx]


def make_eval_step(model, *, image_size: int, map_kind: str, top_ratio: float, mesh):
  """jitted (params, images (B,S,S,3)) -> (maps (B,256,256), scores (B,)), batch-sharded."""
  if map_kind not in MAP_KINDS:
    raise ValueError(f"config.eval.map={map_kind!r}: use one of {MAP_KINDS}")
  data_sh = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=(data_sh, data_sh))
  def eval_step(params, images):
    return maps_and_scores(model, params, images, image_size=image_size, map_kind=map_kind,
                           top_ratio=top_ratio)

  return eval_step


MAP_KINDS = ("reconstruction", "inp_distance")


def maps_and_scores(model, params, images, *, image_size: int,
                    map_kind: str = "reconstruction", top_ratio: float = 0.01):
  """Pure: images (B, S, S, 3) normalised -> (maps (B, 256, 256) float32, scores (B,)).

  'reconstruction' is the INP-Former map (encoder vs decoder groups); 'inp_distance' the
  zero-shot map (distance of each token to its nearest INP). Shared by evaluation, predict
  and the exported serving function.
  """
  from inpformer_jax import anomaly_map as am  # pylint: disable=g-import-not-at-top
  if map_kind not in MAP_KINDS:
    raise ValueError(f"map_kind={map_kind!r}: use one of {MAP_KINDS}")
  out = model.apply({"params": params}, images)
  if map_kind == "inp_distance":
    amap = am.zero_shot_map(out["distance"], image_size)
  else:
    amap = am.anomaly_map(out["en"], out["de"], image_size)
  return amap, am.image_score(amap, top_ratio)


def _to_host(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the full numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate(model, params, samples: Sequence[Sample], config, mesh, *,
             workdir: str | os.PathLike | None = None, desc: str = "eval",
             eval_step=None) -> dict:
  """Runs the test set through the model and returns {dataset: {category: metrics}}.

  `params` is the full parameter tree (encoder + trainable), placed on `mesh`; `eval_step`
  a jitted step from `make_eval_step` to reuse (one is made if None).
  """
  from inpformer_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from inpformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ec = config.eval
  sharding.check_batch_size(ec.batch_size, mesh, "config.eval.batch_size")
  step = eval_step or make_eval_step(model, image_size=config.data.crop, map_kind=ec.map,
                                     top_ratio=ec.top_ratio, mesh=mesh)
  batches = pipeline.eval_batches(samples, resize=config.data.resize, crop=config.data.crop,
                                  batch_size=ec.batch_size, num_workers=config.data.num_workers)
  is_main = jax.process_index() == 0
  accs: dict[tuple[str, str], Any] = {}
  overlays: dict[tuple[str, str], list] = {}
  t0 = time.time()
  for batch in tqdm.tqdm(batches, total=len(batches), desc=desc, disable=not is_main,
                         dynamic_ncols=True):
    images = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                    np.asarray(batch["image"]))
    maps, scores = step(params, images)
    maps, scores = _to_host(maps), _to_host(scores)
    index = _gather_local(np.asarray(batch["index"]), mesh)
    masks = _gather_local(np.asarray(batch["mask"], np.float32), mesh)
    if not is_main:
      continue
    masks = nearest_resize_masks(masks)
    valid = index >= 0
    for (dataset, category), rows in _group_rows(samples, index[valid]).items():
      rows = np.flatnonzero(valid)[rows]
      key = (dataset, category)
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
    save_overlays(overlays, Path(workdir) / "overlays")
  return results


def _gather_local(x: np.ndarray, mesh) -> np.ndarray:
  """Host-local rows of every process, concatenated in process order (== global order)."""
  if jax.process_count() == 1:
    return x
  arr = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x)
  return _to_host(arr)


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


def save_overlays(overlays: dict, directory: Path) -> list[Path]:
  """One PNG per kept image: input, ground truth, anomaly map over the input."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  for (dataset, category), items in overlays.items():
    out = directory / dataset / category
    out.mkdir(parents=True, exist_ok=True)
    for k, it in enumerate(items):
      img = np.clip(it["image"] * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
      img256 = np.asarray(jax.image.resize(img, (MAP_SIZE, MAP_SIZE, 3), "linear"))
      fig, ax = plt.subplots(1, 3, figsize=(9, 3.2))
      ax[0].imshow(img256)
      ax[0].set_title(f"{it['defect']}")
      ax[1].imshow(it["mask"], cmap="gray", vmin=0, vmax=1)
      ax[1].set_title("ground truth")
      ax[2].imshow(img256)
      ax[2].imshow(it["map"], cmap="jet", alpha=0.5)
      ax[2].set_title(f"map, score {it['score']:.4f}")
      for a in ax:
        a.axis("off")
      fig.tight_layout()
      path = out / f"{k:02d}_{Path(it['path']).stem}.png"
      fig.savefig(path, dpi=80)
      plt.close(fig)
      written.append(path)
  return written


# ---------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------


def with_means(results: dict[str, dict[str, dict]]) -> dict:
  """{dataset: {category: m}} -> {dataset: {"classes": ..., "mean": macro average}} (the mean
  of each metric over the classes where it is defined, as the paper's Mean rows)."""
  from inpformer_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  return {dataset: {"classes": per_class,
                    "mean": {k: float(v) for k, v in
                             metrics_lib.macro_average(per_class).items()}}
          for dataset, per_class in results.items()}


def write_reports(results: dict[str, dict[str, dict]], workdir: str | os.PathLike,
                  info: dict) -> dict:
  """Writes results.{json,md,csv} into `workdir`; returns the JSON object.

  info: what produced the numbers (setting, protocol, gt_threshold, encoder, step, ...).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # Undefined metrics (e.g. pixel metrics of a class without masks) are null, not NaN.
  report = _nan_to_none({"info": info, "metrics": list(METRIC_NAMES),
                         "datasets": with_means(results)})
  _atomic_write(workdir / "results.json", json.dumps(report, indent=2, allow_nan=False))
  _atomic_write(workdir / "results.md", markdown_table(report))
  rows = [["dataset", "category", *METRIC_NAMES]]
  for dataset, d in report["datasets"].items():
    for category, m in list(d["classes"].items()) + [("Mean", d["mean"])]:
      rows.append([dataset, category, *[_fmt(m.get(n), 6) for n in METRIC_NAMES]])
  tmp = workdir / "results.csv.tmp"
  with open(tmp, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  tmp.replace(workdir / "results.csv")
  return report


def markdown_table(report: dict) -> str:
  """The paper's per-class layout: one table per dataset, metrics in %, a Mean row."""
  info = report["info"]
  lines = [f"# Results ({info.get('setting', '')})", ""]
  lines.append(", ".join(f"{k}: {v}" for k, v in info.items()))
  for dataset, d in report["datasets"].items():
    lines += ["", f"## {dataset}", "",
              "| Category | " + " | ".join(METRIC_NAMES) + " |",
              "|---|" + "---:|" * len(METRIC_NAMES)]
    for category, m in d["classes"].items():
      lines.append(f"| {category} | " + " | ".join(_pct(m.get(n)) for n in METRIC_NAMES) + " |")
    lines.append("| **Mean** | " + " | ".join(f"**{_pct(d['mean'].get(n))}**"
                                              for n in METRIC_NAMES) + " |")
  return "\n".join(lines) + "\n"


def _pct(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _fmt(x, digits) -> str:
  return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _nan_to_none(x):
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  if isinstance(x, float) and math.isnan(x):
    return None
  return x


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
