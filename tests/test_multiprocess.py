"""Multi-host training through jax.distributed, on one machine: two processes x 4 CPU devices
(gloo collectives, coordinator on 127.0.0.1) run the demo runlocal config through the CLI, from
the image files and from prepared records, and must write the same train_metrics.jsonl and
results as one process, one checkpoint, and an evaluation that counts every test image once
(padding included: 2 x 8 rows per batch) with the same report gallery. The records run is
preempted: SIGTERM to one process only, both save the same step through JAX's preemption sync
point and exit 0, and the command run again finishes with the uninterrupted run's parameters.
"""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from inpformer_jax import reports
from inpformer_jax import train
from inpformer_jax.data import demo as demo_data
from inpformer_jax.data import prepare
from inpformer_jax.data import readers
from tests.conftest import REPO, jax_options, subprocess_env
from tests.runlocal import final_params, update_vector

CLASSES = ("brick", "grass")
# The global batches divide over 8 devices; eval 16 rows per batch leaves padding rows.
# Warm-up 0: all five steps learn. float64 compute: in float32 the first Adam steps turn
# rounding noise in gradients that are ~0 into +-lr moves, and 1 vs 2 processes drift apart
# by 2% in the loss by step 3 (measured); in float64 that noise is 1e-16 and harmless.
# With the feature cache, two cache shards (feature_cache) give one process and two the
# same global batches.
OVER = {"train.batch_size": 8, "eval.batch_size": 16,
        "train.log_every_steps": 1, "optim.warmup_steps": 0,
        "model.dtype": "float64", "eval.gallery_size": 2, "train.cache_shards": 2,
        "data.categories.demo": ",".join(CLASSES)}
ROW_KEYS = ("loss", "reconstruction", "coherence", "grad_norm", "lr")
# The pipeline's per-process slices from the files, evaluated; the sharded feature cache from
# the records, trained only (8 steps, so that the SIGTERM after step 2 lands before the end).
VARIANTS = {"files": dict(source="files", cache=False, mode="train_and_eval", steps=5),
            "records_preempted": dict(source="array_record", cache=True, mode="train", steps=8)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo_data"))
  demo_data.make_demo_dataset(root, seed=0, classes=CLASSES, n_train=8, n_good=3,
                              n_per_defect=2)
  return root


@pytest.fixture(scope="module")
def records(data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tfds"))
  prepare.main(["--dataset", "demo", "--manual_dir", data, "--data_dir", out, "--resize", "32",
                "--categories", ",".join(CLASSES)])
  return out


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
  """A variant's run in this process, one device -> (workdir, initial params)."""
  runs = {}

  def run(variant: str):
    v = VARIANTS[variant]
    if variant not in runs:
      workdir = tmp_path_factory.mktemp("one")
      config = demo_config.get_config("runlocal=True")
      with config.unlocked():
        config.data.roots.demo = data
        config.train.cache_features = v["cache"]
      for k, value in dict(OVER, **_steps(v)).items():
        *parents, leaf = k.split(".")
        node = config
        for p in parents:
          node = node[p]
        node[leaf] = value
      with jax_options(jax_disable_most_optimizations=True, jax_enable_x64=True):
        recipes = train.Recipes()
        train.train_and_evaluate(config, str(workdir), v["mode"], recipes=recipes)
        runs[variant] = (workdir, jax.device_get(recipes.get(config, v["steps"]).trainable))
    return runs[variant]

  return run


def _steps(v) -> dict:
  return {"train.total_steps": v["steps"], "train.checkpoint_every_steps": v["steps"]}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(cmd, env) -> list[subprocess.Popen]:
  return [subprocess.Popen(cmd, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(procs) -> list[str]:
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _sigterm_one_after_step(procs, workdir, step: int) -> None:
  """SIGTERM to process 1 only, once process 0 has logged `step`."""
  deadline = time.time() + 300
  while not any(r["step"] >= step for r in _rows(workdir)):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no step logged"
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)


def _rows(workdir):
  try:
    return reports.read_metrics(workdir)
  except (FileNotFoundError, ValueError):  # not written yet, or a row being written
    return []


@pytest.mark.slow  # two CLI processes + one in-process run: ~1.5 min each.
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_equal_one(data, records, one_process, variant, tmp_path,
                                 compilation_cache):
  v = VARIANTS[variant]
  env = subprocess_env(compilation_cache, devices=4,
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                       JAX_NUM_PROCESSES="2", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                       JAX_ENABLE_X64="1")
  where = ([f"--config.data.roots.demo={data}"] if v["source"] == "files" else
           ["--config.data.source=array_record", f"--config.data.tfds_dir={records}",
            "--config.data.roots.demo=/nonexistent"])
  two = tmp_path / "two"
  cmd = [sys.executable, "-m", "inpformer_jax.main",
         "--config", f"{REPO}/configs/demo.py:runlocal=True", "--mode", v["mode"],
         "--workdir", str(two), "--verbosity=0", *where,
         f"--config.train.cache_features={v['cache']}",
         *[f"--config.{k}={x}" for k, x in dict(OVER, **_steps(v)).items()]]
  ckpt, total = two / "ckpt", v["steps"]
  if v["mode"] == "train":  # preempted, then run again
    procs = _launch(cmd, env)
    _sigterm_one_after_step(procs, two, 2)
    outs = _finish(procs)  # both exit 0 ...
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < total, (saved, outs[0][-3000:])
    for out in outs:  # ... having saved the same step
      assert f"preempted (SIGTERM): checkpoint of step {saved[0]} saved" in out, out[-3000:]
    outs = _finish(_launch(cmd, env))
    assert all(f"at step {saved[0]}" in out for out in outs)
    expected_ckpts = [str(saved[0]), str(total)]
  else:
    outs = _finish(_launch(cmd, env))
    assert "| **Mean** |" in outs[0] and "| **Mean** |" not in outs[1]  # process 0 reports
    expected_ckpts = [str(total)]
  one_dir, initial = one_process(variant)

  # Metrics rows: written once (process 0), equal to the one-process run.
  one, two_rows = reports.read_metrics(one_dir), reports.read_metrics(two)
  assert [r["step"] for r in two_rows] == list(range(1, total + 1))
  assert all(r["lr"] > 0 for r in one)
  for a, b in zip(one, two_rows):
    for k in ROW_KEYS:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=0,
                                 err_msg=f"{k} at step {a['step']}")

  # The same update of the parameters, after all real steps.
  update = update_vector(initial, final_params(one_dir))
  other = update_vector(initial, final_params(two))
  assert np.abs(update).max() > 1e-3
  rel = np.linalg.norm(other - update) / np.linalg.norm(update)
  assert rel < 1e-6, rel

  # Checkpoints written by orbax's multi-process protocol (both processes' data iterator
  # states in it).
  assert sorted((p.name for p in ckpt.iterdir() if p.name.isdigit()), key=int) == expected_ckpts
  data_files = sorted(p.name for p in (ckpt / str(total) / "data").iterdir()
                      if p.name.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  if v["mode"] == "train":
    return

  # Evaluation: the same per-class metrics. Image metrics are exact functions of the image
  # scores (a padding row or a twice-counted image would change them); pixel metrics go
  # through the 200-bin histograms, whose edges move with float noise of 1e-7 in the maps.
  r1 = json.loads((one_dir / "results.json").read_text())["datasets"]["demo"]
  r2 = json.loads((two / "results.json").read_text())["datasets"]["demo"]
  assert set(r1["classes"]) == set(r2["classes"]) == set(CLASSES)
  for c in CLASSES:
    for k, value in r1["classes"][c].items():
      tol = 1e-6 if k.startswith("I-") else 1e-5
      assert r2["classes"][c][k] == pytest.approx(value, abs=tol), (c, k)
  n_test = len(readers.read_dataset("demo", data, list(CLASSES), "test"))
  # Each process evaluated its own rows; together every test image once.
  seen = [int(n) for o in outs
          for n in re.findall(r"process \d/2 evaluated (\d+) of \d+ test images", o)]
  assert len(seen) == 2 and sum(seen) == n_test and min(seen) > 0, seen
  assert n_test % 16, "the test set should not fill whole batches (padding is tested)"
  # report.html's gallery: each process kept images of its own rows; merged, they are the
  # one-process gallery (the same images, scores and labels in every section).
  caption = re.compile(r"<h4>.*?</h4>|<figcaption>.*?</figcaption>")
  one_page = caption.findall((one_dir / "report.html").read_text())
  assert len(one_page) > 4 * len(CLASSES)
  assert caption.findall((two / "report.html").read_text()) == one_page
