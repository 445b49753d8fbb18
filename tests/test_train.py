"""The engine under `runlocal`: every setting trains and evaluates, resume after kill -9 equals
an uninterrupted run, the feature cache is exact, reports are written, bad configs are clear.

Steps are traced once per process and compiled once per machine (a persistent compilation
cache in a temporary folder, shared with the subprocesses).
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import demo, mvtec, realiad, super_multi_class, visa  # noqa: E402
from inpformer_jax import checkpoint as ckpt_lib  # noqa: E402
from inpformer_jax import evaluate as eval_lib  # noqa: E402
from inpformer_jax import train  # noqa: E402

CLASSES = ("bottle", "cable")
SIZE = 40  # written image side; runlocal resizes to 32 and crops 28 (2 x 2 patches).
ROW_KEYS = ("loss", "reconstruction", "coherence", "grad_norm", "lr")


# ---------------------------------------------------------------------------------------
# Tiny datasets in the three layouts.
# ---------------------------------------------------------------------------------------


def _image(rng, base):
  return np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _defect(rng, base):
  x = _image(rng, base)
  m = np.zeros((SIZE, SIZE), np.uint8)
  r, c = rng.integers(4, SIZE - 16, 2)
  m[r:r + 12, c:c + 12] = 255
  x[m > 0] = 255 - x[m > 0]
  return x, m


def make_mvtec_like(root, *, defect="crack", mask_suffix="_mask", ext=".png", n_train=4,
                    seed=0):
  rng = np.random.default_rng(seed)
  for c in CLASSES:
    base = rng.integers(40, 215, 3)
    for sub, n in (("train/good", n_train), ("test/good", 2)):
      os.makedirs(f"{root}/{c}/{sub}", exist_ok=True)
      for i in range(n):
        Image.fromarray(_image(rng, base)).save(f"{root}/{c}/{sub}/{i:03d}{ext}")
    os.makedirs(f"{root}/{c}/test/{defect}", exist_ok=True)
    os.makedirs(f"{root}/{c}/ground_truth/{defect}", exist_ok=True)
    for i in range(2):
      x, m = _defect(rng, base)
      Image.fromarray(x).save(f"{root}/{c}/test/{defect}/{i:03d}{ext}")
      Image.fromarray(m).save(f"{root}/{c}/ground_truth/{defect}/{i:03d}{mask_suffix}.png")
  return str(root)


def make_realiad_like(root, seed=2):
  rng = np.random.default_rng(seed)
  os.makedirs(f"{root}/realiad_jsons/realiad_jsons", exist_ok=True)
  for c in CLASSES:
    base = rng.integers(40, 215, 3)
    spec = {"train": [], "test": []}
    for split, n in (("train", 4), ("test", 2)):
      for i in range(n):
        rel = f"OK/S{split[:2]}{i:02d}/{c}_{i:04d}_OK_C1_0.jpg"
        os.makedirs(os.path.dirname(f"{root}/realiad_1024/{c}/{rel}"), exist_ok=True)
        Image.fromarray(_image(rng, base)).save(f"{root}/realiad_1024/{c}/{rel}")
        spec[split].append({"category": c, "anomaly_class": "OK", "image_path": rel,
                            "mask_path": None})
    for i in range(2):
      rel = f"NG/QS/S9{i:02d}/{c}_{i:04d}_NG_QS_C1_0"
      os.makedirs(os.path.dirname(f"{root}/realiad_1024/{c}/{rel}"), exist_ok=True)
      x, m = _defect(rng, base)
      Image.fromarray(x).save(f"{root}/realiad_1024/{c}/{rel}.jpg")
      Image.fromarray(m).save(f"{root}/realiad_1024/{c}/{rel}.png")
      spec["test"].append({"category": c, "anomaly_class": "QS", "image_path": rel + ".jpg",
                           "mask_path": rel + ".png"})
    with open(f"{root}/realiad_jsons/realiad_jsons/{c}.json", "w") as f:
      json.dump(spec, f)
  return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  base = tmp_path_factory.mktemp("data")
  return {"mvtec": make_mvtec_like(base / "mvtec"),
          "visa": make_mvtec_like(base / "visa", defect="bad", mask_suffix="", ext=".JPG", seed=1),
          "realiad": make_realiad_like(base / "realiad")}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for this module and its subprocesses."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes", "jax_disable_most_optimizations")
  old = {n: jax.config.values[n] for n in names}
  jax.config.update(names[0], path)
  jax.config.update(names[1], 0)
  jax.config.update(names[2], -1)
  jax.config.update(names[3], True)  # tiny models: compile time is all that counts
  yield path
  for n, v in old.items():
    jax.config.update(n, v)


def local_config(get_config, arg, data, **over):
  """A runlocal config pointed at the tiny datasets (only the two classes written)."""
  c = get_config(",".join(filter(None, ["runlocal=True", arg])))
  for name, root in data.items():
    c.data.roots[name] = root
    c.data.categories[name] = ",".join(CLASSES)
  for key, value in over.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def rows_of(workdir):
  return train.read_metrics(workdir)


def assert_same_rows(a, b, tol=1e-6, keys=ROW_KEYS):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for k in keys:
      assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


# ---------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [mvtec, visa, realiad, super_multi_class, demo])
def test_config_docstring_starts_with_its_command(module):
  first = module.__doc__.strip().splitlines()[0:3]
  assert any(l.strip().startswith("python -m inpformer_jax.main --config configs/") for l in first)
  assert module.get_config() is not None


def test_defaults_are_the_official_recipe():
  c = mvtec.get_config()
  assert c.model.encoder == "dinov2reg_vit_base_14" and c.model.num_inps == 6
  assert (c.data.resize, c.data.crop, c.model.image_size) == (448, 392, 392)
  assert (c.train.batch_size, c.train.epochs, c.seed) == (16, 200, 1)
  assert (c.optim.lr, c.optim.final_lr, c.optim.warmup_steps, c.optim.clip_norm,
          c.optim.weight_decay) == (1e-3, 1e-4, 100, 0.1, 1e-4)
  assert c.setting == "multi_class" and c.eval.protocol == "official"
  assert mvtec.get_config("setting=few_shot,shots=2").few_shot.shots == 2
  assert visa.get_config("setting=zero_shot,source=mvtec").eval.map == "inp_distance"
  assert super_multi_class.get_config().data.train == "mvtec,visa,realiad"


def test_bad_config_arguments_are_clear():
  with pytest.raises(ValueError, match="unknown config argument 'shot'"):
    mvtec.get_config("shot=4")
  with pytest.raises(ValueError, match="setting='few'"):
    mvtec.get_config("setting=few")
  with pytest.raises(ValueError, match="shots=3"):
    mvtec.get_config("setting=few_shot,shots=3")
  with pytest.raises(ValueError, match="source='mvtec'"):
    mvtec.get_config("setting=zero_shot,source=mvtec")


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "inpformer_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=env)


def test_cli_rejects_unknown_keys_and_missing_roots(tmp_path):
  typo = _cli("--config", "configs/mvtec.py:runlocal=True", "--workdir", str(tmp_path),
              "--config.train.batchsize=3")
  assert typo.returncode != 0 and "batchsize" in typo.stderr
  missing = _cli("--config", "configs/mvtec.py:runlocal=True", "--workdir", str(tmp_path),
                 f"--config.data.roots.mvtec={tmp_path}/nowhere")
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert "error: dataset root for 'mvtec' not found" in missing.stderr
  assert "--config.data.roots.mvtec=" in missing.stderr and "Traceback" not in missing.stderr


def test_missing_data_root_names_the_flag(tmp_path):
  c = mvtec.get_config("runlocal=True")
  c.data.roots.mvtec = str(tmp_path / "nowhere")
  with pytest.raises(train.ConfigError, match=r"--config.data.roots.mvtec=/path"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  z = mvtec.get_config("setting=zero_shot,runlocal=True")
  with pytest.raises(train.ConfigError, match="init_from"):
    train.train_and_evaluate(z, str(tmp_path / "wd"))


# ---------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_class_run(data, tmp_path_factory):
  """Two steps of the multi-class runlocal config, evaluated."""
  workdir = tmp_path_factory.mktemp("multi_class")
  report = train.train_and_evaluate(local_config(mvtec.get_config, "", data), str(workdir))
  return workdir, report


def test_multi_class_two_steps_writes_reports(multi_class_run):
  workdir, report = multi_class_run
  rows = rows_of(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r[k]) for r in rows for k in ROW_KEYS + ("images_per_sec",))
  assert rows[0]["lr"] == 0.0  # the official first iteration runs with lr 0
  assert sorted(p.name for p in (workdir / "ckpt").iterdir() if p.name.isdigit()) == ["2"]
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["info"]["step"] == 2 and on_disk["info"]["encoder_weights"] == "random"
  classes = on_disk["datasets"]["mvtec"]["classes"]
  assert sorted(classes) == list(CLASSES)
  for m in [*classes.values(), on_disk["datasets"]["mvtec"]["mean"]]:
    assert set(m) == set(eval_lib.METRIC_NAMES)
    assert all(0.0 <= v <= 1.0 for v in m.values())
  md = (workdir / "results.md").read_text()
  assert "| **Mean** |" in md and "| bottle |" in md and "I-AUROC" in md
  with open(workdir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["category"] for r in table] == ["bottle", "cable", "Mean"]
  assert float(table[0]["AUPRO"]) == pytest.approx(classes["bottle"]["AUPRO"], abs=1e-6)
  assert report["datasets"]["mvtec"]["mean"] == on_disk["datasets"]["mvtec"]["mean"]
  # the same rows as TensorBoard event files
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0


def test_eval_mode_restores_the_checkpoint(multi_class_run, data):
  workdir, report = multi_class_run
  again = train.train_and_evaluate(local_config(mvtec.get_config, "", data), str(workdir),
                                   mode="eval")
  for c in CLASSES:
    a = again["datasets"]["mvtec"]["classes"][c]
    b = report["datasets"]["mvtec"]["classes"][c]
    assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("get_config,arg", [
    (mvtec.get_config, "setting=single_class"),
    (visa.get_config, "setting=few_shot,shots=1"),
    (realiad.get_config, ""),
    (super_multi_class.get_config, ""),
])
def test_setting_trains_two_steps_and_evaluates(get_config, arg, data, tmp_path):
  c = local_config(get_config, arg, data)
  report = train.train_and_evaluate(c, str(tmp_path))
  datasets = c.data.test.split(",")
  assert sorted(report["datasets"]) == sorted(datasets)
  for d in datasets:
    assert sorted(report["datasets"][d]["classes"]) == list(CLASSES)
  if "single_class" in arg:  # one model per class, in its own folder
    for cls in CLASSES:
      assert [r["step"] for r in rows_of(tmp_path / "mvtec" / cls)] == [1, 2]
  else:
    assert [r["step"] for r in rows_of(tmp_path)] == [1, 2]
  if "few_shot" in arg:
    assert report["info"]["train_images"] == len(CLASSES) * 1 * 22


def test_zero_shot_scores_the_target_with_the_source_model(multi_class_run, data, tmp_path):
  source, _ = multi_class_run
  c = local_config(visa.get_config, "setting=zero_shot,source=mvtec", data,
                   init_from=str(source))
  report = train.train_and_evaluate(c, str(tmp_path))
  assert report["info"]["map"] == "inp_distance" and report["info"]["step"] == 2
  assert sorted(report["datasets"]["visa"]["classes"]) == list(CLASSES)
  assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


# ---------------------------------------------------------------------------------------
# Feature cache, non-finite loss, damaged checkpoints.
# ---------------------------------------------------------------------------------------


def test_feature_cache_gives_the_same_losses(data, tmp_path):
  over = {"train.checkpoint_every_steps": 100}
  runs = {}
  for name, extra in (("off", {}), ("device", {"train.cache_features": True}),
                      ("disk", {"train.cache_features": True, "train.cache_device_bytes": 0})):
    c = local_config(mvtec.get_config, "", data, **over, **extra)
    train.train_and_evaluate(c, str(tmp_path / name), mode="train")
    runs[name] = rows_of(tmp_path / name)
  assert len(runs["off"]) == 2
  for cached in (runs["device"], runs["disk"]):
    assert_same_rows(runs["off"], cached, keys=("loss", "reconstruction", "coherence", "lr"))
    # float32 sums over differently fused programs: ~1e-7 relative per value.
    assert_same_rows(runs["off"], cached, keys=("grad_norm",), tol=1e-5)
  assert (tmp_path / "disk" / "feature_cache" / "fused.npy").is_file()


def test_non_finite_loss_stops_the_run(data, tmp_path):
  c = local_config(mvtec.get_config, "", data)
  r = train.get_recipe(c, c.train.total_steps)
  bad = {"prototype_token": np.full_like(np.asarray(r.trainable["prototype_token"]), np.nan)}
  ckpt_lib.save_params(tmp_path / "nan_params", bad, {"kind": "test"})
  c.init_from = str(tmp_path / "nan_params")
  with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not [p for p in (tmp_path / "wd" / "ckpt").iterdir() if p.name.isdigit()]


def test_init_from_a_converted_params_dir(data, tmp_path):
  c = local_config(mvtec.get_config, "", data)
  r = train.get_recipe(c, c.train.total_steps)
  params = jax.tree.map(lambda x: np.asarray(x) + 1.0, train.merge(r.encoder, r.trainable))
  params["encoder"]["unused_block"] = {"kernel": np.zeros(3, np.float32)}  # dropped
  ckpt_lib.save_params(tmp_path / "inp", params, {"kind": "inpformer"})
  enc, tr, entries = train._init_from_params_dir(str(tmp_path / "inp"), r.encoder, r.trainable)
  assert "encoder" in entries and "unused_block" not in enc
  np.testing.assert_array_equal(tr["prototype_token"], params["prototype_token"])
  ckpt_lib.save_params(tmp_path / "enc", params["encoder"], {"kind": "dinov2"})
  with pytest.raises(train.ConfigError, match="encoder_weights="):
    train._init_from_params_dir(str(tmp_path / "enc"), r.encoder, r.trainable)
  bad = {"prototype_token": np.zeros((1, 1), np.float32)}
  ckpt_lib.save_params(tmp_path / "bad", bad, {"kind": "inpformer"})
  with pytest.raises(train.ConfigError, match="prototype_token: shape"):
    train._init_from_params_dir(str(tmp_path / "bad"), r.encoder, r.trainable)


def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys):
  state = {"w": np.arange(4, dtype=np.float32), "step": np.int32(0)}
  ck = ckpt_lib.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  for step in (1, 2):
    ck.save(step, {"w": state["w"] + step, "step": np.int32(step)})
  ck.close()
  for f in (tmp_path / "ckpt" / "2").rglob("*"):
    if f.is_file() and f.parent.name != "ckpt":
      f.write_bytes(b"garbage")
  ck = ckpt_lib.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  messages = []
  restored, step = ck.restore(abstract, log=messages.append)
  assert ck.all_steps() == [1]
  ck.close()
  assert step == 1 and np.array_equal(restored["w"], np.arange(4) + 1)
  assert len(messages) == 1 and "damaged" in messages[0] and "/ckpt/2" in messages[0]
  # The damaged step is moved aside, so the resumed run can write step 2 again.
  assert (tmp_path / "ckpt" / "2.damaged").is_dir()
  ck = ckpt_lib.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  assert ck.all_steps() == [1] and ck.save(2, {"w": state["w"] + 2, "step": np.int32(2)})
  ck.close()


# ---------------------------------------------------------------------------------------
# Resume after kill -9 (subprocesses through the CLI).
# ---------------------------------------------------------------------------------------


def test_resume_after_kill_equals_uninterrupted_run(data, tmp_path, compile_cache, capsys):
  # Every test shares the runlocal recipe (2 steps), so nothing is traced or compiled twice.
  over = {"train.checkpoint_every_steps": 1, "train.log_every_steps": 1}
  train.train_and_evaluate(local_config(mvtec.get_config, "", data, **over),
                           str(tmp_path / "straight"), mode="train")
  # The CLI in a subprocess, killed with SIGKILL after step 2's metrics row and before its
  # checkpoint (step 1's exists) ...
  cmd = [sys.executable, "-m", "inpformer_jax.main",
         "--config", f"{REPO}/configs/mvtec.py:runlocal=True", "--mode", "train",
         "--workdir", str(tmp_path / "killed"),
         f"--config.data.roots.mvtec={data['mvtec']}",
         f"--config.data.categories.mvtec={','.join(CLASSES)}",
         *[f"--config.{k}={v}" for k, v in over.items()]]
  # (the same XLA flags as this process: main.py would otherwise set the project's CPU flags)
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
             JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             **{train._KILL_ENV: "2"})
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  assert [r["step"] for r in rows_of(tmp_path / "killed")] == [1, 2]
  steps = sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir() if p.name.isdigit())
  assert steps == ["1"]
  # ... then the same run started again (here in-process) resumes from step 1.
  train.train_and_evaluate(local_config(mvtec.get_config, "", data, **over),
                           str(tmp_path / "killed"), mode="train")
  assert "at step 1" in capsys.readouterr().out
  assert_same_rows(rows_of(tmp_path / "straight"), rows_of(tmp_path / "killed"))
