"""The field's seven anomaly-detection metrics for one class, streamed batch by batch.

I-AUROC, I-AP, I-F1max (image level, from image scores) and P-AUROC, P-AP, P-F1max, AUPRO
(pixel level, from anomaly maps and ground-truth masks), under two protocols:

* `"official"` reproduces INP-Former's `utils.ader_evaluator` (SPEC §7.2): scikit-learn for
  the image metrics and, on all pixels, for P-F1max; the `adeval` 200-bin histogram
  accumulator for P-AUROC, P-AP and AUPRO, quirks included:
  - bins span THIS class's map [min, max]; an underflow bin (< min) and an overflow bin
    (>= max) frame them, and a pixel equal to max is counted in the last bin AND in overflow;
  - the bin of x is `int((x - min) * 200 / (max - min))` in float32 (torch.histc's rule);
  - P-AUROC / P-AP are trapezoids over the 201 binned curve points (not sklearn's step AP);
  - AUPRO weights each positive pixel by 1 / area of its 8-connected GT region (area counted
    per image), integrates the weighted-TPR-vs-FPR curve up to FPR 0.3 with adeval's
    `_trapezoid_intep` partial segment, and divides by 0.3.
* `"exact"`: AUROC, AP and F1max equal to scikit-learn on the same float32 pixels (ties
  handled as sklearn does: all scores equal to a threshold switch together), and an exact
  AUPRO: the PRO curve (mean over GT regions of the fraction of the region at or above the
  threshold, vs the FPR of normal pixels) through EVERY distinct score, integrated with the
  trapezoid rule from FPR 0 to 0.3 (the curve linearly interpolated at 0.3), divided by 0.3 --
  the definition of the MVTec AD evaluation code (Bergmann et al., IJCV 2021).

Both protocols share one exact core (`metric_curves`): counts, at the distinct scores of the
positive (anomalous) pixels, of the positives and negatives at or above them. "exact" counts
the negatives at every such score, in the sorted normal pixels; "official" needs them only at
the few scores that can hold P-F1max and at the plotted ones, which a value histogram of the
normal pixels picks, and bins the normal pixels with a bincount: it never sorts them all.

Memory, and the min/max problem. adeval needs the class's global map min/max before the
first pixel is binned, and the official P-F1max is exact on all pixels; neither allows a
fixed-size summary of a class seen once. `MetricAccumulator` therefore keeps the pixel
scores of the class being evaluated as compact arrays -- float32 per normal pixel (4 B),
float32 score + int32 region area per anomalous pixel (8 B) -- and bins them in `result()`,
when min/max are known: ONE pass over the maps, host memory bounded by the class, not the
test set (measured peak ~80 MB + 4.3 B/pixel: 350 MB for 1,000 maps of 256x256, where
scikit-learn peaks at 3.4 GB; benchmarks/metrics_bench.py). `result()` adds one 64 MiB block,
an argsort of the anomalous pixels and, under "official", counting passes over 1 MiB chunks
and a sort of the normal pixels near the chosen scores ("exact" sorts them all, in place).
With masks=None nothing per pixel is kept.

Several processes. Each feeds its own rows of a class to its own accumulator; `result(reduce)`
merges them exactly through `reduce.gather` (see `SingleProcess`). Every metric is a function
of the positives (with their region areas) and of COUNTS of negatives -- at each distinct
positive score (exact metrics), per value bucket and then at the scores the summed buckets
pick (official P-F1max and curves), or per bin (official histogram); the last two after a
min/max over hosts -- and counts add over any split of the negatives. So the positives and
image scores are gathered to every process, count vectors are summed, and the negatives,
nearly all the pixels, never leave their process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from tqdm import tqdm

from inpformer_jax import metric_curves as C
from inpformer_jax.metric_curves import F1_EPS, OFFICIAL_NBINS

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
IMAGE_METRICS = METRIC_NAMES[:3]
PIXEL_METRICS = METRIC_NAMES[3:]
PROTOCOLS = ("official", "exact")

# Bytes of a count vector summed over processes per gather, all processes' parts together:
# a merge holds this much of them at once, not one count per distinct positive score per
# process.
SUM_BYTES = 64 << 20

# 8-connectivity inside each image, none across the batch axis (cv2 connectivity=8).
_CC_STRUCTURE = np.zeros((3, 3, 3), bool)
_CC_STRUCTURE[1] = True


class Metrics(dict):
  """Metric name -> float (the keys of METRIC_NAMES); `info` holds flags and notes."""

  def __init__(self, values: Mapping[str, float], info: dict | None = None):
    super().__init__(values)
    self.info = dict(info or {})


# ---------------------------------------------------------------------------------------
# Image metrics.
# ---------------------------------------------------------------------------------------


def _image_metrics(labels: np.ndarray, scores: np.ndarray, protocol: str) -> dict:
  labels = labels.astype(bool)
  if labels.all() or not labels.any():
    return {k: math.nan for k in IMAGE_METRICS}
  if protocol == "official":  # what ader_evaluator calls, verbatim
    precs, recs, _ = precision_recall_curve(labels.astype(np.int64), scores)
    f1s = 2 * precs * recs / (precs + recs + F1_EPS)
    labels = labels.astype(np.int64)
    return {
        "I-AUROC": float(roc_auc_score(labels, scores)),
        "I-AP": float(average_precision_score(labels, scores)),
        "I-F1max": float(f1s[:-1].max()),
    }
  r = C.ranks(np.sort(scores[labels]), np.sort(scores[~labels]))
  return {"I-AUROC": C.exact_auroc(r), "I-AP": C.exact_ap(r), "I-F1max": C.exact_f1max(r)}


# ---------------------------------------------------------------------------------------
# Streaming accumulator.
# ---------------------------------------------------------------------------------------


def _as_maps(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[1] == 1:  # (N, 1, H, W) as the torch code keeps them
    x = x[:, 0]
  if x.ndim != 3:
    raise ValueError(f"metrics: {name} must be (N, H, W) (or (N, 1, H, W)); got {x.shape}.")
  return x


class _Column:
  """Append-only 1-D array kept in fixed 64 MiB blocks.

  Blocks above glibc's largest mmap threshold (32 MiB) go back to the OS when freed, so
  `gather()` (one contiguous array for the sort) peaks at the data plus one block; keeping
  each batch's small array instead leaves freed memory in the heap and doubles the peak.
  Untouched pages of the open block are never resident.
  """

  def __init__(self, dtype, block_bytes: int = 64 << 20):
    self.dtype = np.dtype(dtype)
    self.block = max(1, block_bytes // self.dtype.itemsize)
    self.parts: list[np.ndarray] = []  # closed blocks / gathered arrays, then the open block
    self.fill = 0  # items used in the open block (the last part), 0 when none is open
    self.size = 0

  def append(self, x: np.ndarray) -> None:
    x = x.reshape(-1)
    self.size += len(x)
    while len(x):
      if not self.fill:
        self.parts.append(np.empty(self.block, self.dtype))
      k = min(len(x), self.block - self.fill)
      self.parts[-1][self.fill:self.fill + k] = x[:k]
      self.fill = (self.fill + k) % self.block
      x = x[k:]

  def gather(self) -> np.ndarray:
    """All items as one array; the column then holds just that array."""
    if len(self.parts) == 1 and not self.fill:
      return self.parts[0]
    out = np.empty(self.size, self.dtype)
    i = 0
    while self.parts:
      p = self.parts.pop(0)
      k = self.fill if (self.fill and not self.parts) else len(p)
      out[i:i + k] = p[:k]
      i += k
      del p  # freed now: the peak stays at one block above the data
    self.set(out)
    return out

  def set(self, x: np.ndarray) -> None:
    self.parts, self.fill, self.size = [x], 0, len(x)


class MetricAccumulator:
  """The seven metrics of ONE class, fed batch by batch.

  acc = MetricAccumulator(protocol="official")
  for maps, masks, labels, scores in batches:  # maps/masks (B, H, W); labels/scores (B,)
    acc.add(maps, masks, labels, scores)
  metrics = acc.result()

  Host memory: see the module docstring. Masks are binarised `> gt_threshold` (0.5: current
  official; 0: the paper-era rule). `value_range` (official only) fixes adeval's [min, max].
  """

  def __init__(self, protocol: str = "official", gt_threshold: float = 0.5,
               value_range: tuple[float, float] | None = None,
               nbins: int = OFFICIAL_NBINS):
    if protocol not in PROTOCOLS:
      raise ValueError(f"metrics: protocol must be one of {PROTOCOLS}; got {protocol!r}.")
    if value_range is not None:
      if protocol != "official":
        raise ValueError("metrics: value_range only applies to protocol='official'.")
      if not value_range[0] < value_range[1]:
        raise ValueError(f"metrics: value_range must be (lo, hi) with lo < hi; got {value_range}.")
    self.protocol = protocol
    self.gt_threshold = float(gt_threshold)
    self.value_range = value_range
    self.nbins = int(nbins)
    self._labels, self._scores = [], []
    self._neg, self._pos = _Column(np.float32), _Column(np.float32)
    self._pos_area = _Column(np.int32)
    self._n_regions = 0
    self._has_masks = None  # decided by the first add()

  def add(self, maps, masks, labels, scores) -> None:
    """maps, masks: (B, H, W) (maps may be None when masks is None); labels, scores: (B,)."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
      raise ValueError(f"metrics: labels {labels.shape} and scores {scores.shape} differ.")
    if np.isnan(scores).any():
      raise ValueError("metrics: image scores contain NaN.")
    has_masks = masks is not None
    if self._has_masks is None:
      self._has_masks = has_masks
    elif self._has_masks != has_masks:
      raise ValueError("metrics: give masks for every batch of a class or for none.")
    self._labels.append(labels.astype(bool))
    self._scores.append(scores)
    if not has_masks:
      return

    # float32, as the official evaluator holds the maps; "exact" is exact on these values.
    maps = _as_maps(maps, "anomaly_maps").astype(np.float32, copy=False)
    masks = _as_maps(masks, "masks")
    if maps.shape != masks.shape:
      raise ValueError(
          f"metrics: anomaly maps {maps.shape} and masks {masks.shape} differ; resize the "
          "maps to the mask size first (the official evaluation uses 256x256).")
    if maps.shape[0] != labels.shape[0]:
      raise ValueError(f"metrics: {maps.shape[0]} maps but {labels.shape[0]} labels.")
    if np.isnan(maps).any():
      raise ValueError("metrics: anomaly maps contain NaN.")
    gt = masks > self.gt_threshold
    has = gt.any(axis=(1, 2))
    # Normal images whole, the others' pixels split (the negatives' order is free).
    self._neg.append(maps[~has])
    if not has.any():
      return
    gt, maps = gt[has], maps[has]
    self._neg.append(maps[~gt])
    self._pos.append(maps[gt])
    # Region areas for AUPRO, labelled inside the box that holds every region of the batch:
    # the same regions, numbered in the same raster order, in fewer pixels.
    rows, cols = np.flatnonzero(gt.any(axis=(0, 2))), np.flatnonzero(gt.any(axis=(0, 1)))
    box = gt[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    regions, n = ndimage.label(box, structure=_CC_STRUCTURE)
    self._n_regions += int(n)
    labels_pos = regions[box]
    self._pos_area.append(np.bincount(labels_pos, minlength=n + 1)[labels_pos])

  def nbytes(self) -> int:
    """Host bytes held for the pixels (what bounds memory)."""
    return sum(c.size * c.dtype.itemsize for c in (self._neg, self._pos, self._pos_area))

  def result(self, reduce=None) -> Metrics:
    """The seven metrics; NaN (with a note in `.info`) where one is undefined.

    reduce: None when this accumulator saw the whole class. With several processes, each
      holding the accumulator of its own rows of the class (possibly none), a reducer
      whose `gather` spans them (see `SingleProcess`): every process calls result() for
      the same classes in the same order, and each gets the metrics of the union.
    """
    merge = _Merge(reduce or SingleProcess())
    flags = merge.concat(np.array([-1 if self._has_masks is None else self._has_masks],
                                  np.int8))  # -1: no rows here, the others decide
    if len(set(flags[flags >= 0].tolist())) > 1:
      raise ValueError("metrics: some processes gave masks for this class and some did not; "
                       "decide masks per class (Sample.has_mask), not per batch.")
    has_masks = bool(np.any(flags == 1))
    labels = merge.concat(np.concatenate(self._labels or [np.zeros(0, bool)]))
    scores = merge.concat(np.concatenate(self._scores or [np.zeros(0)]))
    # Scores, labels and curves ride along for the report page (histograms, ROC and PR).
    info = {"protocol": self.protocol, "gt_threshold": self.gt_threshold,
            "n_images": len(labels), "pixel_metrics": has_masks, "notes": [],
            "scores": scores, "labels": labels, "curves": {}}
    out = _image_metrics(labels, scores, self.protocol)
    if math.isnan(out["I-AUROC"]):
      info["notes"].append("image labels hold one class only: image metrics undefined")
    else:
      info["curves"]["image"] = C.curve_points(
          C.ranks(np.sort(scores[labels]), np.sort(scores[~labels])))
    pix = {k: math.nan for k in PIXEL_METRICS}
    if has_masks:
      pix = self._pixel_metrics(info, merge)
    else:
      info["notes"].append("no masks: pixel metrics skipped")
    out.update(pix)
    return Metrics({k: out[k] for k in METRIC_NAMES}, info)

  def _pixel_metrics(self, info: dict, merge: _Merge) -> dict:
    # Stored back: a second result() (or more add()s) stays cheap. The negatives stay in
    # any order ("exact" sorts them in place).
    neg = self._neg.gather()
    pos, area = self._pos.gather(), self._pos_area.gather()
    order = np.argsort(pos, kind="stable")
    pos, area = pos[order], area[order]
    del order
    self._pos.set(pos)
    self._pos_area.set(area)
    pos, area = merge.positives(pos, area)
    counts = merge.sum(np.array([self._n_regions, len(neg)], np.int64))
    n_regions, n_neg = int(counts[0]), int(counts[1])
    info.update(n_pixels=int(len(pos) + n_neg), n_anomalous_pixels=len(pos),
                n_regions=n_regions)
    nan = {k: math.nan for k in PIXEL_METRICS}
    if len(pos) == 0 or n_neg == 0:
      info["notes"].append("masks hold one class only: pixel metrics undefined")
      return nan

    if self.protocol == "exact":
      neg.sort()  # in place
      u, count, w = C.positive_levels(pos, 1.0 / area.astype(np.float64))
      r = C.ranks_from_counts(count, w, merge.sum(C.negatives_at(neg, u)), n_neg)
      info["curves"]["pixel"] = C.curve_points(r)
      return {"P-AUROC": C.exact_auroc(r), "P-AP": C.exact_ap(r), "P-F1max": C.exact_f1max(r),
              "AUPRO": C.exact_aupro(r, n_regions)}

    # Every score lies in [lo_all, hi_all] (the value buckets' span), adeval's [lo, hi] too
    # unless value_range is given; every process gathers the ends either way.
    ends = merge.concat(np.array([neg.min(), neg.max()]) if len(neg) else neg)
    lo_all, hi_all = min(pos[0], ends.min()), max(pos[-1], ends.max())
    out = {"P-F1max": _f1max_and_curve(info, merge, pos, neg, lo_all, hi_all, n_neg)}
    if self.value_range is not None:
      lo, hi = (np.float32(v) for v in self.value_range)
    else:
      lo, hi = lo_all, hi_all
    info["value_range"] = (float(lo), float(hi))
    if not lo < hi:  # adeval asserts min < max
      info["notes"].append("constant anomaly maps: binned P-AUROC/P-AP/AUPRO undefined")
      return {**nan, **out}
    # adeval stores 1/area in a float32 weight map.
    pos_w = (1.0 / area.astype(np.float64)).astype(np.float32).astype(np.float64)
    p_auroc, p_ap, aupro = C.official_pixel(
        C.official_hist(pos, lo, hi, self.nbins),
        C.official_hist(pos, lo, hi, self.nbins, cum_w=np.r_[0.0, np.cumsum(pos_w)]),
        merge.sum(C.official_hist_counts(neg, lo, hi, self.nbins)))
    if math.isnan(aupro):
      info["notes"].append("more than 30% of normal pixels at the map max: AUPRO undefined")
    return {**out, "P-AUROC": p_auroc, "P-AP": p_ap, "AUPRO": aupro}


def _f1max_and_curve(info: dict, merge: _Merge, pos: np.ndarray, neg: np.ndarray, lo, hi,
                     n_neg: int) -> float:
  """Official P-F1max (exact, = scikit-learn on all pixels) and info's pixel curves.

  pos: ascending scores of every process's positives; neg: this process's negatives, any
  order; [lo, hi]: every score. They need the negatives >= u only at the positive scores u
  that can hold the max and at the plotted ones (metric_curves): the value histogram's
  counts at u's buckets, summed over processes, pick them (the same on every process), and
  the local counts there are summed.
  """
  u, count, _ = C.positive_levels(pos)
  u, tp = u[::-1], np.cumsum(count[::-1])  # descending thresholds, as in Ranks
  hist = C.fine_hist(neg, lo, hi)
  b = C.fine_bins(u, lo, hi)
  fp_lo, fp_hi = merge.sum(C.fine_ge(hist, np.stack([b + 1, b])))  # bound negatives >= u
  keep = C.curve_keep(len(u))
  at = np.union1d(C.f1max_candidates(tp, fp_lo, fp_hi), keep)
  neg_ge = merge.sum(C.negatives_at_fine(neg, u[at], lo, hi, hist))[0]
  info["curves"]["pixel"] = C.curve_points_at(
      tp[keep], neg_ge[np.searchsorted(at, keep)], len(pos), n_neg)
  return C.f1max_at(tp[at], neg_ge, len(pos))


# ---------------------------------------------------------------------------------------
# Merging processes.
# ---------------------------------------------------------------------------------------


class SingleProcess:
  """The reducer of one process holding the whole class (`result()`'s default).

  A reducer for several processes has the same `gather(x)`: every process calls it with
  its own 1-D numpy array (any length, the same dtype everywhere), at the same point of the
  same sequence of calls, and gets every process's array back, in process order.
  """

  def gather(self, x: np.ndarray) -> list[np.ndarray]:
    return [x]


class _Merge:
  """`reduce.gather` as the concatenations and sums `result()` makes."""

  def __init__(self, reduce):
    self.reduce = reduce
    self.processes = 1  # known after the first gather, the same on every process

  def gather(self, x: np.ndarray) -> list[np.ndarray]:
    parts = self.reduce.gather(np.ascontiguousarray(x))
    self.processes = len(parts)
    return parts

  def concat(self, x: np.ndarray) -> np.ndarray:
    parts = self.gather(x)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def sum(self, x: np.ndarray) -> np.ndarray:
    """Elementwise sum over processes of `x` (the same shape on every process)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if self.processes == 1:
      return np.sum(self.gather(flat), axis=0).reshape(np.shape(x))
    out = np.empty_like(flat)
    chunk = max(1, SUM_BYTES // (self.processes * flat.itemsize))
    for i in range(0, len(flat), chunk):
      out[i:i + chunk] = np.sum(self.gather(flat[i:i + chunk]), axis=0)
    return out.reshape(np.shape(x))

  def positives(self, pos: np.ndarray, area: np.ndarray):
    """Every process's anomalous pixels (score, region area), sorted by score."""
    pos_parts = self.gather(pos)
    if len(pos_parts) == 1:
      return pos, area
    area_parts = self.gather(area)
    pos, area = np.concatenate(pos_parts), np.concatenate(area_parts)
    del pos_parts, area_parts
    order = np.argsort(pos, kind="stable")  # sorted runs, one per process: a merge
    return pos[order], area[order]


def compute_metrics(anomaly_maps, masks, labels, scores, protocol: str = "official",
                    gt_threshold: float = 0.5, *, value_range=None, batch_size: int = 256,
                    progress: bool = False) -> Metrics:
  """The seven metrics of one class from in-memory arrays.

  Args:
    anomaly_maps: (N, H, W) float pixel scores (None allowed when masks is None).
    masks: (N, H, W) GT masks, soft or binary, binarised `> gt_threshold`; None skips the
      pixel metrics (NaN, `info["pixel_metrics"] = False`).
    labels: (N,) image labels (1 = anomalous); scores: (N,) image scores.
    protocol: "official" (INP-Former's ader_evaluator) or "exact".
  Returns:
    Metrics: dict over METRIC_NAMES (+ `.info`).
  """
  acc = MetricAccumulator(protocol, gt_threshold, value_range)
  labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)
  steps = range(0, max(len(labels), 1), batch_size)
  if progress:
    steps = tqdm(steps, desc="metrics", unit="batch")
  for i in steps:
    sl = slice(i, i + batch_size)
    acc.add(None if masks is None else anomaly_maps[sl], None if masks is None else masks[sl],
            labels[sl], scores[sl])
  return acc.result()


def macro_average(per_class: Mapping[str, Mapping[str, float]]) -> Metrics:
  """Mean over classes of each metric, ignoring NaN; `info["skipped"]` names the classes
  left out of each metric's mean (e.g. classes without masks)."""
  names = [n for n in METRIC_NAMES if any(n in m for m in per_class.values())]
  values, skipped = {}, {}
  for name in names:
    vals = {c: float(m.get(name, math.nan)) for c, m in per_class.items()}
    good = [v for v in vals.values() if not math.isnan(v)]
    values[name] = float(np.mean(good)) if good else math.nan
    bad = sorted(c for c, v in vals.items() if math.isnan(v))
    if bad:
      skipped[name] = bad
  return Metrics(values, {"classes": list(per_class), "skipped": skipped})
