"""The curves behind `metrics`: an exact core of counts at the positive scores, and adeval's
200-bin histograms.

Exact core. For the distinct scores u of the positive (anomalous) pixels it counts the
positives and negatives at or above u; AUROC, AP, F1max and the PRO curve only change at
those scores, so they follow exactly from these counts. The negatives enter only through
counts -- at u (`negatives_at`, on sorted negatives; `negatives_at_fine`, on unsorted ones),
per value bucket (`fine_hist`) and per official bin (`official_hist`, `official_hist_counts`)
-- all sums over any split of the negatives: that is what lets `metrics` merge hosts without
moving them.

F1max and the plotted curves without sorting the negatives. They need the negatives >= u
only at the u that may hold the maximum and at the <= CURVE_POINTS plotted ones. A histogram
of the negatives over FINE_NBINS value buckets puts the count at each u between two bucket
sums; F1 falls as that count grows, so it bounds F1 at every u, and only the u whose upper
bound reaches the best lower bound can hold the max (`f1max_candidates`); processes sum only
the bucket counts at u (`fine_ge`). The negatives in the chosen u's buckets are sorted and
counted exactly, the others by bucket (`negatives_at_fine`).

Official histogram. torch.histc's float32 bin rule applied to every pixel, counted by
`official_hist_counts` (a bincount, any order). The rule is monotone in x, so on sorted
scores each bin's pixels form a contiguous run, found by bisection (`official_hist`, which
also sums weights: the positives' AUPRO stat).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

OFFICIAL_NBINS = 200  # ader_evaluator: EvalAccumulatorCuda(..., nstrips=200)
AUPRO_FPR_LIMIT = 0.3
F1_EPS = 1e-7  # utils.f1_score_max: 2PR / (P + R + 1e-7)
CURVE_POINTS = 200  # vertices of a plotted ROC / PR curve (reports)
FINE_NBINS = 65536  # value buckets bounding the negatives >= u (`fine_hist`)
# F1 bounds are computed in float64 like F1 itself, each a few roundings off the exact
# value; candidates within this relative margin of the best lower bound are kept.
F1_SLACK = 1e-12
_CHUNK = 1 << 18  # pixels per step of the counting loops: small temporaries, reused


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


def fine_bins(x: np.ndarray, lo, hi) -> np.ndarray:
  """(n,) int64 value bucket of float32 scores `x`, all in [lo, hi]: torch.histc's rule
  (`_official_bin`) with FINE_NBINS bins.

  Each float32 op of the rule (- lo, * nbins, / (hi - lo) > 0), the truncation and the min
  is monotone non-decreasing, so x < y => b(x) <= b(y); hence b(x) > b(u) => x > u and
  b(x) < b(u) => x < u: a bucket other than u's says on which side of u x lies. A span that
  is empty, or so wide that (x - lo) * FINE_NBINS could overflow to inf (which would break
  the order), puts everything in bucket 0: still correct, only slower (`negatives_at_fine`
  then sorts every negative).
  """
  lo, hi = np.float32(lo), np.float32(hi)
  with np.errstate(over="ignore", invalid="ignore"):
    span = hi - lo
    usable = bool(span > 0) and bool(np.isfinite(span * np.float32(FINE_NBINS)))
  if not usable:  # otherwise x - lo <= span, so (x - lo) * FINE_NBINS stays finite
    return np.zeros(len(x), np.int64)
  return _official_bin(x, lo, hi, FINE_NBINS)


def fine_hist(neg: np.ndarray, lo, hi) -> np.ndarray:
  """(FINE_NBINS,) int64 count of the (unsorted) negatives per `fine_bins` bucket; `lo` /
  `hi` span every score, positives and all processes' negatives."""
  out = np.zeros(FINE_NBINS, np.int64)
  for i in range(0, len(neg), _CHUNK):
    out += np.bincount(fine_bins(neg[i:i + _CHUNK], lo, hi), minlength=FINE_NBINS)
  return out


def fine_ge(hist: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Negatives in buckets >= b, b in [0, FINE_NBINS] (FINE_NBINS: none), shaped like b.

  hist: (FINE_NBINS,) `fine_hist`. Linear in `hist`, so a sum over any split of the
  negatives: processes sum these few counts rather than the whole histogram.
  """
  return np.r_[np.cumsum(hist[::-1])[::-1], 0][b]


def f1max_candidates(tp: np.ndarray, fp_lo: np.ndarray, fp_hi: np.ndarray) -> np.ndarray:
  """Ascending indices of the descending positive scores u whose F1 may be the max.

  tp: (U,) int64 positives >= u (tp[-1]: all of them); fp_lo, fp_hi: (U,) int64 bounds of
  the negatives >= u. With b = `fine_bins(u)`, `fine_ge` of ALL the negatives gives them:
  the negatives in buckets above b are all > u, some of b's own are, so the count lies in
  [fine_ge(b + 1), fine_ge(b)].

  F1 (`_f1`) is non-increasing in that count at fixed tp, so the bounds give an upper and a
  lower bound of F1 at u, and the maximiser's upper bound reaches every lower bound. float64
  rounding can break that order by a few ulps only, hence F1_SLACK.
  """
  n_pos = int(tp[-1])
  upper = _f1(*_precision_recall(tp, fp_lo, n_pos))
  lower = _f1(*_precision_recall(tp, fp_hi, n_pos))
  best = lower.max()
  return np.flatnonzero(upper >= best - F1_SLACK * best)


def negatives_at_fine(neg: np.ndarray, u: np.ndarray, lo, hi, hist: np.ndarray
                      ) -> np.ndarray:
  """`negatives_at` for unsorted negatives: (2, K) int64 negatives >= u and == u.

  neg: (n,) float32 this process's negatives, any order; u: (K,) float32 scores; lo, hi:
  the `fine_bins` span (every score); hist: (FINE_NBINS,) `fine_hist` of `neg` (this
  process's, not the sum). Only the negatives whose bucket holds some u are sorted: the
  others are above u exactly when their bucket is (`fine_bins`), so bucket counts decide
  them, and every negative equal to u shares u's bucket. Cost: one pass over `neg` (the
  caller's `fine_hist` is the other) and a sort of the few in u's buckets, against a sort of
  all.
  """
  u_bins = fine_bins(u, lo, hi)
  held = np.zeros(FINE_NBINS, bool)
  held[u_bins] = True
  sub = np.concatenate([neg[:0]] + [
      c[held[fine_bins(c, lo, hi)]] for c in
      (neg[i:i + _CHUNK] for i in range(0, len(neg), _CHUNK))])
  sub.sort()
  # Negatives outside the held buckets, in buckets above u's.
  ge_out = fine_ge(np.where(held, 0, hist), u_bins + 1)
  first = np.searchsorted(sub, u, side="left")
  last = np.searchsorted(sub, u, side="right")
  return np.stack([ge_out + len(sub) - first, last - first]).astype(np.int64)


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


def _precision_recall(tp: np.ndarray, neg_ge: np.ndarray, n_pos: int):
  # tp + fp >= 1 at every positive score. Elementwise: any subset of thresholds gives the
  # same bits as the full arrays.
  return tp / (tp + neg_ge), tp / n_pos


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
  return 2 * precision * recall / (precision + recall + F1_EPS)


def _pr_at_positive_thresholds(r: Ranks) -> tuple[np.ndarray, np.ndarray]:
  return _precision_recall(np.cumsum(r.pos), r.neg_ge, r.n_pos)


def exact_ap(r: Ranks) -> float:
  # sklearn's step AP: sum_k (R_k - R_{k-1}) P_k; only thresholds where recall moves count.
  precision, recall = _pr_at_positive_thresholds(r)
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1max_at(tp: np.ndarray, neg_ge: np.ndarray, n_pos: int) -> float:
  """Max F1 over some positive scores u (any subset holding the maximiser: the same value,
  bit for bit, as over all of them).

  tp, neg_ge: (K,) int64 positives / negatives >= u; n_pos: all positives.
  """
  return float(np.max(_f1(*_precision_recall(tp, neg_ge, n_pos))))


def exact_f1max(r: Ranks) -> float:
  # Official f1_score_max. At a threshold holding negatives only, recall equals that of the
  # next higher positive score and precision is lower, so the max lies at a positive score.
  return f1max_at(np.cumsum(r.pos), r.neg_ge, r.n_pos)


def curve_keep(n: int, max_points: int = CURVE_POINTS) -> np.ndarray:
  """(<= max_points,) int64 ascending indices, evenly spaced in rank, of the n descending
  positive scores that `curve_points` plots."""
  return np.unique(np.linspace(0, n - 1, min(max_points, n)).round()).astype(np.int64)


def curve_points_at(tp: np.ndarray, neg_ge: np.ndarray, n_pos: int, n_neg: int) -> dict:
  """`curve_points` from the counts at its `curve_keep` thresholds only.

  tp, neg_ge: (K,) int64 positives / negatives >= u at those thresholds; n_pos / n_neg: all
  positives / negatives.
  """
  precision, recall = _precision_recall(tp, neg_ge, n_pos)
  fpr = neg_ge / max(n_neg, 1)
  return {"roc": {"fpr": [0.0, *fpr.tolist(), 1.0], "tpr": [0.0, *recall.tolist(), 1.0]},
          "pr": {"recall": recall.tolist(), "precision": precision.tolist()}}


def curve_points(r: Ranks, max_points: int = CURVE_POINTS) -> dict:
  """The ROC and PR curves for plotting: their vertices at the positive scores (exact),
  thinned to at most `max_points` evenly spaced in rank, the ROC framed by (0, 0) and (1, 1).
  -> {"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"}} of float lists."""
  keep = curve_keep(len(r.pos), max_points)
  return curve_points_at(np.cumsum(r.pos)[keep], r.neg_ge[keep], r.n_pos, r.n_neg)


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
# Official: adeval's histogram accumulator, counted per bin.
# ---------------------------------------------------------------------------------------


def _official_bin(x: np.ndarray, lo: np.float32, hi: np.float32, nbins: int) -> np.ndarray:
  # torch.histc (CPU and CUDA): (x - min) * nbins / (max - min) in float32, truncated;
  # x == max goes to the last bin. The same ops in place: two temporaries, not five (fresh
  # pages for each cost more than the arithmetic, on the 1 MiB chunks of the counting loops).
  t = np.asarray(x - lo)
  t *= np.float32(nbins)
  t /= hi - lo
  b = t.astype(np.int64)
  return np.minimum(b, nbins - 1, out=b)


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


def official_hist_counts(x: np.ndarray, lo, hi, nbins: int) -> np.ndarray:
  """`official_hist` (unweighted) of float32 scores `x` in any order: (nbins + 2,) float64
  [< lo, histc bins of lo <= x <= hi, >= hi] (a pixel equal to hi in the last bin AND in
  overflow), by a bincount of the bin rule -- the same integer counts, without the sort."""
  lo, hi = np.float32(lo), np.float32(hi)
  out = np.zeros(nbins + 2, np.int64)
  for i in range(0, len(x), _CHUNK):
    c = x[i:i + _CHUNK]
    n_under, n_above = np.count_nonzero(c < lo), np.count_nonzero(c > hi)
    out[0] += n_under
    out[-1] += n_above + np.count_nonzero(c == hi)
    if n_under or n_above:  # only with a given value_range: [lo, hi] is the data's otherwise
      c = c[(c >= lo) & (c <= hi)]
    out[1:-1] += np.bincount(_official_bin(c, lo, hi, nbins), minlength=nbins)
  return out.astype(np.float64)


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
