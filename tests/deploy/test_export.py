"""deploy.export: the jax.export round trip, one export for every batch size, the CLI, and
examples/serve_exported.py (jax + numpy + PIL only) reading what it writes."""

import contextlib
import importlib.util
import io
import json
import os

import jax
import numpy as np
import pytest

from inpformer_jax import anomaly_map
from inpformer_jax.deploy import export
from inpformer_jax.deploy.inferencer import Inferencer
from tests.conftest import REPO
from tests.deploy import models
from tests.deploy.models import demo_data, loaded, tiny  # noqa: F401 (fixtures)

CROP = models.CROP


@pytest.fixture(scope="module")
def cli_export(tiny, tmp_path_factory):
  """python -m inpformer_jax.deploy.export --check -> (exit status, stdout, output dir)."""
  out = tmp_path_factory.mktemp("export") / "exported"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = export.main(["--checkpoint", tiny, "--image_size", str(CROP), "--output", str(out),
                        "--platforms", "cpu", "--check"])
  return code, stdout.getvalue(), out


def test_export_round_trip_and_batch_polymorphism(loaded, tmp_path):
  exp = export.export_model(loaded, platforms=("cpu", "cuda"))
  c = export.save(tmp_path / "exp", exp, loaded.params, loaded.describe(), None)
  assert c["inputs"]["images"]["shape"] == ["b", CROP, CROP, 3]
  assert c["outputs"]["anomaly_map"]["shape"] == ["b", 256, 256]
  call, _ = export.load_exported(tmp_path / "exp")  # deserialised: jax + numpy only
  live = Inferencer(loaded, batch_size=4)  # the same jit
  rng = np.random.default_rng(0)
  for b in (1, 3):  # one export, two batch sizes
    x = rng.normal(size=(b, CROP, CROP, 3)).astype(np.float32)
    got, (maps, scores) = call(x), live(x)
    assert got["anomaly_map"].shape == (b, 256, 256) and got["score"].shape == (b,)
    np.testing.assert_allclose(got["anomaly_map"], maps, atol=1e-5)
    np.testing.assert_allclose(got["score"], scores, atol=1e-5)


def test_export_cli_check_and_the_exported_model_is_the_loaded_one(cli_export, loaded):
  code, stdout, out = cli_export
  assert code == 0 and "check: max |exported - live|" in stdout
  contract = json.loads((out / export.CONTRACT_FILE).read_text())
  info = loaded.describe()
  assert contract["checkpoint_id"] == info["checkpoint_id"] and contract["calibration"] is None
  assert contract["image_size"] == CROP and contract["map_kind"] == info["map_kind"]
  assert contract["inputs"]["images"]["preprocessing"]["resize"] == models.RESIZE
  assert contract["inputs"]["params"]["n_leaves"] == len(jax.tree.leaves(loaded.params))
  call, _ = export.load_exported(out)
  x = np.random.default_rng(1).normal(size=(2, CROP, CROP, 3)).astype(np.float32)
  got = call(x)
  want = anomaly_map.jit_maps_and_scores(loaded.model, **loaded.scoring)(loaded.params, x)
  assert sorted(got) == sorted(export.OUTPUT_NAMES)
  for k in export.OUTPUT_NAMES:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), atol=1e-5)


def test_serve_exported_example_reads_the_export(cli_export, loaded, demo_data, capsys):
  _, _, out = cli_export
  spec = importlib.util.spec_from_file_location(
      "serve_exported", os.path.join(REPO, "examples", "serve_exported.py"))
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  files = models.image_files(os.path.join(demo_data, "test"))[:2]
  _, _, contract = example.load(out)
  for f in files:  # its preprocessing, spelled out from contract.json, is the product's
    np.testing.assert_array_equal(example.preprocess(f, contract), loaded.preprocessing.image(f))
  assert example.main(["serve_exported.py", str(out), *files]) == 0
  lines = capsys.readouterr().out.splitlines()
  _, scores = models.direct(loaded, files)
  assert len(lines) == len(files)
  for line, f, s in zip(lines, files, scores):
    assert line.startswith(f"{f}: score ")
    assert float(line.split("score ")[1].split()[0]) == pytest.approx(float(s), abs=2e-6)
