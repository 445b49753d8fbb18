"""The embedded demo dataset: layout, counts, train/test separation, defect/mask consistency."""

import filecmp
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from inpformer_jax.data import demo, readers


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  manifest = demo.make_demo_dataset(out, seed=0)
  return out, manifest


def _load(path):
  with Image.open(path) as img:
    return np.asarray(img)


def test_counts_and_layout(full):
  out, _ = full
  train = readers.read_dataset("demo", out, None, "train")
  test = readers.read_dataset("demo", out, None, "test")
  classes = readers.classes_of(train)
  assert len(classes) >= 3 and set(classes) == set(demo.DEMO_CLASSES)
  for c in classes:
    tr = [s for s in train if s.category == c]
    te = [s for s in test if s.category == c]
    assert len(tr) == 40
    assert sum(s.label == 0 for s in te) == 10 and sum(s.label == 1 for s in te) == 12
    assert {s.defect for s in te} == {"good", *demo.DEFECTS}
  img = _load(test[0].image_path)
  assert img.shape == (256, 256, 3) and img.dtype == np.uint8
  assert os.path.isfile(os.path.join(out, "SOURCES.txt"))
  assert "CC0" in open(os.path.join(out, "SOURCES.txt")).read()


def test_train_and_test_crops_share_no_source_pixel(full):
  out, manifest = full
  assert json.load(open(os.path.join(out, "demo_manifest.json"))) == manifest
  for name, entry in manifest["classes"].items():
    split = entry["split_row"]
    assert all(t["box_yxhw"][0] + t["box_yxhw"][2] <= split for t in entry["train"]), name
    assert all(t["box_yxhw"][0] >= split for t in entry["test"]), name


def test_masks_are_exactly_the_changed_pixels(full):
  out, manifest = full
  sources = {n: demo.load_source(demo.CLASS_SOURCES[n]) for n in manifest["classes"]}
  for name, entry in manifest["classes"].items():
    counters = {}
    for info in entry["test"]:
      kind = info["defect"]
      i = counters[kind] = counters.get(kind, -1) + 1
      clean = demo.render_crop(sources[name], info, manifest["size"])
      img = _load(os.path.join(out, name, "test", kind, f"{i:03d}.png"))
      if kind == "good":
        np.testing.assert_array_equal(img, clean)
        continue
      mask_png = _load(os.path.join(out, name, "ground_truth", kind, f"{i:03d}_mask.png"))
      assert mask_png.shape == (256, 256) and set(np.unique(mask_png)) == {0, 255}
      mask = mask_png == 255
      # unmasked pixels are untouched (defects are pasted with hard edges, no blending)
      np.testing.assert_array_equal(img[~mask], clean[~mask])
      changed = np.any(img != clean, axis=-1)
      assert changed[mask].mean() > 0.9, (name, kind, i, changed[mask].mean())
      contrast = np.abs(img[mask].astype(float) - clean[mask].astype(float)).mean()
      assert contrast >= demo.MIN_CONTRAST[kind], (name, kind, i, contrast)
      # as visible as a real defect: it spans >= 3 ViT patches (14 px) at 224 px
      ys, xs = np.nonzero(mask)
      extent = max(np.ptp(ys), np.ptp(xs)) + 1
      assert extent * 224 / 256 >= 3 * 14, (name, kind, i, extent)
      assert mask.sum() >= 300, (name, kind, i, mask.sum())


def test_deterministic_by_seed_and_offline(tmp_path, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError("the demo generator must not use the network")
  monkeypatch.setattr(socket, "socket", no_network)
  kw = dict(classes=("brick", "galaxy"), n_train=2, n_good=1, n_per_defect=1)
  demo.make_demo_dataset(str(tmp_path / "a"), seed=5, **kw)
  demo.make_demo_dataset(str(tmp_path / "b"), seed=5, **kw)
  demo.make_demo_dataset(str(tmp_path / "c"), seed=6, **kw)
  files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a")
                 for d, _, fs in os.walk(tmp_path / "a") for f in fs)
  assert len(files) == 2 * (2 + 1 + 3 + 3) + 2
  match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
  assert not mismatch and not errors
  _, mismatch, _ = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", files, shallow=False)
  assert len(mismatch) > 10


def test_cli_and_overwrite(tmp_path, capsys):
  out = str(tmp_path / "d")
  demo.main(["--out", out, "--classes", "gravel", "--seed", "1"])
  assert "gravel: 40 train, 22 test images" in capsys.readouterr().out
  assert demo.main(["--out", out, "--classes", "gravel"]) == 2  # one line, no traceback
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and "gravel exists; pass --overwrite" in line
  demo.main(["--out", out, "--classes", "gravel", "--overwrite", "--seed", "2"])
  with pytest.raises(ValueError, match="unknown demo class"):
    demo.make_demo_dataset(out, classes=("marble",))


def test_defect_functions_leave_outside_untouched():
  rng = np.random.default_rng(0)
  img = demo.load_source(demo.CLASS_SOURCES["grass"])[:256, :256].copy()
  foreign = {"coffee": demo.load_source(demo.FOREIGN_SOURCES["coffee"])}
  for kind in demo.DEFECTS:
    bad, mask = demo.make_defect(kind, img, rng, foreign)
    assert mask.dtype == bool and mask.any()
    np.testing.assert_array_equal(bad[~mask], img[~mask])
  with pytest.raises(ValueError, match="unknown defect"):
    demo.make_defect("dent", img, rng, foreign)
