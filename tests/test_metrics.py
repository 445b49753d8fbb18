"""The seven metrics: official oracle, exact vs scikit-learn (with ties), exact AUPRO vs a
brute-force PRO curve, the official histogram vs a per-pixel transcription of adeval, the
official protocol (which never sorts the normal pixels) == a sorted reference bit for bit,
streaming == in-memory, a class split over processes == one process, GT binarisation, and
edge cases."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from inpformer_jax import metric_curves as C
from inpformer_jax import metrics as M


def _f1max_sklearn(y, s):  # INP-Former utils.f1_score_max
  p, r, _ = precision_recall_curve(y, s)
  return (2 * p * r / (p + r + 1e-7))[:-1].max()


def _blobs(rng, n, size, levels=None, p_anom=0.5):
  """Maps with elliptical anomalies (plus stray one-pixel regions) and noise; `levels`
  quantises the maps so that scores tie within and across positives/negatives."""
  yy, xx = np.mgrid[:size, :size]
  maps = rng.normal(0.2, 0.08, (n, size, size)).astype(np.float32)
  masks = np.zeros((n, size, size), np.float32)
  labels = np.zeros(n, np.int64)
  for i in range(n):
    if rng.random() < p_anom or i == 0:
      labels[i] = 1
      for _ in range(rng.integers(1, 4)):
        cy, cx = rng.integers(0, size, 2)
        ry, rx = rng.uniform(1, size / 4, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[i][blob] = 1
        maps[i][blob] += rng.uniform(0.05, 0.4)
      masks[i, rng.integers(size), rng.integers(size)] = 1
  labels[-1] = 0
  masks[-1] = 0
  if levels:
    lo, hi = maps.min(), maps.max()
    maps = (np.round((maps - lo) / (hi - lo) * levels) / levels).astype(np.float32)
  scores = np.sort(maps.reshape(n, -1), 1)[:, -max(1, size * size // 100):].mean(1)
  return maps, masks, labels, scores


# --- official protocol ------------------------------------------------------------------


def test_official_matches_golden_oracle(golden_metrics):
  g, _ = golden_metrics
  args = [g[f"input/{k}"] for k in ("anomaly_maps", "gt_masks", "labels", "image_scores")]
  for batch_size in (12, 5):  # in one add() and streamed
    res = M.compute_metrics(*args, protocol="official", batch_size=batch_size)
    assert list(res) == list(M.METRIC_NAMES)
    got = np.array([res[k] for k in M.METRIC_NAMES])
    np.testing.assert_allclose(got, g["metric/all"], rtol=0, atol=1e-6)
  ex = M.compute_metrics(*args, protocol="exact")
  np.testing.assert_allclose(ex["P-AUROC"], g["reference/P-AUROC_exact_sklearn"], atol=1e-9)
  np.testing.assert_allclose(ex["P-AP"], g["reference/P-AP_exact_sklearn"], atol=1e-9)


def _adeval_reference(maps, gt, lo, hi, nbins=200):
  """Per-pixel transcription of adeval's CUDA accumulator + EvalAccumulator._aupro."""
  lo, hi = np.float32(lo), np.float32(hi)
  stats = {k: np.zeros(nbins + 2) for k in ("pos", "neg", "wpos")}
  for m, g in zip(maps, gt):
    lab = measure.label(g, connectivity=2)
    area = np.bincount(lab.ravel())
    w = np.ones(g.shape, np.float32)
    w[g] = (1.0 / area[lab[g]]).astype(np.float32)
    for key, sel in (("pos", g), ("neg", ~g)):
      x, wt = m[sel], w[sel]
      inside = (x >= lo) & (x <= hi)
      b = ((x[inside] - lo) * np.float32(nbins) / (hi - lo)).astype(np.int64)
      b[b == nbins] = nbins - 1
      for weighted in (False, True):
        hist = np.zeros(nbins + 2)
        ww = wt.astype(np.float64) if weighted else np.ones(len(x))
        hist[1:-1] = np.bincount(b, ww[inside], minlength=nbins)
        hist[0] = ww[x < lo].sum()
        hist[-1] = ww[x >= hi].sum()
        if weighted and key == "pos":
          stats["wpos"] += hist
        elif not weighted:
          stats[key] += hist

  def curve(pos, neg):
    c_p, c_n = np.cumsum(pos), np.cumsum(neg)
    fn, tn = c_p[:-1], c_n[:-1]
    tp, fp = c_p[-1] - fn, c_n[-1] - tn
    return tp, fp, tn, fn

  tp, fp, tn, fn = curve(stats["pos"], stats["neg"])
  tpr, fpr = tp / (tp + fn), fp / (fp + tn)
  with np.errstate(invalid="ignore"):
    prec = tp / (tp + fp)
  prec[~(tp + fp > 0)] = 1
  auroc = np.trapezoid(tpr[::-1], fpr[::-1])
  ap = np.trapezoid(prec[::-1], tpr[::-1])
  wtp, wfp, wtn, wfn = curve(stats["wpos"], stats["neg"])
  pro, fpr = wtp / (wtp + wfn), wfp / (wfp + wtn)
  mask = fpr <= 0.3
  lo_pro, lo_fpr = pro[mask][::-1], fpr[mask][::-1]
  hi_pro, hi_fpr = pro[~mask][::-1], fpr[~mask][::-1]
  lo_a, hi_a = np.trapezoid(lo_pro, lo_fpr), np.trapezoid(hi_pro, hi_fpr)
  tot = np.trapezoid(pro[::-1], fpr[::-1])
  t = (0.3 - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1])
  y1, y2, area = lo_pro[-1], hi_pro[0], tot - (lo_a + hi_a)
  rect = y1 / (y1 + 0.5 * (y2 - y1))
  return auroc, ap, (lo_a + area * rect * t + area * (1 - rect) * t * t) / 0.3


@pytest.mark.parametrize("levels,value_range", [(None, None), (25, None), (None, (0.15, 0.5))])
def test_official_histogram_matches_adeval_transcription(levels, value_range):
  maps, masks, labels, scores = _blobs(np.random.default_rng(1), 10, 32, levels)
  res = M.compute_metrics(maps, masks, labels, scores, value_range=value_range, batch_size=3)
  lo, hi = value_range or (maps.min(), maps.max())
  want = _adeval_reference(maps, masks > 0.5, lo, hi)
  got = (res["P-AUROC"], res["P-AP"], res["AUPRO"])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  y, s = (masks > 0.5).ravel(), maps.ravel()
  np.testing.assert_allclose(res["P-F1max"], _f1max_sklearn(y, s), rtol=0, atol=1e-12)


def test_official_counts_max_twice():
  # One positive and one negative pixel sit at the max: the quirk counts each in the last
  # bin AND in overflow (P = 2 + 1, N = 14 + 1), which the exact numbers do not.
  flat = np.r_[np.linspace(0.0, 0.9, 13), 1.0, 0.95, 1.0].astype(np.float32)
  maps = flat.reshape(1, 4, 4)
  masks = np.r_[np.zeros(14), 1, 1].astype(np.float32).reshape(1, 4, 4)
  res = M.compute_metrics(maps, masks, [1], [1.0])
  want = _adeval_reference(maps, masks > 0.5, 0.0, 1.0)
  np.testing.assert_allclose((res["P-AUROC"], res["P-AP"], res["AUPRO"]), want, atol=1e-12)
  hist = C.official_hist(np.sort(flat[masks.ravel() > 0]), np.float32(0), np.float32(1), 200)
  assert hist.sum() == 3 and hist[-1] == 1 and hist[-2] == 1
  exact = M.compute_metrics(maps, masks, [1], [1.0], protocol="exact")
  assert exact["P-AUROC"] == (13 + 13 + 0.5) / 28  # 0.95 beats 13; 1.0 beats 13, ties 1
  assert not math.isclose(res["P-AUROC"], exact["P-AUROC"])


def _official_sorted_reference(maps, masks, value_range=None):
  """The official pixel metrics and pixel curves the straightforward way (as computed
  before the normal pixels stopped being sorted): ALL the negatives sorted, counted at every
  positive score, adeval's histograms by bisection on the sorted scores."""
  gt = masks > 0.5
  neg = np.sort(maps[~gt])
  areas = []
  for g in gt:
    lab = measure.label(g, connectivity=2)
    areas.append(np.bincount(lab.ravel())[lab[g]])
  order = np.argsort(maps[gt], kind="stable")
  pos, area = maps[gt][order], np.concatenate(areas)[order]
  r = C.ranks(pos, neg)
  if value_range is None:
    lo, hi = min(pos[0], neg[0]), max(pos[-1], neg[-1])
  else:
    lo, hi = (np.float32(v) for v in value_range)
  pos_w = (1.0 / area.astype(np.float64)).astype(np.float32).astype(np.float64)
  auroc, ap, aupro = C.official_pixel(
      C.official_hist(pos, lo, hi, 200),
      C.official_hist(pos, lo, hi, 200, cum_w=np.r_[0.0, np.cumsum(pos_w)]),
      C.official_hist(neg, lo, hi, 200))
  return ({"P-AUROC": auroc, "P-AP": ap, "P-F1max": C.exact_f1max(r), "AUPRO": aupro},
          C.curve_points(r))


def _flat_f1_maps(rng):
  """Maps whose P-F1max is flat over 201 thresholds packed a few float32 ulps apart: 100
  positives above every negative, then 200 more with 3 negatives just above each (fp =
  3 (tp - 100): F1 = 1/2 up to F1_EPS and rounding); lots of negatives far below."""
  maps = (0.4 * rng.random((2, 128, 128))).astype(np.float32)
  masks = np.zeros(maps.shape, np.float32)
  masks[0, 10:25, 30:50] = 1
  ulp = np.spacing(np.float32(0.5))
  steps = np.float32(0.5) + ulp * (4 * np.arange(200, 0, -1)).astype(np.float32)
  maps[masks > 0] = rng.permutation(np.r_[0.9 + 0.1 * rng.random(99), 1.0, steps])
  flat = maps.reshape(-1)  # a view
  spots = rng.choice(np.flatnonzero(masks.reshape(-1) == 0), 600, replace=False)
  flat[spots] = np.r_[steps + ulp, steps + 2 * ulp, steps + 3 * ulp]
  return maps, masks, np.array([1, 0]), np.array([1.0, 0.0])


def _official_case(name):
  rng = np.random.default_rng(21)
  if name == "flat":
    return _flat_f1_maps(rng), None
  levels = {"random": None, "ties": 6, "ties_40": 40, "value_range": None}[name]
  maps, masks, labels, scores = _blobs(rng, 12, 48, levels)
  if levels:  # quantised to [0, 1]: ties, and positives and negatives at both lo and hi
    gt = (masks > 0.5).reshape(-1)
    flat = maps.reshape(-1)  # a view
    flat[np.flatnonzero(gt)[:3]], flat[np.flatnonzero(~gt)[-3:]] = 0.0, 1.0
    for sel in (gt, ~gt):
      assert np.isin([0.0, 1.0], flat[sel]).all()
    assert len(np.unique(flat)) <= levels + 1
  return (maps, masks, labels, scores), ((0.15, 0.4) if name == "value_range" else None)


_OFFICIAL_CASES = ("random", "ties", "ties_40", "value_range", "flat")


@pytest.mark.parametrize("name", _OFFICIAL_CASES)
def test_official_without_sorting_equals_the_sorted_reference_bit_for_bit(name):
  (maps, masks, labels, scores), value_range = _official_case(name)
  want, want_curves = _official_sorted_reference(maps, masks, value_range)
  acc = M.MetricAccumulator(value_range=value_range)
  for lo in range(0, len(maps), 5):
    acc.add(maps[lo:lo + 5], masks[lo:lo + 5], labels[lo:lo + 5], scores[lo:lo + 5])
  for _ in range(2):  # result() twice: what it stores back serves again
    res = acc.result()
    for k, v in want.items():
      assert res[k] == v, (k, res[k], v)
    assert res.info["curves"]["pixel"] == want_curves
  # Every normal pixel is held once (in any order: neither add() nor result() sorts them).
  np.testing.assert_array_equal(np.sort(acc._neg.gather()), np.sort(maps[masks <= 0.5]))


@pytest.mark.parametrize("name", _OFFICIAL_CASES)
def test_official_split_over_processes_equals_the_sorted_reference_bit_for_bit(
    name, monkeypatch):
  (maps, masks, labels, scores), value_range = _official_case(name)
  want, want_curves = _official_sorted_reference(maps, masks, value_range)
  monkeypatch.setattr(M, "SUM_BYTES", 100)  # count vectors summed in several gathers
  # Contiguous rows, in process order: the positives merge in the single-process order.
  cuts = [0, 1, 1, len(maps)] if len(maps) == 2 else [0, 4, 5, len(maps)]
  accs = []
  for a, b in itertools.pairwise(cuts):  # with 2 maps, the middle process holds no rows
    accs.append(M.MetricAccumulator(value_range=value_range))
    if b > a:
      accs[-1].add(maps[a:b], masks[a:b], labels[a:b], scores[a:b])
  for res in _Hosts(3).results(accs):
    for k, v in want.items():
      assert res[k] == v, (k, res[k], v)
    assert res.info["curves"]["pixel"] == want_curves


# --- exact protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("seed,levels", [(0, 7), (1, 30), (2, 400), (3, None)])
def test_exact_equals_sklearn_with_ties(seed, levels):
  rng = np.random.default_rng(seed)
  maps, masks, labels, _ = _blobs(rng, 14, 24, levels)
  scores = np.round(rng.normal(labels, 0.8) * 2) / 2  # image scores with ties too
  res = M.compute_metrics(maps, masks, labels, scores, protocol="exact", batch_size=4)
  y, s = (masks > 0.5).ravel(), maps.ravel()
  if levels:
    assert len(np.unique(s)) <= levels + 1  # the test really has ties
  want = {
      "I-AUROC": roc_auc_score(labels, scores), "I-AP": average_precision_score(labels, scores),
      "I-F1max": _f1max_sklearn(labels, scores), "P-AUROC": roc_auc_score(y, s),
      "P-AP": average_precision_score(y, s), "P-F1max": _f1max_sklearn(y, s)}
  for k, v in want.items():
    assert abs(res[k] - v) <= 1e-9, (k, res[k], v)
  off = M.compute_metrics(maps, masks, labels, scores, protocol="official")
  for k in ("I-AUROC", "I-AP", "I-F1max", "P-F1max"):
    assert abs(off[k] - want[k]) <= 1e-12, k


def _brute_aupro(maps, gt, limit=0.3):
  """PRO curve through every distinct threshold, by definition (per-region overlaps)."""
  regions = []
  for m, g in zip(maps, gt):
    lab = measure.label(g, connectivity=2)
    regions += [m[lab == r] for r in range(1, lab.max() + 1)]
  neg = maps[~gt]
  xs, ys = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    xs.append(np.mean(neg >= t))
    ys.append(np.mean([np.mean(r >= t) for r in regions]))
  xs, ys = np.array(xs), np.array(ys)
  k = np.argmax(xs > limit)  # first point past the limit
  y_lim = np.interp(limit, xs[k - 1:k + 1], ys[k - 1:k + 1])
  area = np.trapezoid(np.r_[ys[:k], y_lim], np.r_[xs[:k], limit])
  return area / limit


@pytest.mark.parametrize("seed,levels", [(0, 6), (1, 15), (2, None)])
def test_exact_aupro_equals_brute_force(seed, levels):
  maps, masks, labels, scores = _blobs(np.random.default_rng(seed), 6, 20, levels)
  res = M.compute_metrics(maps, masks, labels, scores, protocol="exact", batch_size=4)
  assert abs(res["AUPRO"] - _brute_aupro(maps, masks > 0.5)) <= 1e-9


def test_exact_aupro_perfect_and_limit_inside_a_tie():
  maps = np.zeros((2, 8, 8), np.float32)
  masks = np.zeros((2, 8, 8), np.float32)
  masks[0, 1:3, 1:3] = 1
  masks[1, 5:8, 0:2] = 1
  maps[masks > 0] = 1.0
  assert M.compute_metrics(maps, masks, [1, 1], [1, 1], protocol="exact")["AUPRO"] == 1.0
  # Half the normal pixels tie with region 2's score: FPR jumps 0 -> 0.5 across 0.3.
  neg = np.flatnonzero(masks.ravel() == 0)
  flat = maps.ravel().copy()
  flat[neg[: len(neg) // 2]] = 0.5
  flat[masks.ravel() > 0] = 1.0
  flat[(masks[1] > 0).ravel().nonzero()[0] + 64] = 0.5
  maps2 = flat.reshape(maps.shape)
  res = M.compute_metrics(maps2, masks, [1, 1], [1, 1], protocol="exact")
  assert abs(res["AUPRO"] - _brute_aupro(maps2, masks > 0.5)) <= 1e-12
  # By hand: PRO 0.5 up to FPR 0, then linear to 1 at FPR 0.5: y(0.3) = 0.8.
  assert abs(res["AUPRO"] - (0.3 * (0.5 + 0.8) / 2) / 0.3) <= 1e-12


# --- streaming, binarisation, edge cases -----------------------------------------------


@pytest.mark.parametrize("protocol", M.PROTOCOLS)
def test_streaming_equals_in_memory(protocol):
  maps, masks, labels, scores = _blobs(np.random.default_rng(5), 17, 32, 50)
  whole = M.compute_metrics(maps, masks, labels, scores, protocol, batch_size=17)
  acc = M.MetricAccumulator(protocol)
  for lo, hi in ((0, 1), (1, 6), (6, 7), (7, 17)):  # uneven batches
    acc.add(maps[lo:hi], masks[lo:hi], labels[lo:hi], scores[lo:hi])
  first = acc.result()
  assert first == whole and acc.result() == whole  # result() twice is fine
  assert acc.nbytes() == 4 * maps.size + 4 * int((masks > 0.5).sum())
  # Regions are counted per image, so batching cannot merge or split them.
  assert first.info["n_regions"] == sum(
      measure.label(m > 0.5, connectivity=2).max() for m in masks)


class _Hosts:
  """n simulated processes, one thread each: `gather` meets at a barrier like a collective
  (a process making a different sequence of calls breaks the barrier: the test fails)."""

  def __init__(self, n: int):
    self.slots = [None] * n
    self.barrier = threading.Barrier(n, timeout=30)

  def results(self, accs) -> list:
    out, errors = [None] * len(accs), []

    def run(h):
      try:
        out[h] = accs[h].result(_HostReducer(self, h))
      except BaseException as e:  # noqa: BLE001 -- re-raised below, in the test's thread
        errors.append(e)
        self.barrier.abort()

    threads = [threading.Thread(target=run, args=(h,)) for h in range(len(accs))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    if errors:
      raise errors[0]
    return out


class _HostReducer:
  def __init__(self, hosts: _Hosts, h: int):
    self.hosts, self.h = hosts, h

  def gather(self, x):
    self.hosts.slots[self.h] = np.array(x, copy=True)
    self.hosts.barrier.wait()
    parts = list(self.hosts.slots)
    self.hosts.barrier.wait()  # nobody overwrites a slot before all have read it
    return parts


# Rows of each simulated process, in batches, of 9 normal images then 3 anomalous ones:
# 3 processes, one with normal images only, one with no rows at all; 2 processes, both with
# anomalous images, in interleaved batches.
_SPLITS = ([[[0, 7]], [], [[1, 2, 3], [4, 5], [6], [8, 9, 10, 11]]],
           [[[0, 1, 9], [6, 10]], [[2, 3, 4, 5], [7, 8, 11]]])


@pytest.mark.parametrize("split", range(len(_SPLITS)))
@pytest.mark.parametrize("protocol,gt_threshold,value_range", [
    ("official", 0.5, None), ("official", 0.0, None), ("official", 0.5, (0.1, 0.45)),
    ("exact", 0.5, None), ("exact", 0.0, None)])
def test_processes_merge_to_one(split, protocol, gt_threshold, value_range, monkeypatch):
  rng = np.random.default_rng(12)
  maps, masks, labels, scores = _blobs(rng, 12, 32, 40)
  order = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)]  # normal first
  maps, masks, labels, scores = maps[order], masks[order], labels[order], scores[order]
  masks = masks * rng.uniform(0.01, 1.0, masks.shape).astype(np.float32)  # soft
  assert labels.tolist() == [0] * 9 + [1] * 3

  def acc():
    return M.MetricAccumulator(protocol, gt_threshold, value_range)

  one = acc()
  one.add(maps, masks, labels, scores)
  want = one.result()
  monkeypatch.setattr(M, "SUM_BYTES", 100)  # count vectors summed in several gathers
  accs = []
  for batches in _SPLITS[split]:
    accs.append(acc())
    for rows in batches:
      accs[-1].add(maps[rows], masks[rows], labels[rows], scores[rows])
  got = _Hosts(len(accs)).results(accs)
  for res in got:
    assert list(res) == list(M.METRIC_NAMES)
    for k in M.METRIC_NAMES:
      assert abs(res[k] - want[k]) <= 1e-12, (k, res[k], want[k])
    for k in ("n_images", "n_pixels", "n_anomalous_pixels", "n_regions", "value_range"):
      assert res.info.get(k) == want.info.get(k), k
  assert not any(math.isnan(v) for v in want.values())


def test_processes_merge_without_masks_and_disagreeing_masks():
  maps, masks, labels, scores = _blobs(np.random.default_rng(10), 8, 16)
  want = M.compute_metrics(None, None, labels, scores)
  a, b, c = M.MetricAccumulator(), M.MetricAccumulator(), M.MetricAccumulator()
  a.add(None, None, labels[:5], scores[:5])
  c.add(None, None, labels[5:], scores[5:])
  for res in _Hosts(3).results([a, b, c]):
    assert res.info["pixel_metrics"] is False and res.info["n_images"] == 8
    for k in M.METRIC_NAMES:
      assert res[k] == pytest.approx(want[k], abs=1e-12, nan_ok=True), k
  a, b = M.MetricAccumulator(), M.MetricAccumulator()
  a.add(maps[:4], masks[:4], labels[:4], scores[:4])
  b.add(None, None, labels[4:], scores[4:])
  with pytest.raises(ValueError, match="Sample.has_mask"):
    _Hosts(2).results([a, b])


def test_gt_threshold():
  maps, masks, labels, scores = _blobs(np.random.default_rng(2), 8, 32)
  soft = masks * np.random.default_rng(3).uniform(0.01, 1.0, masks.shape).astype(np.float32)
  for protocol in M.PROTOCOLS:
    for thr in (0.5, 0.0):
      got = M.compute_metrics(maps, soft, labels, scores, protocol, gt_threshold=thr)
      want = M.compute_metrics(maps, (soft > thr).astype(np.float32), labels, scores, protocol)
      assert got == want
    assert M.compute_metrics(maps, soft, labels, scores, protocol, 0.5) != M.compute_metrics(
        maps, soft, labels, scores, protocol, 0.0)


def test_without_masks_image_metrics_only():
  maps, masks, labels, scores = _blobs(np.random.default_rng(4), 6, 16)
  res = M.compute_metrics(None, None, labels, scores)
  assert all(math.isnan(res[k]) for k in M.PIXEL_METRICS)
  assert res.info["pixel_metrics"] is False
  full = M.compute_metrics(maps, masks, labels, scores)
  assert all(res[k] == full[k] for k in M.IMAGE_METRICS)
  acc = M.MetricAccumulator()
  acc.add(maps[:3], masks[:3], labels[:3], scores[:3])
  with pytest.raises(ValueError, match="every batch"):
    acc.add(maps[3:], None, labels[3:], scores[3:])


@pytest.mark.parametrize("protocol", M.PROTOCOLS)
def test_one_class_edge_cases_give_nan(protocol):
  maps, masks, labels, scores = _blobs(np.random.default_rng(6), 6, 16)
  normal = M.compute_metrics(maps, np.zeros_like(masks), np.zeros(6), scores, protocol)
  assert all(math.isnan(v) for v in normal.values())
  assert len(normal.info["notes"]) == 2
  anomalous = M.compute_metrics(maps, np.ones_like(masks), np.ones(6), scores, protocol)
  assert all(math.isnan(v) for v in anomalous.values())
  const = M.compute_metrics(np.full_like(maps, 0.3), masks, labels, scores, protocol)
  if protocol == "official":  # adeval asserts min < max; P-F1max (sklearn) is defined
    assert math.isnan(const["P-AUROC"]) and math.isnan(const["AUPRO"])
    assert const["P-F1max"] == _f1max_sklearn((masks > 0.5).ravel(), np.full(maps.size, 0.3))
  else:
    assert const["P-AUROC"] == 0.5


def test_bad_inputs_name_the_fix():
  maps, masks, labels, scores = _blobs(np.random.default_rng(7), 4, 16)
  with pytest.raises(ValueError, match="resize the maps"):
    M.compute_metrics(maps[:, :8], masks, labels, scores)
  with pytest.raises(ValueError, match="protocol"):
    M.compute_metrics(maps, masks, labels, scores, protocol="fast")
  with pytest.raises(ValueError, match="value_range only"):
    M.MetricAccumulator("exact", value_range=(0, 1))
  bad = maps.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    M.compute_metrics(bad, masks, labels, scores)


def test_macro_average_skips_nan_and_says_which():
  per_class = {
      "a": {k: 0.8 for k in M.METRIC_NAMES},
      "b": {**{k: 0.6 for k in M.IMAGE_METRICS}, **{k: math.nan for k in M.PIXEL_METRICS}},
  }
  mean = M.macro_average(per_class)
  assert list(mean) == list(M.METRIC_NAMES)
  assert mean["I-AUROC"] == pytest.approx(0.7) and mean["P-AUROC"] == pytest.approx(0.8)
  assert mean.info["skipped"] == {k: ["b"] for k in M.PIXEL_METRICS}
  assert math.isnan(M.macro_average({"b": per_class["b"]})["AUPRO"])


def test_column_blocks_keep_order_across_block_edges():
  rng = np.random.default_rng(8)
  col, ref = M._Column(np.float32, block_bytes=16), []  # 4 items a block
  for n in (0, 3, 1, 7, 4, 0, 10, 2):
    x = rng.random(n, dtype=np.float32)
    col.append(x)
    ref.append(x)
  ref = np.concatenate(ref)
  np.testing.assert_array_equal(col.gather(), ref)
  col.append(np.ones(5, np.float32))
  np.testing.assert_array_equal(col.gather(), np.r_[ref, np.ones(5, np.float32)])
