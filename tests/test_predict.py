"""Inference and deployment: predict CLI, calibrated thresholds, jax.export round trip."""

import csv
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from inpformer_jax import anomaly_map as am
from inpformer_jax import calibrate as calibrate_cli
from inpformer_jax import calibration
from inpformer_jax import checkpoint
from inpformer_jax import export
from inpformer_jax import metrics
from inpformer_jax import predict
from inpformer_jax.data import demo, preprocess
from inpformer_jax.models import factory

CROP, RESIZE = 56, 64  # 4 x 4 patches


def _tiny_config():
  return ml_collections.ConfigDict(dict(
      encoder="custom", width=32, depth=10, num_heads=2, num_registers=0, num_inps=4,
      num_decoder_blocks=8, encoder_weights="random"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A converted-params dir of a tiny random INP-Former (as load_official_checkpoint reads)."""
  cfg = _tiny_config()
  model = factory.build_model(cfg)
  params = factory.init_params(model, cfg, jax.random.PRNGKey(0), CROP, encoder_params=None)
  arch = {"encoder": {"width": 32, "depth": 10, "num_heads": 2, "num_register_tokens": 0},
          "num_inps": 4, "num_decoder_blocks": 8, "num_heads": 2}
  d = str(tmp_path_factory.mktemp("tiny") / "params")
  checkpoint.save_params(d, params, {"kind": "inpformer", "arch": arch})
  return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  demo.make_demo_dataset(out, seed=0, classes=("brick",), size=64, n_train=4, n_good=2,
                         n_per_defect=1)
  return os.path.join(out, "brick")


def _rows(out):
  with open(os.path.join(out, "predictions.csv")) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def loaded(tiny):
  return predict.load_for_inference(tiny, image_size=CROP)


def _direct(loaded, files):
  """Reference: official preprocessing, model.apply + anomaly_map + image_score, one image at
  a time (one compiled shape for every call)."""
  model, params, _ = loaded

  @jax.jit
  def fn(params, x):
    out = model.apply({"params": params}, x)
    maps = am.anomaly_map(out["en"], out["de"], CROP)
    return maps, am.image_score(maps, 0.01)

  res = [fn(params, preprocess.load_image(f, RESIZE, CROP)[None]) for f in files]
  return (np.concatenate([np.asarray(m) for m, _ in res]),
          np.concatenate([np.asarray(s) for _, s in res]))


def test_predict_folder_end_to_end(tiny, loaded, data, tmp_path):
  out = str(tmp_path / "pred")
  predict.jitted_forward.cache_clear()
  res = predict.predict(tiny, [os.path.join(data, "test")], out, batch_size=4,
                        image_size=CROP, threshold="0.5", progress=False)
  files = sorted(r["path"] for r in res["rows"])
  assert len(files) == 5 and not res["failed"]  # 2 good + 3 defects: batches of 4 and 1
  assert res["compilations"] == 1  # the short last batch was padded, not recompiled
  rows = {r["path"]: r for r in _rows(out)}
  maps, scores = _direct(loaded, files)
  for f, m, s in zip(files, maps, scores):
    r = rows[f]
    # Batch 4 (padded) vs 1: XLA may reassociate float32 sums differently.
    np.testing.assert_allclose(float(r["score"]), s, rtol=1e-5)
    np.testing.assert_allclose(np.load(os.path.join(out, r["map_file"])), m, rtol=1e-5,
                               atol=1e-6)
    assert r["decision"] == ("anomalous" if float(r["score"]) > 0.5 else "normal")
    ov = Image.open(os.path.join(out, r["overlay_file"]))
    assert ov.size == (CROP, CROP) and ov.mode == "RGB"
  # Names keep the class sub-folders apart (good/000 vs scratch/000).
  assert len({r["map_file"] for r in rows.values()}) == 5
  lines = [json.loads(x) for x in open(os.path.join(out, "predictions.jsonl"))]
  assert sorted(x["path"] for x in lines) == files


def test_png16_maps_record_their_scale(tiny, loaded, data, tmp_path):
  out = str(tmp_path / "pred")
  f = os.path.join(data, "test", "good", "000.png")
  assert predict.main(["--checkpoint", tiny, "--input", f, "--output", out, "--image-size",
                       str(CROP), "--map-format", "png16", "--batch-size", "4",
                       "--no-progress"]) == 0
  (r,) = _rows(out)
  png = os.path.join(out, r["map_file"])
  assert Image.open(png).mode.startswith("I;16")
  (m,), _ = _direct(loaded, [f])
  got = predict.read_png16_map(png, float(r["map_scale"]))
  np.testing.assert_allclose(got, m, atol=float(r["map_scale"]) / 65535 + 1e-5)


def test_corrupt_and_missing_inputs_are_reported(tiny, data, tmp_path, capsys):
  inp = tmp_path / "in"
  inp.mkdir()
  for name in ("000.png", "001.png"):
    shutil.copy(os.path.join(data, "test", "good", name), inp / name)
  (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  out = str(tmp_path / "pred")
  code = predict.main(["--checkpoint", tiny, "--input", str(inp), str(tmp_path / "nope*.jpg"),
                       "--output", out, "--image-size", str(CROP), "--batch-size", "4",
                       "--no-progress"])
  assert code == 2
  err = capsys.readouterr().err
  assert "broken.png" in err and "nope*.jpg" in err
  rows = _rows(out)
  ok = [r for r in rows if not r["error"]]
  bad = [r for r in rows if r["error"]]
  assert sorted(os.path.basename(r["path"]) for r in ok) == ["000.png", "001.png"]
  assert {os.path.basename(r["path"]) for r in bad} == {"broken.png", "nope*.jpg"}


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


def test_calibrate_cli_and_auto_threshold(tiny, loaded, data, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(tiny, ckpt)
  code = calibrate_cli.main(["--checkpoint", ckpt, "--normal", os.path.join(data, "train"),
                             "--fpr", "0.25", "--image-size", str(CROP), "--batch-size", "4",
                             "--no-progress"])
  assert code == 0
  cal = json.load(open(os.path.join(ckpt, "calibration.json")))
  assert cal["method"] == "normal_fpr" and cal["n_images"] == 4
  assert cal["image"]["k"] == 1 and cal["image"]["fpr_achieved"] <= 0.25
  assert cal["checkpoint_id"] and cal["date"] and cal["pixel"]["n"] == 4 * 256 * 256
  _, train_scores = _direct(loaded, sorted(
      os.path.join(data, "train", "good", f)
      for f in os.listdir(os.path.join(data, "train", "good"))))
  assert cal["image"]["threshold"] == pytest.approx(np.sort(train_scores)[-2], rel=1e-6)

  out = str(tmp_path / "pred")
  res = predict.predict(ckpt, [os.path.join(data, "test")], out, image_size=CROP,
                        batch_size=4, progress=False)
  assert res["threshold"] == cal["image"]["threshold"]
  for r in res["rows"]:
    assert r["decision"] == ("anomalous" if r["score"] > res["threshold"] else "normal")
    assert 0 <= r["score_normalized"] <= 1

  assert calibrate_cli.main(["--checkpoint", ckpt, "--val", data, "--image-size", str(CROP),
                             "--batch-size", "4", "--no-progress"]) == 0
  cal = json.load(open(os.path.join(ckpt, "calibration.json")))
  assert cal["method"] == "f1_optimal" and cal["n_images"] == 5
  labels = np.array([0 if "/good/" in r["path"] else 1 for r in res["rows"]])
  scores = np.array([r["score"] for r in res["rows"]], np.float32)
  assert cal["image"]["f1"] == pytest.approx(calibration.f1_threshold(scores, labels)["f1"])
  assert 0 < cal["pixel"]["f1"] <= 1


def test_export_round_trip_and_batch_polymorphism(loaded, tmp_path):
  model, params, info = loaded
  exp = export.export_model(model, params, info, platforms=("cpu", "cuda"))
  c = export.save(tmp_path / "exp", exp, params, info, None)
  assert c["inputs"]["images"]["shape"] == ["b", CROP, CROP, 3]
  assert c["outputs"]["anomaly_map"]["shape"] == ["b", 256, 256]
  call, _ = export.load_exported(tmp_path / "exp")  # deserialised: jax + numpy only
  live = predict.Predictor(model, params, image_size=CROP, batch_size=4)  # the same jit
  rng = np.random.default_rng(0)
  for b in (1, 3):  # one export, two batch sizes
    x = rng.normal(size=(b, CROP, CROP, 3)).astype(np.float32)
    got, (maps, scores) = call(x), live(x)
    assert got["anomaly_map"].shape == (b, 256, 256) and got["score"].shape == (b,)
    np.testing.assert_allclose(got["anomaly_map"], maps, atol=1e-5)
    np.testing.assert_allclose(got["score"], scores, atol=1e-5)


def test_training_workdir_is_loaded(tmp_path):
  """A workdir as the trainer writes it: config.json + ckpt/<step>/ holding the trainable
  params; the frozen encoder comes from config.model.encoder_weights (a params dir here)."""
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  config = demo_config.get_config("runlocal=True")
  model = factory.build_model(config.model)
  crop = config.data.crop
  rng = np.random.default_rng(0)
  fill = lambda a: rng.normal(size=a.shape).astype(a.dtype)  # noqa: E731
  encoder = jax.tree.map(fill, jax.eval_shape(lambda: model.encoder.init(
      jax.random.PRNGKey(0), np.zeros((1, crop, crop, 3), np.float32),
      layers=tuple(model.target_layers)))["params"])
  trained = jax.tree.map(fill, jax.eval_shape(
      lambda: factory.init_trainable(model, jax.random.PRNGKey(0), crop)))
  enc_dir = tmp_path / "encoder_weights"
  m = config.model
  checkpoint.save_params(enc_dir, encoder, {"kind": "dinov2", "arch": {
      "width": m.width, "depth": m.depth, "num_heads": m.num_heads,
      "num_register_tokens": m.num_registers}})
  with config.unlocked():
    config.model.encoder_weights = str(enc_dir)
  state = {"params": trained, "opt_state": {"count": np.zeros((), np.int32)},
           "step": np.int32(7), "rng": np.zeros(2, np.uint32)}
  wd = tmp_path / "wd"
  ck = checkpoint.TrainCheckpointer(wd, save_interval_steps=1)
  ck.save(7, state, force=True)
  ck.close()
  (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  _, got, info = predict.load_for_inference(wd)
  assert info["step"] == 7 and info["image_size"] == crop
  assert info["resize"] == config.data.resize and info["kind"] == "workdir"
  want = factory.merge_params(encoder, trained)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
  with pytest.raises(predict.CheckpointError, match="neither a training workdir"):
    predict.load_for_inference(tmp_path)


def test_official_pth_gives_the_official_maps(tmp_path):
  """An official-format model.pth (golden fixture, written with torch) through the predict
  loader and the padded batch: the official smoothed maps and scores."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  golden = Path(os.environ.get("INPFORMER_GOLDEN",
                               Path(__file__).resolve().parents[2] / "shared" / "golden"))
  if not (golden / "inpformer_dev.npz").exists():
    pytest.skip(f"golden fixture not found at {golden}")
  torch = pytest.importorskip("torch")
  z = np.load(golden / "inpformer_dev.npz")
  keys = json.loads((golden / "inpformer_dev.json").read_text())["state_dict_keys"]
  pth = tmp_path / "model.pth"
  torch.save({k: torch.from_numpy(np.array(z[f"sd/{k}"])) for k in keys}, pth)
  x = np.asarray(z["input/images"]).transpose(0, 2, 3, 1)
  model, params, info = predict.load_for_inference(pth, image_size=x.shape[1])
  assert info["kind"] == "pth" and info["calibration_path"].endswith("model.pth.calibration.json")
  maps, scores = predict.Predictor(model, params, image_size=x.shape[1], batch_size=3)(x)
  np.testing.assert_allclose(maps, z["map/smoothed256"][:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(scores, z["score/top1pct"], atol=1e-5, rtol=0)
