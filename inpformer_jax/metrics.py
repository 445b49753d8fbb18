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

Both protocols share one exact core. For the distinct scores u of the positive (anomalous)
pixels it counts the positives and negatives at or above u; AUROC, AP, F1max and the PRO
curve only change at those scores, so they follow exactly from these counts. The official
histogram is read off the same sorted arrays: the float32 bin rule is monotone in x, so each
bin's pixels form a contiguous run found by bisection.

Memory, and the min/max problem. adeval needs the class's global map min/max before the
first pixel is binned, and the official P-F1max is exact on all pixels; neither allows a
fixed-size summary of a class seen once. `MetricAccumulator` therefore keeps the pixel
scores of the class being evaluated as compact arrays -- float32 per normal pixel (4 B),
float32 score + int32 region area per anomalous pixel (8 B) -- and bins them in `result()`,
when min/max are known: ONE pass over the maps, host memory bounded by the class, not the
test set (measured peak ~80 MB + 4.3 B/pixel: 350 MB for 1,000 maps of 256x256, where
scikit-learn peaks at 3.4 GB; benchmarks/metrics_bench.py). `result()` adds one 64 MiB block
and an argsort of the anomalous pixels. With masks=None nothing per pixel is kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from tqdm import tqdm

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
IMAGE_METRICS = METRIC_NAMES[:3]
PIXEL_METRICS = METRIC_NAMES[3:]
PROTOCOLS = ("official", "exact")

OFFICIAL_NBINS = 200  # ader_evaluator: EvalAccumulatorCuda(..., nstrips=200)
AUPRO_FPR_LIMIT = 0.3
F1_EPS = 1e-7  # utils.f1_score_max: 2PR / (P + R + 1e-7)

# 8-connectivity inside each image, none across the batch axis (cv2 connectivity=8).
_CC_STRUCTURE = np.zeros((3, 3, 3), bool)
_CC_STRUCTURE[1] = True


class Metrics(dict):
  """Metric name -> float (the keys of METRIC_NAMES); `info` holds flags and notes."""

  def __init__(self, values: Mapping[str, float], info: dict | None = None):
    super().__init__(values)
    self.info = dict(info or {})


# ---------------------------------------------------------------------------------------
# Exact core: counts at the distinct positive scores.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ranks:
  """Counts at the distinct scores u_1 > u_2 > ... > u_U of the positives.

  pos: (U,) int64 positives equal to u; pos_w: (U,) float64 their summed weights;
  neg_ge / neg_eq: (U,) int64 negatives >= u / == u.
  """

  pos: np.ndarray
  pos_w: np.ndarray
  neg_ge: np.ndarray
  neg_eq: np.ndarray
  n_pos: int
  n_neg: int


def _ranks(pos_sorted: np.ndarray, neg_sorted: np.ndarray, pos_w_sorted=None) -> _Ranks:
  """Both score arrays sorted ascending; weights aligned with `pos_sorted`."""
  n = len(pos_sorted)
  starts = np.flatnonzero(np.r_[True, pos_sorted[1:] != pos_sorted[:-1]])
  u = pos_sorted[starts]  # ascending distinct positive scores
  count = np.diff(np.r_[starts, n])
  if pos_w_sorted is None:
    w = count.astype(np.float64)
  else:
    w = np.add.reduceat(pos_w_sorted.astype(np.float64), starts) if n else np.zeros(0)
  lo = np.searchsorted(neg_sorted, u, side="left")
  hi = np.searchsorted(neg_sorted, u, side="right")
  n_neg = len(neg_sorted)
  rev = slice(None, None, -1)  # descending thresholds from here on
  return _Ranks(count[rev], w[rev], (n_neg - lo)[rev], (hi - lo)[rev], n, n_neg)


def _exact_auroc(r: _Ranks) -> float:
  # Mann-Whitney U with ties counted 1/2 == the area under sklearn's ROC (trapezoids
  # through all distinct thresholds). Integer sums (2x to keep the 1/2 integral).
  n_lt = r.n_neg - r.neg_ge
  twice_u = int(np.sum(r.pos * (2 * n_lt + r.neg_eq)))
  return twice_u / (2.0 * r.n_pos * r.n_neg)


def _pr_at_positive_thresholds(r: _Ranks) -> tuple[np.ndarray, np.ndarray]:
  tp = np.cumsum(r.pos)
  precision = tp / (tp + r.neg_ge)  # tp + fp >= 1 at every positive score
  recall = tp / tp[-1]
  return precision, recall


def _exact_ap(r: _Ranks) -> float:
  # sklearn's step AP: sum_k (R_k - R_{k-1}) P_k; only thresholds where recall moves count.
  precision, recall = _pr_at_positive_thresholds(r)
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _exact_f1max(r: _Ranks) -> float:
  # Official f1_score_max. At a threshold holding negatives only, recall equals that of the
  # next higher positive score and precision is lower, so the max lies at a positive score.
  precision, recall = _pr_at_positive_thresholds(r)
  return float(np.max(2 * precision * recall / (precision + recall + F1_EPS)))


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
  """Trapezoid area under the polyline (x non-decreasing) from x[0] to `limit`."""
  i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit < x[i:]
  area = float(np.trapezoid(y[:i], x[:i]))
  if i < len(x) and x[i - 1] < limit:
    t = (limit - x[i - 1]) / (x[i] - x[i - 1])
    y_lim = y[i - 1] + t * (y[i] - y[i - 1])
    area += (limit - x[i - 1]) * (y[i - 1] + y_lim) / 2.0
  return area


def _exact_aupro(r: _Ranks, n_regions: int, limit: float = AUPRO_FPR_LIMIT) -> float:
  # Vertices of the PRO curve: just above and at each positive score (negatives-only
  # thresholds in between are horizontal runs), framed by (0, 0) and (1, PRO_min).
  w_ge = np.cumsum(r.pos_w) / n_regions
  w_gt = np.r_[0.0, w_ge[:-1]]
  fpr_ge = r.neg_ge / r.n_neg
  fpr_gt = (r.neg_ge - r.neg_eq) / r.n_neg
  x = np.r_[0.0, np.stack([fpr_gt, fpr_ge], 1).ravel(), 1.0]
  y = np.r_[0.0, np.stack([w_gt, w_ge], 1).ravel(), w_ge[-1]]
  return float(_area_to_limit(x, y, limit) / limit)


# ---------------------------------------------------------------------------------------
# Official: adeval's histogram accumulator, read off the sorted arrays.
# ---------------------------------------------------------------------------------------


def _official_bin(x: np.ndarray, lo: np.float32, hi: np.float32, nbins: int) -> np.ndarray:
  # torch.histc (CPU and CUDA): (x - min) * nbins / (max - min) in float32, truncated;
  # x == max goes to the last bin.
  b = ((x - lo) * np.float32(nbins) / (hi - lo)).astype(np.int64)
  return np.minimum(b, nbins - 1)


def _official_hist(s: np.ndarray, lo, hi, nbins: int, cum_w=None) -> np.ndarray:
  """adeval's (nbins + 2,) float64 stat of ascending `s`: [< lo, histc bins, >= hi].

  With `cum_w` (len(s) + 1 cumulative weights) the stat is weighted.
  """
  n = len(s)
  a = int(np.searchsorted(s, lo, side="left"))  # first >= lo
  b = int(np.searchsorted(s, hi, side="right"))  # first > hi
  c = int(np.searchsorted(s, hi, side="left"))  # first >= hi
  # Run boundaries inside s[a:b]: first index whose bin is >= k, k = 1..nbins-1, by a
  # vectorised bisection (the float32 bin rule is monotone in x).
  target = np.arange(1, nbins)
  left = np.full(nbins - 1, a, np.int64)
  right = np.full(nbins - 1, b, np.int64)
  while np.any(left < right):
    active = left < right
    mid = (left + right) // 2
    ok = _official_bin(s[np.minimum(mid, n - 1)], lo, hi, nbins) >= target
    right = np.where(active & ok, mid, right)
    left = np.where(active & ~ok, mid + 1, left)
  idx = np.r_[a, left, b]  # histc bins: [lo, hi]; underflow [0, a); overflow [c, n)
  if cum_w is None:
    return np.r_[a, np.diff(idx), n - c].astype(np.float64)
  return np.r_[cum_w[a] - cum_w[0], np.diff(cum_w[idx]), cum_w[n] - cum_w[c]]


def _official_curve(pos_stat: np.ndarray, neg_stat: np.ndarray):
  """adeval _AccumulateStatCurve._summary: tp/fp/tn/fn at the nbins + 1 cut points."""
  fn = np.cumsum(pos_stat)
  tn = np.cumsum(neg_stat)
  p, n = fn[-1], tn[-1]
  fn, tn = fn[:-1], tn[:-1]
  return p - fn, n - tn, tn, fn  # tp, fp, tn, fn


def _trapezoid_intep(interp: float, area: float, y1: float, y2: float) -> float:
  # adeval's partial trapezoid: rectangle share * t + triangle share * t^2.
  denom = y1 + 0.5 * (y2 - y1)
  rect_ratio = y1 / denom if denom != 0 else 0.0  # denom == 0 -> area == 0 (adeval: NaN)
  return area * rect_ratio * interp + area * (1 - rect_ratio) * interp * interp


def _official_pixel(pos, pos_w, neg, lo, hi, nbins) -> tuple[float, float, float]:
  """P-AUROC, P-AP, AUPRO of adeval.EvalAccumulatorCuda(..., nstrips=nbins)."""
  pos_stat = _official_hist(pos, lo, hi, nbins)
  neg_stat = _official_hist(neg, lo, hi, nbins)
  wpos_stat = _official_hist(pos, lo, hi, nbins, cum_w=np.r_[0.0, np.cumsum(pos_w)])

  with np.errstate(invalid="ignore", divide="ignore"):
    tp, fp, tn, fn = _official_curve(pos_stat, neg_stat)
    tpr = tp / (tp + fn)
    fpr = fp / (fp + tn)
    precision = tp / (tp + fp)
    precision[~(tp + fp > 0)] = 1.0  # no predicted positive -> no false positive
    auroc = float(np.trapezoid(tpr[::-1], fpr[::-1]))
    ap = float(np.trapezoid(precision[::-1], tpr[::-1]))

    wtp, wfp, wtn, wfn = _official_curve(wpos_stat, neg_stat)  # negatives weigh 1
    pro = wtp / (wtp + wfn)
    wfpr = wfp / (wfp + wtn)
  mask = wfpr <= AUPRO_FPR_LIMIT
  if not mask.any():  # > 30% of normal pixels sit at the max; adeval raises IndexError
    return auroc, ap, math.nan
  lo_pro, lo_fpr = pro[mask][::-1], wfpr[mask][::-1]
  hi_pro, hi_fpr = pro[~mask][::-1], wfpr[~mask][::-1]
  lo_area = float(np.trapezoid(lo_pro, lo_fpr))
  hi_area = float(np.trapezoid(hi_pro, hi_fpr))
  total = float(np.trapezoid(pro[::-1], wfpr[::-1]))
  t = (AUPRO_FPR_LIMIT - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1])
  part = _trapezoid_intep(t, total - (lo_area + hi_area), lo_pro[-1], hi_pro[0])
  return auroc, ap, (lo_area + part) / AUPRO_FPR_LIMIT


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
  r = _ranks(np.sort(scores[labels]), np.sort(scores[~labels]))
  return {"I-AUROC": _exact_auroc(r), "I-AP": _exact_ap(r), "I-F1max": _exact_f1max(r)}


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
    self._neg.append(maps[~gt])
    self._pos.append(maps[gt])
    # Region areas for AUPRO; only images holding a region are labelled (speed).
    has = gt.any(axis=(1, 2))
    regions, n = ndimage.label(gt[has], structure=_CC_STRUCTURE)
    self._n_regions += int(n)
    labels_pos = regions[gt[has]]
    self._pos_area.append(np.bincount(labels_pos, minlength=n + 1)[labels_pos])

  def nbytes(self) -> int:
    """Host bytes held for the pixels (what bounds memory)."""
    return sum(c.size * c.dtype.itemsize for c in (self._neg, self._pos, self._pos_area))

  def result(self) -> Metrics:
    """The seven metrics; NaN (with a note in `.info`) where one is undefined."""
    labels = np.concatenate(self._labels or [np.zeros(0, bool)])
    scores = np.concatenate(self._scores or [np.zeros(0)])
    info = {"protocol": self.protocol, "gt_threshold": self.gt_threshold,
            "n_images": int(len(labels)), "pixel_metrics": bool(self._has_masks),
            "notes": []}
    out = _image_metrics(labels, scores, self.protocol)
    if math.isnan(out["I-AUROC"]):
      info["notes"].append("image labels hold one class only: image metrics undefined")
    pix = {k: math.nan for k in PIXEL_METRICS}
    if self._has_masks:
      pix = self._pixel_metrics(info)
    else:
      info["notes"].append("no masks: pixel metrics skipped")
    out.update(pix)
    return Metrics({k: out[k] for k in METRIC_NAMES}, info)

  def _pixel_metrics(self, info: dict) -> dict:
    # The sorted arrays are stored back: a second result() (or more add()s) stays cheap.
    neg = self._neg.gather()
    neg.sort()  # in place
    pos, area = self._pos.gather(), self._pos_area.gather()
    order = np.argsort(pos, kind="stable")
    pos, area = pos[order], area[order]
    del order
    self._pos.set(pos)
    self._pos_area.set(area)
    info.update(n_pixels=int(len(pos) + len(neg)), n_anomalous_pixels=int(len(pos)),
                n_regions=self._n_regions)
    nan = {k: math.nan for k in PIXEL_METRICS}
    if len(pos) == 0 or len(neg) == 0:
      info["notes"].append("masks hold one class only: pixel metrics undefined")
      return nan

    if self.protocol == "exact":
      r = _ranks(pos, neg, 1.0 / area.astype(np.float64))
      return {"P-AUROC": _exact_auroc(r), "P-AP": _exact_ap(r), "P-F1max": _exact_f1max(r),
              "AUPRO": _exact_aupro(r, self._n_regions)}

    out = {"P-F1max": _exact_f1max(_ranks(pos, neg))}
    if self.value_range is not None:
      lo, hi = (np.float32(v) for v in self.value_range)
    else:
      lo, hi = min(pos[0], neg[0]), max(pos[-1], neg[-1])
    info["value_range"] = (float(lo), float(hi))
    if not lo < hi:  # adeval asserts min < max
      info["notes"].append("constant anomaly maps: binned P-AUROC/P-AP/AUPRO undefined")
      return {**nan, **out}
    # adeval stores 1/area in a float32 weight map.
    pos_w = (1.0 / area.astype(np.float64)).astype(np.float32).astype(np.float64)
    p_auroc, p_ap, aupro = _official_pixel(pos, pos_w, neg, lo, hi, self.nbins)
    if math.isnan(aupro):
      info["notes"].append("more than 30% of normal pixels at the map max: AUPRO undefined")
    return {**out, "P-AUROC": p_auroc, "P-AP": p_ap, "AUPRO": aupro}


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
