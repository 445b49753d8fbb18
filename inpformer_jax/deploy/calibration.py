"""Decision thresholds for image scores and map pixels, and the score normalisation.

Everywhere in inpformer-jax a score s is called anomalous when  s > threshold  (strictly).

* From held-out NORMAL images at a target false-positive rate alpha (`fpr_threshold`):
  FPR(t) = #{normal s > t} / n is non-increasing and right-continuous in t, so the smallest t
  with FPR(t) <= alpha exists and is a normal score: with k = floor(alpha * n) false positives
  allowed, t is the (k+1)-th largest normal score, i.e. sorted_ascending[n - k - 1]. This is
  numpy's `np.quantile(s, 1 - alpha, method="inverted_cdf")` (the smallest x with
  #{s <= x} / n >= 1 - alpha). The FPR reached on the calibration images is <= alpha, equal
  to k / n without ties. Image level: one score per image; pixel level: every pixel of every
  normal map counts as one sample.
* From labelled validation images, F1-optimal (`f1_threshold`): the threshold where
  F1 = 2PR / (P + R + 1e-7) is largest, over the candidate thresholds of the metrics' F1max
  (`metrics.py`: sklearn's precision_recall_curve, predicted positive when s >= u for each
  distinct positive score u). The best u is returned as the strict threshold
  nextafter(u, -inf) in float32, so "s > threshold" selects exactly the same float32 scores
  as "s >= u", and the F1 recorded equals metrics.py's I-F1max (P-F1max for pixels, masks
  binarised with > gt_threshold after the nearest resize to 256 as in the evaluation).
* Normalisation (optional, `minmax`): score -> clip((s - min) / (max - min), 0, 1) with min
  and max of the calibration images' scores, recorded in calibration.json.
"""

from __future__ import annotations

import math

import numpy as np

from inpformer_jax import errors
from inpformer_jax.metrics import F1_EPS


class CalibrationError(errors.UserError, ValueError):
  """Calibration images or a target rate that give no threshold; says what to change."""


def fpr_threshold(normal_scores, fpr: float) -> dict:
  """Smallest t with #{s > t} / n <= fpr. -> {"threshold", "fpr_achieved", "k", "n"}."""
  s = np.sort(np.asarray(normal_scores, np.float64).ravel())
  n = s.size
  if n == 0:
    raise CalibrationError("no normal scores to calibrate on")
  if not 0 <= fpr < 1:
    raise CalibrationError(f"fpr={fpr}: choose a target false-positive rate in [0, 1) "
                           "(--fpr / --pixel_fpr)")
  # floor with a little slack so that e.g. 0.01 * 300 = 3.0000000000000004 -> 3.
  k = min(int(math.floor(fpr * n + 1e-9)), n - 1)
  t = s[n - k - 1]
  return {"threshold": float(t), "fpr_achieved": float(np.mean(s > t)), "k": k, "n": int(n)}


def f1_threshold(scores, labels) -> dict:
  """F1-optimal strict threshold. -> {"threshold", "f1", "precision", "recall", "u"}."""
  scores = np.asarray(scores, np.float32).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if labels.all() or not labels.any():
    raise CalibrationError("F1 calibration (--val) needs both normal and anomalous samples "
                           f"(got {labels.sum()} anomalous of {labels.size}): use a --val "
                           "folder with test/good and defect folders, or --normal")
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  # Candidate thresholds: distinct scores, descending; counts at >= each.
  last = np.r_[s[1:] != s[:-1], True]  # last index of each run of equal scores
  tp = np.cumsum(y)[last].astype(np.float64)
  fp = np.cumsum(~y)[last].astype(np.float64)
  u = s[last]
  precision = tp / (tp + fp)
  recall = tp / y.sum()
  f1 = 2 * precision * recall / (precision + recall + F1_EPS)
  # Only thresholds at positive scores are candidates (sklearn's curve; a threshold holding
  # only more negatives has the same recall and lower precision, so this loses nothing).
  has_pos = np.r_[tp[:1] > 0, np.diff(tp) > 0]
  f1 = np.where(has_pos, f1, -1.0)
  i = int(np.argmax(f1))
  return {"threshold": float(np.nextafter(np.float32(u[i]), np.float32(-np.inf))),
          "u": float(u[i]), "f1": float(f1[i]), "precision": float(precision[i]),
          "recall": float(recall[i])}


def pixel_range(cal: dict | None) -> tuple[float, float] | None:
  """The calibration maps' [min, max] (its pixel section): the fixed colour scale of every
  overlay and gallery panel. None without a calibration or a pixel section."""
  pix = (cal or {}).get("pixel") or {}
  return (float(pix["min"]), float(pix["max"])) if "min" in pix and "max" in pix else None


def minmax(scores) -> dict:
  s = np.asarray(scores, np.float64)
  return {"method": "minmax", "min": float(s.min()), "max": float(s.max())}


def normalize(scores, norm: dict):
  """Min-max normalisation recorded by `minmax`, clipped to [0, 1]."""
  lo, hi = norm["min"], norm["max"]
  return np.clip((np.asarray(scores, np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def calibrate_normal(scores, maps, fpr: float, *, pixel_fpr: float | None = None) -> dict:
  """Image + pixel thresholds from normal images only. maps (N, H, W)."""
  maps = np.asarray(maps, np.float32)
  img = fpr_threshold(np.asarray(scores, np.float32), fpr)
  pix = fpr_threshold(maps, fpr if pixel_fpr is None else pixel_fpr)
  return {
      "method": "normal_fpr",
      "image": dict(img, target_fpr=fpr),
      "pixel": dict(pix, target_fpr=fpr if pixel_fpr is None else pixel_fpr,
                    min=float(maps.min()), max=float(maps.max())),
      "normalization": minmax(scores),
  }


def calibrate_labelled(scores, labels, maps, masks, *, gt_threshold: float = 0.5) -> dict:
  """F1-optimal image and pixel thresholds from labelled images.

  scores (N,), labels (N,) 0/1, maps (N, 256, 256), masks (N, 256, 256) soft in [0, 1] or None
  (no pixel threshold then).
  """
  out = {"method": "f1_optimal", "image": f1_threshold(scores, labels),
         "normalization": minmax(scores)}
  maps = np.asarray(maps, np.float32)
  if masks is not None:
    gt = np.asarray(masks) > gt_threshold
    if gt.any():
      out["pixel"] = dict(f1_threshold(maps, gt), gt_threshold=gt_threshold,
                          min=float(maps.min()), max=float(maps.max()))
  return out
