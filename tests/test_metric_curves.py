"""The counts behind the metrics: negatives at the positive scores and the official histogram
equal brute-force counts and add over any split of the pixels (what merging processes relies
on); positive levels group ties."""

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
