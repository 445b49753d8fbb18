"""deploy.inferencer: the served forward equals the evaluation's, in padded fixed-shape
batches; run() over files; how inputs turn into files and file names."""

import dataclasses
import os
import shutil
import time

import numpy as np
import pytest

from inpformer_jax.data import preprocess
from inpformer_jax.deploy.inferencer import Inferencer, expand_inputs, relative_names
from tests.deploy import models
from tests.deploy.models import demo_data, loaded, tiny  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def test_files(demo_data):
  return models.image_files(os.path.join(demo_data, "test"))  # 5 images


def test_inferencer_equals_maps_and_scores_image_by_image(loaded, test_files):
  images = np.stack([loaded.preprocessing.image(f) for f in test_files])
  inferencer = Inferencer(loaded, batch_size=4)
  maps, scores = zip(inferencer(images[:4]), inferencer(images[4:]))
  maps, scores = np.concatenate(maps), np.concatenate(scores)
  want_maps, want_scores = models.direct(loaded, test_files)
  assert maps.shape == (5, 256, 256) and scores.shape == (5,)
  # Batch 4 (padded) vs 1: XLA may reassociate float32 sums differently.
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  np.testing.assert_allclose(maps, want_maps, rtol=1e-5, atol=1e-6)
  assert np.ptp(want_scores) > 1e-3  # the images are told apart: the comparison means something


def test_short_batches_are_padded_into_one_compilation(loaded):
  inferencer = Inferencer(loaded, batch_size=4)
  x = np.random.default_rng(0).normal(size=(4, models.CROP, models.CROP, 3)).astype(np.float32)
  full_maps, full_scores = inferencer(x)
  for n in (1, 3):
    maps, scores = inferencer(x[:n])
    assert maps.shape == (n, 256, 256) and scores.shape == (n,)
    np.testing.assert_allclose(scores, full_scores[:n], rtol=1e-5)
  assert inferencer.compilations() == 1
  for n in (0, 5):
    with pytest.raises(ValueError, match=f"got {n} images for a batch of 4"):
      inferencer(np.zeros((n, models.CROP, models.CROP, 3), np.float32))
  with pytest.raises(ValueError, match="--batch_size 0"):
    Inferencer(loaded, batch_size=0)


def test_run_yields_every_file_in_order_with_errors(loaded, test_files, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  missing = str(tmp_path / "missing.png")
  files = [test_files[0], str(broken), test_files[1], missing, test_files[2], str(text),
           test_files[3], test_files[4]]
  bad = {str(broken), missing, str(text)}
  results = list(Inferencer(loaded, batch_size=2).run(files, progress=False))
  assert [r.index for r in results] == list(range(len(files)))
  assert [r.path for r in results] == files
  for r in results:
    if r.path in bad:
      assert r.error and r.path in r.error and r.anomaly_map is None and r.score is None
    else:
      assert r.error is None and r.image.shape == (models.CROP, models.CROP, 3)
  ok = [r for r in results if r.error is None]
  want_maps, want_scores = models.direct(loaded, [r.path for r in ok])
  np.testing.assert_allclose([r.score for r in ok], want_scores, rtol=1e-5)
  np.testing.assert_allclose(np.stack([r.anomaly_map for r in ok]), want_maps, rtol=1e-5,
                             atol=1e-6)
  assert list(Inferencer(loaded, batch_size=2).run([], progress=False)) == []


def test_run_reads_about_one_batch_ahead(loaded, test_files):
  """Files are decoded a bounded distance ahead of the device (a folder of 10^5 images must
  not all sit decoded in host memory)."""
  decoded = []

  class Counting(preprocess.Preprocessing):
    def image(self, path):
      decoded.append(path)
      return super().image(path)

  counting = dataclasses.replace(loaded, preprocessing=Counting(
      loaded.preprocessing.resize, loaded.preprocessing.crop))
  files = [test_files[0]] * 40
  results = Inferencer(counting, batch_size=2).run(files, progress=False, workers=4)
  first = next(results)  # the first batch is scored ...
  time.sleep(0.5)  # ... and the readers have had time to run ahead
  assert first.index == 0 and len(decoded) <= 2 * 2 + 4
  assert len(list(results)) == 39 and len(decoded) == 40


def test_expand_inputs_and_relative_names(demo_data, tmp_path):
  root = tmp_path / "in"
  (root / "sub").mkdir(parents=True)
  good = os.path.join(demo_data, "test", "good", "000.png")
  for rel in ("b.png", "a.PNG", "sub/c.jpg"):
    shutil.copy(good, root / rel)
  (root / "notes.txt").write_text("not an image")
  (root / "empty").mkdir()
  odd = root / "image.dat"  # named explicitly: kept whatever its extension
  shutil.copy(good, odd)
  files, unmatched = expand_inputs([str(root), str(root / "b.png"), str(odd),
                                    str(root / "sub" / "*.jpg"), str(root / "empty"),
                                    str(tmp_path / "nope*.png")])
  # Folders recursively (image extensions, any case, sorted), files, globs; no duplicates.
  assert files == [str(root / "a.PNG"), str(root / "b.png"), str(root / "sub" / "c.jpg"),
                   str(odd)]
  assert unmatched == [str(root / "empty"), str(tmp_path / "nope*.png")]
  # a glob that matches folders: the images inside them
  assert expand_inputs([str(root / "s*")]) == ([str(root / "sub" / "c.jpg")], [])
  cwd = os.getcwd()
  try:  # relative arguments come back absolute
    os.chdir(root)
    assert expand_inputs(["b.png"]) == ([str(root / "b.png")], [])
  finally:
    os.chdir(cwd)

  names = relative_names(["/d/test/good/000.png", "/d/test/crack/000.png", "/d/test/x.png"])
  assert names == ["good/000.png", "crack/000.png", "x.png"]
  assert relative_names(["/d/test/good/000.png"]) == ["000.png"]
  assert relative_names([]) == []
