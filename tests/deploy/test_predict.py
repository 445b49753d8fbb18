"""deploy.predict: a folder end to end, png16 maps, unreadable and missing inputs, exit codes."""

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image

from inpformer_jax import visuals
from inpformer_jax.deploy import predict
from tests import browser
from tests.deploy import models
from tests.deploy.models import demo_data, loaded, tiny  # noqa: F401 (fixtures)

CROP = models.CROP


def _rows(out):
  with open(os.path.join(out, "predictions.csv")) as f:
    return list(csv.DictReader(f))


def _main(tiny, inputs, out, *extra):
  return predict.main(["--checkpoint", tiny, "--input", *inputs, "--output", out,
                       "--image_size", str(CROP), "--batch_size", "4", "--noprogress", *extra])


def test_predict_folder_end_to_end(loaded, demo_data, tmp_path):
  out = str(tmp_path / "pred")
  res = predict.predict(loaded, [os.path.join(demo_data, "test")], out, batch_size=4,
                        threshold="0.5", progress=False)
  files = sorted(r["path"] for r in res["rows"])
  assert len(files) == 5 and not res["failed"]  # 2 good + 3 defects: batches of 4 and 1
  assert res["compilations"] == 1  # the short last batch was padded, not recompiled
  rows = {r["path"]: r for r in _rows(out)}
  maps, scores = models.direct(loaded, files)
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
  # Every overlay on one colour scale (no calibration): the range of all the run's maps.
  all_maps = [np.load(os.path.join(out, r["map_file"])) for r in rows.values()]
  assert res["scale"] == (min(m.min() for m in all_maps), max(m.max() for m in all_maps))
  for r in rows.values():  # drawn on that scale, not on each map's own range
    want = visuals.overlay(loaded.preprocessing.image(r["path"]),
                           np.load(os.path.join(out, r["map_file"])), *res["scale"])
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, r["overlay_file"]))),
                                  want)
  # report.html as a browser shows it: every image, most anomalous first, all decoded.
  page = browser.render(os.path.join(out, "report.html"))
  ranked = sorted(res["rows"], key=lambda r: -r["score"])
  assert [i["src"] for i in page["images"] if i["src"].startswith("overlays/")] == [
      r["overlay_file"] for r in ranked]
  assert all(i["loaded"] for i in page["images"]) and "5 images; threshold: 0.5" in page["text"]


def test_png16_maps_record_their_scale(tiny, loaded, demo_data, tmp_path):
  out = str(tmp_path / "pred")
  f = os.path.join(demo_data, "test", "good", "000.png")
  assert _main(tiny, [f], out, "--map_format", "png16") == 0
  (r,) = _rows(out)
  png = os.path.join(out, r["map_file"])
  assert Image.open(png).mode.startswith("I;16")
  (m,), _ = models.direct(loaded, [f])
  got = predict.read_png16_map(png, float(r["map_scale"]))
  np.testing.assert_allclose(got, m, atol=float(r["map_scale"]) / 65535 + 1e-5)


def test_corrupt_and_missing_inputs_are_reported(tiny, demo_data, tmp_path, capsys):
  inp = tmp_path / "in"
  inp.mkdir()
  for name in ("000.png", "001.png"):
    shutil.copy(os.path.join(demo_data, "test", "good", name), inp / name)
  (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  out = str(tmp_path / "pred")
  code = _main(tiny, [str(inp), str(tmp_path / "nope*.jpg")], out)
  assert code == 2
  err = capsys.readouterr().err
  assert "broken.png" in err and "nope*.jpg" in err
  rows = _rows(out)
  ok = [r for r in rows if not r["error"]]
  bad = [r for r in rows if r["error"]]
  assert sorted(os.path.basename(r["path"]) for r in ok) == ["000.png", "001.png"]
  assert {os.path.basename(r["path"]) for r in bad} == {"broken.png", "nope*.jpg"}


def test_dotted_file_names_keep_their_own_maps(tiny, demo_data, tmp_path):
  inp = tmp_path / "in"
  inp.mkdir()
  good = os.path.join(demo_data, "test", "good")
  shutil.copy(os.path.join(good, "000.png"), inp / "part.v1.png")
  shutil.copy(os.path.join(good, "001.png"), inp / "part.v2.png")
  # x.png and x.jpg share a stem: their outputs keep the extension to stay apart
  Image.open(os.path.join(good, "000.png")).save(inp / "x.png")
  Image.open(os.path.join(good, "001.png")).save(inp / "x.jpg")
  out = str(tmp_path / "pred")
  assert _main(tiny, [str(inp)], out) == 0
  rows = {r["name"]: r for r in _rows(out)}
  assert {n: r["map_file"] for n, r in rows.items()} == {
      "part.v1.png": os.path.join("maps", "part.v1.npy"),
      "part.v2.png": os.path.join("maps", "part.v2.npy"),
      "x.png": os.path.join("maps", "x.png.npy"), "x.jpg": os.path.join("maps", "x.jpg.npy")}
  assert len({r["overlay_file"] for r in rows.values()}) == 4
  for r in rows.values():  # each map is its own image's
    np.testing.assert_allclose(np.load(os.path.join(out, r["map_file"])).max(),
                               float(r["map_max"]), rtol=1e-6)
  assert rows["part.v1.png"]["map_max"] != rows["part.v2.png"]["map_max"]
  assert rows["x.png"]["map_max"] != rows["x.jpg"]["map_max"]


def test_folder_without_images_is_reported_as_such(tiny, demo_data, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("not an image")  # present, but not an image extension
  missing = tmp_path / "missing"
  out = str(tmp_path / "pred")
  good = os.path.join(demo_data, "test", "good", "000.png")  # the run goes on without those two
  assert _main(tiny, [good, str(empty), str(missing)], out) == 2
  err = capsys.readouterr().err
  (line,) = [x for x in err.splitlines() if str(empty) in x]
  assert "a folder without images" in line and "no such file" not in line
  (line,) = [x for x in err.splitlines() if str(missing) in x]
  assert "no such file" in line
  rows = {r["path"]: r["error"] for r in _rows(out)}
  assert rows[str(empty)].startswith("a folder without images")
  assert rows[str(missing)].startswith("no such file")


def test_usage_errors_exit_2_with_one_line(tiny, demo_data, tmp_path, capsys):
  f = os.path.join(demo_data, "test", "good", "000.png")
  out = str(tmp_path / "pred")
  assert _main(str(tmp_path / "no_such_model"), [f], out) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1
  assert _main(tiny, [f], out, "--threshold", "high") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --threshold 'high'") and len(err.splitlines()) == 1
