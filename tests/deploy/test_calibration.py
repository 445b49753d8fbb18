"""Decision thresholds: the FPR and F1 definitions, the calibrate CLI, predict's auto threshold."""

import json
import os
import shutil

import numpy as np
import pytest

from inpformer_jax import loading
from inpformer_jax import metrics
from inpformer_jax.deploy import calibrate as calibrate_cli
from inpformer_jax.deploy import calibration
from inpformer_jax.deploy import predict
from tests.deploy import models
from tests.deploy.models import demo_data, loaded, tiny  # noqa: F401 (fixtures)

CROP = models.CROP


def test_fpr_threshold_hand_computed():
  s = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0], np.float32)
  # 10 normals, fpr 0.2: 2 may exceed -> t = 3rd largest = 0.8 (0.9 and 1.0 are > 0.8).
  r = calibration.fpr_threshold(s, 0.2)
  assert r["threshold"] == pytest.approx(0.8) and r["k"] == 2 and r["fpr_achieved"] == 0.2
  # fpr 0.15: floor(1.5) = 1 -> 2nd largest 0.9; fpr 0: the max, nothing above it.
  assert calibration.fpr_threshold(s, 0.15)["threshold"] == pytest.approx(0.9)
  assert calibration.fpr_threshold(s, 0.0)["threshold"] == pytest.approx(1.0)
  # Ties: three scores at the top value; any t below it flags all three.
  t = calibration.fpr_threshold([1, 2, 3, 3, 3], 0.2)
  assert t["threshold"] == 3 and t["fpr_achieved"] == 0
  rng = np.random.default_rng(0)
  for n, fpr in ((37, 0.05), (1000, 0.01), (300, 0.01), (5, 0.5)):
    x = rng.normal(size=n).astype(np.float32)
    t = calibration.fpr_threshold(x, fpr)["threshold"]
    assert t == pytest.approx(float(np.quantile(x, 1 - fpr, method="inverted_cdf")))
    assert np.mean(x > t) <= fpr  # target met ...
    assert np.mean(x > np.nextafter(np.float32(t), -np.inf)) > fpr  # ... and t is the smallest


def test_f1_threshold_matches_metrics_f1max():
  rng = np.random.default_rng(1)
  labels = rng.random(200) < 0.3
  scores = (rng.normal(size=200) + 1.2 * labels).astype(np.float32)
  scores[:20] = np.round(scores[:20], 1)  # some ties
  r = calibration.f1_threshold(scores, labels)
  official = metrics._image_metrics(labels, scores, "official")["I-F1max"]  # pylint: disable=protected-access
  exact = metrics._image_metrics(labels, scores, "exact")["I-F1max"]  # pylint: disable=protected-access
  assert r["f1"] == pytest.approx(official, abs=1e-12) and r["f1"] == pytest.approx(exact)
  pred = scores > r["threshold"]
  tp, fp = np.sum(pred & labels), np.sum(pred & ~labels)
  p, rec = tp / (tp + fp), tp / labels.sum()
  assert 2 * p * rec / (p + rec + 1e-7) == pytest.approx(r["f1"])
  # Hand example: scores 4,3,2,1 labels 1,0,1,0 -> candidates u=4 (F1 2/3) and u=2 (P=2/3,
  # R=1, F1 0.8): best u = 2, strict threshold just below 2.
  h = calibration.f1_threshold([4, 3, 2, 1], [1, 0, 1, 0])
  assert h["u"] == 2 and h["f1"] == pytest.approx(0.8, abs=1e-6) and 1.99 < h["threshold"] < 2


def test_calibrate_cli_and_auto_threshold(tiny, loaded, demo_data, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(tiny, ckpt)
  flags = ["--image_size", str(CROP), "--batch_size", "4", "--noprogress"]
  code = calibrate_cli.main(["--checkpoint", ckpt, "--normal", os.path.join(demo_data, "train"),
                             "--fpr", "0.25", *flags])
  assert code == 0
  cal = json.load(open(os.path.join(ckpt, "calibration.json")))
  assert cal["method"] == "normal_fpr" and cal["n_images"] == 4
  assert cal["image"]["k"] == 1 and cal["image"]["fpr_achieved"] <= 0.25
  assert cal["checkpoint_id"] and cal["date"] and cal["pixel"]["n"] == 4 * 256 * 256
  _, train_scores = models.direct(loaded, models.image_files(os.path.join(demo_data, "train")))
  assert cal["image"]["threshold"] == pytest.approx(np.sort(train_scores)[-2], rel=1e-6)

  out = str(tmp_path / "pred")
  res = predict.predict(loading.load(ckpt, image_size=CROP), [os.path.join(demo_data, "test")],
                        out, batch_size=4, progress=False)
  assert res["threshold"] == cal["image"]["threshold"]
  for r in res["rows"]:
    assert r["decision"] == ("anomalous" if r["score"] > res["threshold"] else "normal")
    assert 0 <= r["score_normalized"] <= 1

  assert calibrate_cli.main(["--checkpoint", ckpt, "--val", demo_data, *flags]) == 0
  cal = json.load(open(os.path.join(ckpt, "calibration.json")))
  assert cal["method"] == "f1_optimal" and cal["n_images"] == 5
  labels = np.array([0 if "/good/" in r["path"] else 1 for r in res["rows"]])
  scores = np.array([r["score"] for r in res["rows"]], np.float32)
  assert cal["image"]["f1"] == pytest.approx(calibration.f1_threshold(scores, labels)["f1"])
  assert 0 < cal["pixel"]["f1"] <= 1
