"""The curves behind `metrics`: an exact core of counts at the positive scores, and adeval's
200-bin histograms read off sorted arrays.

Exact core. For the distinct scores u of the positive (anomalous) pixels it counts the
positives and negatives at or above u; AUROC, AP, F1max and the PRO curve only change at
those scores, so they follow exactly from these counts. The negatives enter only through
`negatives_at` (counts at u) and `official_hist` (counts per bin), both sums over any split of
the negatives: that is what lets `metrics` merge hosts without moving them.

Official histogram. The float32 bin rule is monotone in x, so each bin's pixels form a
contiguous run of the sorted scores, found by bisection.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

OFFICIAL_NBINS = 200  # ader_evaluator: EvalAccumulatorCuda(..., nstrips=200)
AUPRO_FPR_LIMIT = 0.3
F1_EPS = 1e-7  # utils.f1_score_max: 2PR / (P + R + 1e-7)
CURVE_POINTS = 200  # vertices of a plotted ROC / PR curve (reports)


# ---------------------------------------------------------------------------------------
# Exact core: counts at the distinct positive scores.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ranks:
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


def positive_levels(pos_sorted: np.ndarray, pos_w_sorted=None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ascending scores (weights aligned) -> (distinct u ascending, count, summed weight)."""
  n = len(pos_sorted)
  starts = np.flatnonzero(np.r_[n > 0, pos_sorted[1:] != pos_sorted[:-1]])
  count = np.diff(np.r_[starts, n])
  if pos_w_sorted is None:
    w = count.astype(np.float64)
  else:
    w = np.add.reduceat(pos_w_sorted.astype(np.float64), starts) if n else np.zeros(0)
  return pos_sorted[starts], count, w


def negatives_at(neg_sorted: np.ndarray, u: np.ndarray) -> np.ndarray:
  """(2, U) int64: negatives >= u and == u, for ascending `neg_sorted`."""
  lo = np.searchsorted(neg_sorted, u, side="left")
  hi = np.searchsorted(neg_sorted, u, side="right")
  return np.stack([len(neg_sorted) - lo, hi - lo]).astype(np.int64)


def ranks_from_counts(count, w, neg_counts, n_neg: int) -> Ranks:
  """`positive_levels`' count / w and `negatives_at`'s counts (ascending u) -> Ranks."""
  rev = slice(None, None, -1)  # descending thresholds from here on
  return Ranks(count[rev], w[rev], neg_counts[0][rev], neg_counts[1][rev],
               int(np.sum(count)), int(n_neg))


def ranks(pos_sorted: np.ndarray, neg_sorted: np.ndarray, pos_w_sorted=None) -> Ranks:
  """Both score arrays sorted ascending; weights aligned with `pos_sorted`."""
  u, count, w = positive_levels(pos_sorted, pos_w_sorted)
  return ranks_from_counts(count, w, negatives_at(neg_sorted, u), len(neg_sorted))


def exact_auroc(r: Ranks) -> float:
  # Mann-Whitney U with ties counted 1/2 == the area under sklearn's ROC (trapezoids
  # through all distinct thresholds). Integer sums (2x to keep the 1/2 integral).
  n_lt = r.n_neg - r.neg_ge
  twice_u = int(np.sum(r.pos * (2 * n_lt + r.neg_eq)))
  return twice_u / (2.0 * r.n_pos * r.n_neg)


def _pr_at_positive_thresholds(r: Ranks) -> tuple[np.ndarray, np.ndarray]:
  tp = np.cumsum(r.pos)
  precision = tp / (tp + r.neg_ge)  # tp + fp >= 1 at every positive score
  recall = tp / tp[-1]
  return precision, recall


def exact_ap(r: Ranks) -> float:
  # sklearn's step AP: sum_k (R_k - R_{k-1}) P_k; only thresholds where recall moves count.
  precision, recall = _pr_at_positive_thresholds(r)
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def exact_f1max(r: Ranks) -> float:
  # Official f1_score_max. At a threshold holding negatives only, recall equals that of the
  # next higher positive score and precision is lower, so the max lies at a positive score.
  precision, recall = _pr_at_positive_thresholds(r)
  return float(np.max(2 * precision * recall / (precision + recall + F1_EPS)))


def curve_points(r: Ranks, max_points: int = CURVE_POINTS) -> dict:
  """The ROC and PR curves for plotting: their vertices at the positive scores (exact),
  thinned to at most `max_points` evenly spaced in rank, the ROC framed by (0, 0) and (1, 1).
  -> {"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"}} of float lists."""
  precision, recall = _pr_at_positive_thresholds(r)
  keep = np.unique(np.linspace(0, len(recall) - 1, min(max_points, len(recall))).round()
                   ).astype(np.int64)
  fpr = r.neg_ge[keep] / max(r.n_neg, 1)
  return {"roc": {"fpr": [0.0, *fpr.tolist(), 1.0], "tpr": [0.0, *recall[keep].tolist(), 1.0]},
          "pr": {"recall": recall[keep].tolist(), "precision": precision[keep].tolist()}}


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
  """Trapezoid area under the polyline (x non-decreasing) from x[0] to `limit`."""
  i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit < x[i:]
  area = float(np.trapezoid(y[:i], x[:i]))
  if i < len(x) and x[i - 1] < limit:
    t = (limit - x[i - 1]) / (x[i] - x[i - 1])
    y_lim = y[i - 1] + t * (y[i] - y[i - 1])
    area += (limit - x[i - 1]) * (y[i - 1] + y_lim) / 2.0
  return area


def exact_aupro(r: Ranks, n_regions: int, limit: float = AUPRO_FPR_LIMIT) -> float:
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


def official_hist(s: np.ndarray, lo, hi, nbins: int, cum_w=None) -> np.ndarray:
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


def official_pixel(pos_stat, wpos_stat, neg_stat) -> tuple[float, float, float]:
  """P-AUROC, P-AP, AUPRO of adeval.EvalAccumulatorCuda from its three `official_hist` stats
  (positives, positives weighted by 1 / region area, negatives)."""
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
