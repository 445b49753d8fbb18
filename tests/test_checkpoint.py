"""What lies on disk: params directories, training checkpoints and telling the kinds apart."""

import subprocess
import sys

import grain
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


def _flip_one_byte(step_dir) -> str:
  """Flips one byte in the middle of the largest data file of a step (not its seal)."""
  f = max((f for f in step_dir.rglob("*") if f.is_file() and f.name != checkpoint.SEAL_FILE),
          key=lambda f: f.stat().st_size)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x01
  f.write_bytes(bytes(data))
  return str(f.relative_to(step_dir))


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_steps(tmp_path, steps=(1, 2), max_to_keep=3):
  """Step s holds w = arange(4) + s and the data iterator after 2 * s elements."""
  it = _iterator()
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=max_to_keep, save_interval_steps=1)
  for step in steps:
    for _ in range(2):
      next(it)
    ck.save(step, {"w": np.arange(4, dtype=np.float32) * 1000 + step, "step": np.int32(step)},
            it)
  ck.close()


ABSTRACT = {"w": jax.ShapeDtypeStruct((4,), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}


def test_a_flipped_byte_is_found_and_the_previous_step_restored(tmp_path):
  _save_steps(tmp_path)
  flipped = _flip_one_byte(tmp_path / "ckpt" / "2")
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  messages, it = [], _iterator()
  # A reader skips the damaged step and leaves the directory as it is ...
  restored, step = ck.restore(ABSTRACT, it, log=messages.append)
  assert step == 1 and ck.all_steps() == [1, 2] and next(it) == 2  # step 1's data position
  # ... the run that owns it moves the damaged step aside.
  restored, step = ck.restore(ABSTRACT, log=messages.append, set_aside=True)
  assert ck.all_steps() == [1]
  ck.close()
  assert step == 1 and np.array_equal(restored["w"], np.arange(4) * 1000 + 1)
  assert len(messages) == 2 and all("/ckpt/2 is damaged" in m and flipped in m
                                    and "differ from their checksum" in m for m in messages)
  assert "moved to" in messages[1] and "moved to" not in messages[0]
  # The damaged step is moved aside, so the resumed run can write step 2 again.
  assert (tmp_path / "ckpt" / "2.damaged").is_dir()
  ck = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  assert ck.all_steps() == [1] and ck.save(2, {"w": np.arange(4, dtype=np.float32) + 2,
                                               "step": np.int32(2)})
  ck.close()
  # Without a target the state comes back as saved.
  ck = checkpoint.TrainCheckpointer(tmp_path)
  restored, step = ck.restore()
  ck.close()
  assert step == 2 and np.array_equal(np.asarray(restored["w"]), np.arange(4) + 2)


def test_every_step_damaged_stops_and_leaves_the_data_position(tmp_path):
  _save_steps(tmp_path)
  _flip_one_byte(tmp_path / "ckpt" / "2")
  (tmp_path / "ckpt" / "1" / checkpoint.SEAL_FILE).unlink()  # killed before it was sealed
  it = _iterator()
  for attempt in range(2):  # the second finds only the steps the first set aside
    ck = checkpoint.TrainCheckpointer(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="every step is damaged") as e:
      ck.restore(ABSTRACT, it, log=lambda m: None, set_aside=True)
    ck.close()
    assert "every step is damaged (2, 1)" in str(e.value), str(e.value)
    assert "To start over on purpose" in str(e.value)
    assert not ck.all_steps(), attempt
  assert next(it) == 0  # the failed restores did not move the data iterator


def test_an_intact_step_of_another_model_is_an_error_not_damage(tmp_path):
  _save_steps(tmp_path, steps=(1,))
  ck = checkpoint.TrainCheckpointer(tmp_path)
  other = dict(ABSTRACT, bias=jax.ShapeDtypeStruct((4,), np.float32))  # a leaf it never had
  it = _iterator()
  with pytest.raises(checkpoint.CheckpointError, match="intact but does not restore"):
    ck.restore(other, it, set_aside=True, log=pytest.fail)
  assert ck.all_steps() == [1] and next(it) == 0  # nothing set aside, data position kept
  # check(step, seal) runs before the restore, with the seal's fields.
  seen = []
  ck.restore(ABSTRACT, check=lambda step, seal: seen.append((step, seal["step"])))
  ck.close()
  assert seen == [(1, 1)]


def test_params_dir_is_sealed(tmp_path, capsys):
  params = {"w": np.arange(1000, dtype=np.float32)}
  checkpoint.save_params(tmp_path / "p", params, {"kind": "test"})
  checkpoint.load_params(tmp_path / "p")
  _flip_one_byte(tmp_path / "p")
  with pytest.raises(checkpoint.CheckpointError, match="is damaged.*differ from their checksum"):
    checkpoint.load_params(tmp_path / "p")
  (tmp_path / "p" / checkpoint.SEAL_FILE).unlink()  # a directory from before the seals
  checkpoint.load_params(tmp_path / "p")
  assert "cannot be checked for damage" in capsys.readouterr().err


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
