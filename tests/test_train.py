"""The engine under `runlocal`: every setting trains and evaluates, a run killed with kill -9
from outside resumes to the uninterrupted run's parameters, reports are written, the trainer
stops on a non-finite loss.

Steps are traced once per module (one `train.Recipes` shared by the tests) and compiled once
per machine (a persistent compilation cache in a temporary folder, shared with the
subprocesses).
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import mvtec, realiad, super_multi_class, visa
from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax import guards
from inpformer_jax import loading
from inpformer_jax import metrics
from inpformer_jax import reports
from inpformer_jax import settings
from inpformer_jax import train
from inpformer_jax import visuals
from tests import browser
from tests.conftest import REPO
from tests.conftest import subprocess_env
from tests.runlocal import (CLASSES, ROW_KEYS, assert_same_rows, cli_flags,  # noqa: F401
                            fast_compile_module, final_params, local_config, make_all,
                            make_mvtec_like, max_abs_diff)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return make_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def recipes():
  return train.Recipes()


# ---------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_class_run(data, recipes, tmp_path_factory):
  """Two steps of the multi-class runlocal config, evaluated on MVTec and on 'mine': a user's
  folder of one class without masks (config.data.roots.mine, config.data.masks.mine=False)."""
  workdir = tmp_path_factory.mktemp("multi_class")
  mine = make_mvtec_like(tmp_path_factory.mktemp("mine"), seed=3, classes=("bottle",))
  shutil.rmtree(os.path.join(mine, "bottle", "ground_truth"))
  config = local_config(mvtec.get_config, "", data, **{
      "data.roots.mine": mine, "data.masks.mine": False, "data.test": "mvtec,mine"})
  report = train.train_and_evaluate(config, str(workdir), recipes=recipes)
  return workdir, report


def test_multi_class_two_steps_writes_reports(multi_class_run):
  workdir, report = multi_class_run
  rows = reports.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r[k]) for r in rows for k in ROW_KEYS + ("images_per_sec",))
  assert rows[0]["lr"] == 0.0  # the official first iteration runs with lr 0
  assert sorted(p.name for p in (workdir / "ckpt").iterdir() if p.name.isdigit()) == ["2"]
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["info"]["step"] == 2 and on_disk["info"]["encoder_weights"] == "random"
  classes = on_disk["datasets"]["mvtec"]["classes"]
  assert sorted(classes) == list(CLASSES)
  for m in [*classes.values(), on_disk["datasets"]["mvtec"]["mean"]]:
    assert set(m) == set(metrics.METRIC_NAMES)
    assert all(0.0 <= v <= 1.0 for v in m.values())
  md = (workdir / "results.md").read_text()
  assert "| **Mean** |" in md and "| bottle |" in md and "I-AUROC" in md
  with open(workdir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["dataset"], r["category"]) for r in table] == [
      ("mvtec", "bottle"), ("mvtec", "cable"), ("mvtec", "Mean"), ("mine", "bottle"),
      ("mine", "Mean")]
  # 'mine' (no masks): headed by its name, image metrics, pixel metrics absent and why.
  mine = on_disk["datasets"]["mine"]
  assert list(mine["classes"]) == ["bottle"]
  for m in (mine["classes"]["bottle"], mine["mean"]):
    assert all(0.0 <= m[n] <= 1.0 for n in metrics.IMAGE_METRICS)
    assert all(m[n] is None for n in metrics.PIXEL_METRICS)
  assert all(table[3][n] == "" for n in metrics.PIXEL_METRICS) and table[3]["I-AUROC"]
  assert on_disk["notes"] == [
      "pixel metrics: no masks for mine (all classes): its test set has no ground_truth/ "
      "(config.data.masks.mine=False), so only image metrics are reported and the pixel ones "
      "are null"]
  assert f"Note: {on_disk['notes'][0]}" in md and "## mine" in md
  assert re.search(r"\| bottle( \| [\d.]+){3}( \| -){4} \|", md.split("## mine")[1]), md
  assert float(table[0]["AUPRO"]) == pytest.approx(classes["bottle"]["AUPRO"], abs=1e-6)
  assert report["datasets"]["mvtec"]["mean"] == on_disk["datasets"]["mvtec"]["mean"]
  # the same rows as TensorBoard event files
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  # the random encoder is kept beside the checkpoints, so the workdir can be reloaded
  assert checkpoint.kind_of(workdir / loading.ENCODER_SUBDIR) == "params_dir"


def test_report_page_renders_in_chromium(multi_class_run):
  """report.html as a browser shows it: the seven metrics' table, every class's curves and
  gallery, every picture decoded; the mask-less class's panels have no ground-truth tile."""
  workdir, _ = multi_class_run
  page = browser.render(workdir / "report.html")
  assert set(metrics.METRIC_NAMES) <= set(page["headers"])
  for title in ("mvtec / bottle", "mvtec / cable", "mine / bottle", "Most anomalous",
                "Least anomalous", "F1-optimal image threshold", "Colour scale"):
    assert title in page["text"], title
  images = page["images"]
  assert images and all(i["loaded"] for i in images), [i for i in images if not i["loaded"]]
  # Per class ROC, PR (image level; pixel level too where masks exist) and the histogram
  # with the threshold, each drawn with a visible width.
  charts = {c["label"]: c for c in page["charts"]}
  for name, levels in (("mvtec/bottle", 2), ("mvtec/cable", 2), ("mine/bottle", 1)):
    assert charts[f"{name} ROC"]["series"] == charts[f"{name} PR"]["series"] == levels, name
    assert charts[f"{name} scores"]["bars"] > 0 and charts[f"{name} scores"]["threshold"] == 1
  assert len(charts) == 9 and all(c["width"] > 100 for c in charts.values())
  widths = {}
  for i in images:
    if i["src"].endswith(".jpg"):
      widths.setdefault(i["src"].split("/")[1], set()).add(i["width"])
  tile = visuals.TILE
  # input | ground truth | map (with masks); input | map (without), 4 px between tiles.
  assert widths == {"mvtec": {3 * tile + 8}, "mine": {2 * tile + 4}}, widths


def test_eval_mode_restores_the_checkpoint(multi_class_run, data, recipes):
  """... and a calibration.json beside it decides the page's mistakes and colour scale."""
  workdir, report = multi_class_run
  cal = workdir / checkpoint.CALIBRATION_FILE
  cal.write_text(json.dumps({"method": "normal_fpr", "image": {"threshold": 0.0},
                             "pixel": {"threshold": 1.0, "min": 0.0, "max": 2.0}}))
  try:
    again = train.train_and_evaluate(local_config(mvtec.get_config, "", data), str(workdir),
                                     mode="eval", recipes=recipes)
    page = (workdir / "report.html").read_text()
  finally:
    cal.unlink()
  for c in CLASSES:
    a = again["datasets"]["mvtec"]["classes"][c]
    b = report["datasets"]["mvtec"]["classes"][c]
    assert a == pytest.approx(b, abs=1e-6)
  # Threshold 0: every normal test image is a false positive, no defect is missed.
  for section in page.split('<section class="cls"')[1:]:
    assert "Calibrated image threshold 0 (" in section
    assert "Colour scale (calibration.json&#x27;s pixel range): 0 " in section
    fp = section.split("<h4>False positives")[1].split("<h4>")[0]
    misses = section.split("<h4>Misses")[1].split("<h4>")[0]
    assert fp.count("<figure>") == 2 and fp.count(">normal<") == 2, fp
    assert "<figure>" not in misses


@pytest.mark.parametrize("get_config,arg", [
    (mvtec.get_config, "setting=single_class"),
    (visa.get_config, "setting=few_shot,shots=1"),
    (realiad.get_config, ""),
    (super_multi_class.get_config, ""),
])
def test_setting_trains_two_steps_and_evaluates(get_config, arg, data, recipes, tmp_path):
  c = local_config(get_config, arg, data)
  report = train.train_and_evaluate(c, str(tmp_path), recipes=recipes)
  datasets = c.data.test.split(",")
  assert sorted(report["datasets"]) == sorted(datasets)
  for d in datasets:
    assert sorted(report["datasets"][d]["classes"]) == list(CLASSES)
  if "single_class" in arg:  # one model per class, in its own folder
    for cls in CLASSES:
      assert [r["step"] for r in reports.read_metrics(tmp_path / "mvtec" / cls)] == [1, 2]
  else:
    assert [r["step"] for r in reports.read_metrics(tmp_path)] == [1, 2]
  if "few_shot" in arg:
    assert report["info"]["train_images"] == len(CLASSES) * 1 * 22


def test_zero_shot_scores_the_target_with_the_source_model(multi_class_run, data, recipes,
                                                           tmp_path):
  source, _ = multi_class_run
  # Given as fields (--config.setting=zero_shot --config.data.train=mvtec): the same config
  # as configs/visa.py:setting=zero_shot,source=mvtec, and its map resolved by the setting.
  c = local_config(visa.get_config, "", data, setting="zero_shot", init_from=str(source),
                   **{"data.train": "mvtec"})
  assert c.to_dict() == local_config(visa.get_config, "setting=zero_shot,source=mvtec", data,
                                     init_from=str(source)).to_dict()
  report = train.train_and_evaluate(c, str(tmp_path), recipes=recipes)
  assert report["info"]["map"] == "inp_distance" and report["info"]["step"] == 2
  assert sorted(report["datasets"]["visa"]["classes"]) == list(CLASSES)
  assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_missing_data_root_and_zero_shot_source_are_config_errors(data, recipes, tmp_path):
  c = mvtec.get_config("runlocal=True")
  c.data.roots.mvtec = str(tmp_path / "nowhere")
  with pytest.raises(settings.ConfigError, match=r"--config.data.roots.mvtec=/path"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  z = mvtec.get_config("setting=zero_shot,runlocal=True")
  with pytest.raises(settings.ConfigError, match="init_from"):
    train.train_and_evaluate(z, str(tmp_path / "wd"))
  with pytest.raises(settings.ConfigError, match="--mode=eval: .* has no checkpoint"):
    train.train_and_evaluate(local_config(mvtec.get_config, "", data), str(tmp_path / "empty"),
                             mode="eval", recipes=recipes)


def test_non_finite_loss_stops_the_run(data, recipes, tmp_path):
  c = local_config(mvtec.get_config, "", data)
  r = recipes.get(c, c.train.total_steps)
  bad = {"prototype_token": np.full_like(np.asarray(r.trainable["prototype_token"]), np.nan)}
  checkpoint.save_params(tmp_path / "nan_params", bad, {"kind": "test"})
  c.init_from = str(tmp_path / "nan_params")
  with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
    train.train_and_evaluate(c, str(tmp_path / "wd"), recipes=recipes)
  assert not [p for p in (tmp_path / "wd" / "ckpt").iterdir() if p.name.isdigit()]


def test_recipes_reuse_compiled_steps_only_for_the_same_config(data, recipes):
  c = local_config(mvtec.get_config, "", data)
  first = recipes.get(c, 5)
  assert recipes.get(c, 5) is first
  assert recipes.get(c, 6) is not first  # another schedule: another optimiser


# ---------------------------------------------------------------------------------------
# Resume after kill -9 (the CLI in a subprocess, killed from outside).
# ---------------------------------------------------------------------------------------

# Checkpoints at 3, 6, 9 and 10; every step learns (no warm-up) and is logged.
EVERY = 3
RESUME = {"train.total_steps": 10, "train.checkpoint_every_steps": EVERY,
          "train.log_every_steps": 1, "optim.warmup_steps": 0}


def _saved_steps(workdir) -> list[int]:
  """The finished (sealed) checkpoint steps."""
  ckpt = workdir / checkpoint.CKPT_SUBDIR
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()
                and (p / checkpoint.SEAL_FILE).is_file()) if ckpt.is_dir() else []


def _logged_steps(workdir) -> list[int]:
  """Steps of the whole rows of WORKDIR/train_metrics.jsonl (not a row the kill cut)."""
  path = workdir / reports.METRICS_FILE
  steps = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      steps.append(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError):
      break
  return steps


def _between_checkpoints(workdir) -> bool:
  """The run has logged a step past its newest finished checkpoint, and not a checkpoint
  step (whose checkpoint may be half written)."""
  saved, logged = _saved_steps(workdir), _logged_steps(workdir)
  return bool(saved and logged) and logged[-1] > saved[-1] and logged[-1] % EVERY != 0


def _process_state(pid: int) -> str:
  """'R', 'S', 'T' (stopped), 'Z', ... from /proc/PID/stat (Linux)."""
  return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _kill_between_checkpoints(proc, workdir) -> None:
  """kill -9 once the run is between checkpoints; it is stopped (SIGSTOP) while it is
  looked at, so that where it is seen is where it dies."""
  deadline = time.time() + 300
  while proc.poll() is None:
    assert time.time() < deadline, "the run never got past its first checkpoint"
    if _between_checkpoints(workdir):
      proc.send_signal(signal.SIGSTOP)
      while _process_state(proc.pid) not in "TZ":  # stopped (or already dead)
        time.sleep(0.001)
      if _between_checkpoints(workdir):
        proc.send_signal(signal.SIGKILL)
        return
      proc.send_signal(signal.SIGCONT)
    time.sleep(0.002)
  pytest.fail("the run finished before it was seen between two checkpoints")


@pytest.fixture(scope="module")
def straight(data, recipes, tmp_path_factory):
  """The uninterrupted RESUME run's workdir."""
  workdir = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(local_config(mvtec.get_config, "", data, **RESUME), str(workdir),
                           mode="train", recipes=recipes)
  return workdir


def _sigterm_once_a_step_past(workdir, step: int) -> threading.Thread:
  """Sends this process SIGTERM once the run resumed at `step` has logged a step after it
  (first the resumed run drops the rows the killed run logged after it)."""

  def watch():
    deadline, resumed = time.time() + 300, False
    while time.time() < deadline:
      logged = _logged_steps(workdir)
      resumed = resumed or not logged or logged[-1] <= step
      if resumed and logged and logged[-1] > step:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.001)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_resume_after_kill_and_sigterm_equals_uninterrupted_run(data, recipes, straight, tmp_path,
                                                                compilation_cache, capsys):
  killed = tmp_path / "killed"
  total = RESUME["train.total_steps"]
  # (the same XLA flags as this process, and its compilation cache)
  env = subprocess_env(compilation_cache, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "inpformer_jax.main", "--mode", "train", "--workdir", str(killed),
       *cli_flags(f"{REPO}/configs/mvtec.py", {"mvtec": data["mvtec"]}, **RESUME)],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _kill_between_checkpoints(proc, killed)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  # It died after step `killed_at`, which it had logged; the steps since `resume_at` are lost.
  killed_at, resume_at = _logged_steps(killed)[-1], _saved_steps(killed)[-1]
  assert EVERY <= resume_at < killed_at < total and killed_at % EVERY, (resume_at, killed_at)
  # The same run started again (here in-process) continues from its newest checkpoint; a
  # SIGTERM soon after saves the step it has reached (off the every-3 grid) and ends the run.
  watcher = _sigterm_once_a_step_past(killed, resume_at)
  assert train.train_and_evaluate(local_config(mvtec.get_config, "", data, **RESUME),
                                  str(killed), mode="train", recipes=recipes) is None
  watcher.join()
  out, err = capsys.readouterr()
  assert f"at step {resume_at}" in out
  preempted_at = _saved_steps(killed)[-1]
  assert resume_at < preempted_at < total and _logged_steps(killed)[-1] == preempted_at
  assert f"preempted (SIGTERM): checkpoint of step {preempted_at} saved" in err
  # Started once more, it finishes from the step the SIGTERM saved.
  train.train_and_evaluate(local_config(mvtec.get_config, "", data, **RESUME), str(killed),
                           mode="train", recipes=recipes)
  assert f"at step {preempted_at}" in capsys.readouterr().out
  (want, want_step), (got, got_step) = (loading.trained_state(w) for w in (straight, killed))
  assert int(want_step) == int(got_step) == int(got["step"]) == total
  # Every step learns (lr > 0), so equal final params need the params, the data position
  # and the optimiser state restored; the optimiser state is compared too, tensor by tensor.
  assert max_abs_diff(want["params"], got["params"]) <= 1e-6
  for a, b in zip(jax.tree.leaves(want["opt_state"]), jax.tree.leaves(got["opt_state"]),
                  strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=0, err_msg="opt_state")
  want_rows, rows = reports.read_metrics(straight), reports.read_metrics(killed)
  assert [r["step"] for r in rows] == list(range(1, total + 1))
  assert all(r["lr"] > 0 for r in rows)
  assert max(abs(a["loss"] - b["loss"]) for a, b in zip(want_rows, rows)) <= 1e-6
  assert_same_rows(want_rows, rows)
  initial = recipes.get(local_config(mvtec.get_config, "", data, **RESUME), total).trainable
  assert max_abs_diff(want["params"], initial) > 1e-3


def test_changed_settings_stop_a_resume_and_a_divergence_saves_nothing_bad(data, recipes, straight,
                                                                         tmp_path, capsys):
  """Resumed from the straight run's step 10 with an exploding learning rate: step 11's loss
  is still finite, so step 11 is saved with huge parameters; step 12's loss is not. Step 11
  is set aside and step 10 is named as the last good checkpoint."""
  workdir = tmp_path / "wd"
  shutil.copytree(straight, workdir)
  blown = local_config(mvtec.get_config, "", data, **dict(
      RESUME, **{"train.total_steps": 16, "train.checkpoint_every_steps": 1,
                 "optim.lr": 1e30}))
  with pytest.raises(errors.UserError, match="step 10 was made by other settings") as e:
    train.train_and_evaluate(blown, str(workdir), mode="train", recipes=recipes)
  assert "optim.lr: 0.001 -> 1e+30" in str(e.value), str(e.value)
  assert "train.total_steps: 10 -> 16" in str(e.value) and _saved_steps(workdir) == [9, 10]
  blown.train.allow_resume_changes = True
  with pytest.raises(guards.TrainingDiverged, match="non-finite loss at step 12") as e:
    train.train_and_evaluate(blown, str(workdir), mode="train", recipes=recipes)
  assert "The last good checkpoint is step 10" in str(e.value)
  assert "resuming step 10 with changed settings" in capsys.readouterr().err
  # max_to_keep=2 dropped step 9 when step 11 was saved
  assert _saved_steps(workdir) == [10] and (workdir / "ckpt" / "11.diverged").is_dir()
