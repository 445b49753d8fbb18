"""The counts behind the metrics: negatives at the positive scores and the official histogram
equal brute-force counts and add over any split of the pixels (what merging processes relies
on); positive levels group ties; on unsorted negatives (value buckets, F1 candidates, bincount)
F1max, the plotted curves and the histogram equal the sorted computation bit for bit."""

from __future__ import annotations

import numpy as np

from inpformer_jax import metric_curves as C


def _pixels(rng, n=3000, levels=60):
  """Quantised scores (ties), with some exactly at lo and hi."""
  x = (np.round(rng.random(n) * levels) / levels).astype(np.float32)
  return x, np.float32(0.2), np.float32(0.8)


def _brute_hist(x, lo, hi, nbins):
  inside = x[(x >= lo) & (x <= hi)]
  b = np.minimum(((inside - lo) * np.float32(nbins) / (hi - lo)).astype(np.int64), nbins - 1)
  return np.r_[(x < lo).sum(), np.bincount(b, minlength=nbins), (x >= hi).sum()]


def test_negative_counts_match_brute_force_and_add_over_splits():
  rng = np.random.default_rng(0)
  neg, lo, hi = _pixels(rng)
  assert (neg == lo).any() and (neg == hi).any()
  u = np.unique(np.r_[neg[:40], np.float32(-1), np.float32(2)])  # ties with negatives too
  whole = C.negatives_at(np.sort(neg), u)
  brute = np.stack([(neg[None] >= u[:, None]).sum(1), (neg[None] == u[:, None]).sum(1)])
  np.testing.assert_array_equal(whole, brute)
  hist = C.official_hist(np.sort(neg), lo, hi, 50)
  np.testing.assert_array_equal(hist, _brute_hist(neg, lo, hi, 50))

  cut = np.sort(rng.choice(len(neg), 2, replace=False))
  parts = [np.sort(p) for p in np.split(rng.permutation(neg), cut)] + [neg[:0]]  # one empty
  np.testing.assert_array_equal(sum(C.negatives_at(p, u) for p in parts), whole)
  np.testing.assert_array_equal(sum(C.official_hist(p, lo, hi, 50) for p in parts), hist)


def test_positive_levels_group_ties_and_sum_weights():
  pos = np.array([0.1, 0.1, 0.3, 0.7, 0.7, 0.7], np.float32)
  w = np.array([0.5, 0.25, 1.0, 0.125, 0.125, 0.25])
  u, count, wsum = C.positive_levels(pos, w)
  np.testing.assert_array_equal(u, np.array([0.1, 0.3, 0.7], np.float32))
  np.testing.assert_array_equal(count, [2, 1, 3])
  np.testing.assert_array_equal(wsum, [0.75, 1.0, 0.5])
  u, count, wsum = C.positive_levels(pos[:0])
  assert len(u) == len(count) == len(wsum) == 0
  r = C.ranks(pos, np.sort(np.array([0.0, 0.3, 0.9], np.float32)))
  np.testing.assert_array_equal(r.neg_ge, [1, 2, 2])  # at 0.7, 0.3, 0.1 (descending)
  np.testing.assert_array_equal(r.neg_eq, [0, 1, 0])
  assert (r.n_pos, r.n_neg) == (6, 3)


# --- the official path on unsorted negatives == the sorted reference, bit for bit ---------


def _sorted_reference(pos, neg):
  """P-F1max and plotted curves the straightforward way: ALL the negatives sorted, counted
  at every positive score."""
  r = C.ranks(np.sort(pos), np.sort(neg))
  return C.exact_f1max(r), C.curve_points(r)


def _unsorted(pos, neg_parts):
  """The same from negatives split into parts (processes), none of them sorted, as
  metrics._f1max_and_curve does it; sums over the parts stand for merge.sum.
  -> (f1max, curves, number of F1 candidates)."""
  pos = np.sort(pos)
  lo = min([pos[0]] + [p.min() for p in neg_parts if len(p)])
  hi = max([pos[-1]] + [p.max() for p in neg_parts if len(p)])
  u, count, _ = C.positive_levels(pos)
  u, tp = u[::-1], np.cumsum(count[::-1])
  hists = [C.fine_hist(p, lo, hi) for p in neg_parts]
  b = C.fine_bins(u, lo, hi)
  fp_lo, fp_hi = sum(C.fine_ge(h, np.stack([b + 1, b])) for h in hists)
  cand = C.f1max_candidates(tp, fp_lo, fp_hi)
  keep = C.curve_keep(len(u))
  at = np.union1d(cand, keep)
  counts = sum(C.negatives_at_fine(p, u[at], lo, hi, h) for p, h in zip(neg_parts, hists))
  n_neg = sum(len(p) for p in neg_parts)
  curves = C.curve_points_at(tp[keep], counts[0][np.searchsorted(at, keep)], len(pos), n_neg)
  return C.f1max_at(tp[at], counts[0], len(pos)), curves, len(cand)


def _split(rng, x, k=3):
  cut = np.sort(rng.choice(len(x) + 1, k - 1))
  return np.split(x, cut)  # parts in any order, possibly empty


def _flat_f1(rng):
  """100 positives with no negative above them, then 200 more, each with 3 negatives just
  above it: fp = 3 (tp - 100), so F1 = 2 tp / (tp + fp + n_pos) = 2/4 at 201 thresholds
  (up to F1_EPS and rounding), packed a few float32 ulps apart: many u and negatives share
  a fine bucket, and more than CURVE_POINTS positive scores (the plotted ones are not all of
  them). A bulk of negatives far below."""
  ulp = np.spacing(np.float32(0.5))
  top = np.r_[0.9 + 0.1 * rng.random(99), 1.0].astype(np.float32)
  steps = np.float32(0.5) + ulp * (4 * np.arange(200, 0, -1)).astype(np.float32)
  neg = np.r_[steps + ulp, steps + 2 * ulp, steps + 3 * ulp, 0.4 * rng.random(20000), 0.0]
  return np.r_[top, steps].astype(np.float32), neg.astype(np.float32)


def _trap(rng):
  """The upper bound misleads: 1000 positives above every negative (F1 = 2/3 at the
  1000th, which `curve_keep` does not plot), then 1000 tied at 0.5 whose fine bucket holds
  4000 negatives just above them: by buckets F1 there may reach 1, in truth it is 1/2."""
  ulp = np.spacing(np.float32(0.5))
  pos = np.r_[rng.permutation(np.linspace(0.9, 1.0, 1000)), np.full(1000, 0.5)]
  pos = pos.astype(np.float32)
  above = np.float32(0.5) + ulp * np.tile(np.arange(1, 101), 40).astype(np.float32)
  neg = np.r_[above, 0.4 * rng.random(5000), 0.0].astype(np.float32)
  assert len(np.unique(pos)) == 1001 and 999 not in C.curve_keep(1001)
  return pos, neg


def _cases(rng):
  n = 30000
  x = rng.normal(0.2, 0.08, n).astype(np.float32)  # continuous, few ties
  y = rng.random(n) < 0.03 + 0.5 * (x > 0.35)
  yield "random", x[y], x[~y]
  q = (np.round(rng.random(n) * 12) / 12).astype(np.float32)  # 13 levels, 0 and 1 included
  y = rng.random(n) < 0.1 + 0.6 * q
  yield "ties", q[y], q[~y]
  q2 = (np.round(rng.normal(0.5, 0.2, n) * 300) / 300).astype(np.float32)
  y = rng.random(n) < q2.clip(0, 1) ** 4
  yield "ties_300", q2[y], q2[~y]
  yield "flat", *_flat_f1(rng)
  yield "trap", *_trap(rng)
  yield "one_negative", np.float32([0.3, 0.7]), np.float32([0.5])
  yield "constant", np.full(5, 0.25, np.float32), np.full(9, 0.25, np.float32)


def test_unsorted_f1max_and_curves_equal_the_sorted_reference_bit_for_bit():
  rng = np.random.default_rng(3)
  n_cand = {}
  for name, pos, neg in _cases(rng):
    want_f1, want_curves = _sorted_reference(pos, neg)
    for parts in ([rng.permutation(neg)], _split(rng, rng.permutation(neg)),
                  _split(rng, neg)):
      f1, curves, n_cand[name] = _unsorted(pos, parts)
      assert f1 == want_f1, (name, f1, want_f1)
      assert curves == want_curves, name
  assert n_cand["flat"] >= 90  # the bounds alone cannot tell these thresholds apart
  assert n_cand["trap"] >= 2  # the upper bound's argmax is not the maximiser


def test_negatives_at_fine_equals_sorted_counts_and_adds_over_splits():
  rng = np.random.default_rng(4)
  for name, pos, neg in _cases(rng):
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    u = np.unique(np.r_[rng.choice(pos, min(len(pos), 300)), neg[:50]])  # ties with neg
    want = C.negatives_at(np.sort(neg), u)
    got = C.negatives_at_fine(rng.permutation(neg), u, lo, hi, C.fine_hist(neg, lo, hi))
    np.testing.assert_array_equal(got, want, err_msg=name)
    parts = _split(rng, neg)
    got = sum(C.negatives_at_fine(p, u, lo, hi, C.fine_hist(p, lo, hi)) for p in parts)
    np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(sum(C.fine_hist(p, lo, hi) for p in parts),
                                  C.fine_hist(neg, lo, hi))


def test_official_hist_counts_equal_the_bisection_on_sorted_scores():
  rng = np.random.default_rng(5)
  for name, pos, neg in _cases(rng):
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    mid = np.sort(neg)[[len(neg) // 4, 3 * len(neg) // 4]]  # a value_range inside the data
    for a, b in ((lo, hi), (mid[0], mid[1]), (np.float32(-1), np.float32(2))):
      if not a < b:  # adeval asserts min < max: metrics never bins then
        continue
      for x in (neg, pos):
        want = C.official_hist(np.sort(x), a, b, 200)
        got = C.official_hist_counts(rng.permutation(x), a, b, 200)
        assert got.dtype == want.dtype and (got == want).all(), (name, a, b)
        parts = sum(C.official_hist_counts(p, a, b, 200) for p in _split(rng, x))
        assert (parts == want).all(), (name, a, b)
  # A pixel equal to hi: in the last bin AND in overflow.
  got = C.official_hist_counts(np.float32([0, 0.5, 1, 1]), np.float32(0), np.float32(1), 4)
  np.testing.assert_array_equal(got, [0, 1, 0, 1, 2, 2])


def test_fine_bins_are_monotone_and_degenerate_spans_fall_back_to_one_bucket():
  rng = np.random.default_rng(6)
  x = np.sort(np.r_[rng.normal(0, 3, 5000), -8, 8].astype(np.float32))
  b = C.fine_bins(x, x[0], x[-1])
  assert (np.diff(b) >= 0).all() and b[0] == 0 and b[-1] == C.FINE_NBINS - 1
  big = np.float32([-3e38, 0, 3e38])  # hi - lo overflows float32
  assert (C.fine_bins(big, big[0], big[-1]) == 0).all()
  assert (C.fine_bins(np.float32([2, 2]), 2, 2) == 0).all()
  u = np.float32([-3e38, 1, 3e38])
  np.testing.assert_array_equal(C.negatives_at_fine(big, u, big[0], big[-1],
                                                    C.fine_hist(big, big[0], big[-1])),
                                C.negatives_at(big, u))
