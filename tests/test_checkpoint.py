"""What lies on disk: params directories, training checkpoints and telling the kinds apart."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from inpformer_jax import checkpoint
from tests.conftest import REPO, subprocess_env


def test_params_dir_round_trip_and_kind(tmp_path):
  params = {"encoder": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "prototype_token": np.ones((4, 3), np.float32)}
  checkpoint.save_params(tmp_path / "p", params, {"kind": "inpformer", "arch": {"width": 3}})
  got, meta = checkpoint.load_params(tmp_path / "p")
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert meta == {"kind": "inpformer", "arch": {"width": 3}}
  assert checkpoint.kind_of(tmp_path / "p") == "params_dir"
  with pytest.raises(FileExistsError, match="choose an empty output directory"):
    checkpoint.save_params(tmp_path / "p", params, {})
  with pytest.raises(checkpoint.CheckpointError, match="not a converted params directory"):
    checkpoint.load_params(tmp_path)


def test_kind_of_and_the_one_line_explanation(tmp_path):
  (tmp_path / "run" / "ckpt").mkdir(parents=True)
  (tmp_path / "model.pth").write_bytes(b"x")
  (tmp_path / "notes.txt").write_text("x")
  assert checkpoint.kind_of(tmp_path / "run") == "workdir"
  assert checkpoint.kind_of(tmp_path / "model.pth") == "torch_file"
  assert checkpoint.kind_of(tmp_path / "notes.txt") == "none"
  assert checkpoint.kind_of(tmp_path / "absent") == "none"
  assert "does not exist" in checkpoint.explain_unusable(tmp_path / "absent", "--checkpoint")
  # a single-class run keeps one workdir per class: the message points at one of them
  (tmp_path / "single" / "mvtec" / "bottle").mkdir(parents=True)
  (tmp_path / "single" / "mvtec" / "bottle" / checkpoint.CONFIG_FILE).write_text("{}")
  msg = checkpoint.explain_unusable(tmp_path / "single", "--checkpoint")
  assert "neither a training workdir" in msg and "single/mvtec/bottle" in msg
  assert checkpoint.calibration_path(tmp_path / "run") == tmp_path / "run" / "calibration.json"
  assert checkpoint.calibration_path(tmp_path / "model.pth").name == "model.pth.calibration.json"


def test_damaged_latest_checkpoint_falls_back(tmp_path):
  state = {"w": np.arange(4, dtype=np.float32), "step": np.int32(0)}
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  for step in (1, 2):
    ck.save(step, {"w": state["w"] + step, "step": np.int32(step)})
  ck.close()
  for f in (tmp_path / "ckpt" / "2").rglob("*"):
    if f.is_file() and f.parent.name != "ckpt":
      f.write_bytes(b"garbage")
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  messages = []
  # A reader skips the damaged step and leaves the directory as it is ...
  restored, step = ck.restore(abstract, log=messages.append)
  assert step == 1 and ck.all_steps() == [1, 2]
  # ... the run that owns it moves the damaged step aside.
  restored, step = ck.restore(abstract, log=messages.append, set_aside=True)
  assert ck.all_steps() == [1]
  ck.close()
  assert step == 1 and np.array_equal(restored["w"], np.arange(4) + 1)
  assert len(messages) == 2 and all("does not read back" in m and "/ckpt/2" in m
                                    for m in messages)
  assert "moved to" in messages[1] and "moved to" not in messages[0]
  # The damaged step is moved aside, so the resumed run can write step 2 again.
  assert (tmp_path / "ckpt" / "2.damaged").is_dir()
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  assert ck.all_steps() == [1] and ck.save(2, {"w": state["w"] + 2, "step": np.int32(2)})
  ck.close()
  # Without a target the state comes back as saved.
  ck = checkpoint.TrainCheckpointer(tmp_path)
  restored, step = ck.restore()
  ck.close()
  assert step == 2 and np.array_equal(np.asarray(restored["w"]), np.arange(4) + 2)


def test_a_checkpoint_of_another_topology_restores_as_saved(tmp_path, compilation_cache):
  """Saved sharded over 4 devices (a subprocess), read back here on one device."""
  code = f"""
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from inpformer_jax import checkpoint
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
w = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), NamedSharding(mesh, P("data")))
ck = checkpoint.TrainCheckpointer({str(tmp_path)!r}, save_interval_steps=1)
ck.save(1, {{"params": {{"w": w}}, "step": np.int32(1)}})
ck.close()
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=subprocess_env(compilation_cache, devices=4))
  assert r.returncode == 0, r.stderr[-3000:]
  ck = checkpoint.TrainCheckpointer(tmp_path)
  state, step = ck.restore(log=pytest.fail)
  ck.close()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(16).reshape(4, 4))
