"""Sharded training equals one device; mesh, batch and distributed settings fail clearly.

The 8-device runs happen in a subprocess (tests/sharding_worker.py): the CPU device count is
fixed when JAX creates its backend.
"""

import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from inpformer_jax import sharding
from inpformer_jax.data import demo
from tests.conftest import REPO, subprocess_env

WORKER = REPO / "tests" / "sharding_worker.py"


def _worker(cache_dir, *args, devices=8):
  env = subprocess_env(cache_dir, devices=devices, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, str(WORKER), *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stdout


def _rel(a, b) -> float:
  """|a - b| / |b| (L2 norms)."""
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Per-tensor relative tolerance of the sharded runs' final state against one device's. The
# worker runs in float64, so the runs differ by reduction order only (measured: opt state
# <= 7e-8 per tensor, params <= 1e-7 but for the one tensor below).
STATE_RTOL = 1e-6
# The key half of this bias has an exactly zero gradient (softmax ignores a constant per
# query); Adam divides its +-1e-15 float64 noise by eps=1e-10: 2e-6 relative, measured.
NOISY = {"param/aggregation_0/attn/kv/bias": 1e-5}


@pytest.mark.slow  # three compilations of the train step: ~60 s on 2 loaded cores.
def test_data_parallel_and_fsdp_steps_equal_one_device(tmp_path, compilation_cache):
  out = _worker(compilation_cache, "steps", str(tmp_path / "steps.npz"))
  z = np.load(tmp_path / "steps.npz")
  assert int(z["fsdp4/n_sharded"]) > 50, out  # the FSDP run really shards its state ...
  assert "(32, 16)" in out or "(16, 32)" in out, out  # ... a kernel lives in quarters
  assert int(z["data8/n_sharded"]) == 0
  keys = [k[len("one/"):] for k in z.files if k.startswith(("one/param/", "one/opt/"))]
  params = [k for k in keys if k.startswith("param/")]
  opt = [k for k in keys if k.startswith("opt/") and z[f"one/{k}"].dtype.kind == "f"]
  assert len(params) > 100 and len(opt) == 3 * len(params)  # mu, nu, nu_max
  assert z["one/" + params[0]].dtype == np.float64
  # Every one of the 5 steps learns (no warm-up): the params really moved.
  assert len(z["one/lr"]) == 5 and (z["one/lr"] > 0).all()
  update = lambda run: np.concatenate([(z[f"{run}/{k}"] - z[f"initial/{k}"]).ravel()
                                       for k in params])
  one = update("one")
  assert np.abs(one).max() > 2e-3
  for run in ("data8", "fsdp4"):
    np.testing.assert_array_equal(z[f"{run}/lr"], z["one/lr"])
    # Each step's loss is computed at the params the steps before it left.
    np.testing.assert_allclose(z[f"{run}/loss"], z["one/loss"], rtol=1e-9, err_msg=run)
    assert int(z[f"{run}/opt/1/count"]) == 5
    assert _rel(update(run), one) < STATE_RTOL, run  # the updates, as one vector
    for k in params + opt:  # every tensor of the params and the optimiser state
      rel = _rel(z[f"{run}/{k}"], z[f"one/{k}"])
      assert rel < NOISY.get(k, STATE_RTOL), (run, k, rel)


def test_mesh_and_batch_errors_are_clear(compilation_cache):
  out = _worker(compilation_cache, "errors")
  assert "NO ERROR" not in out, out
  mesh_line = next(l for l in out.splitlines() if l.startswith("mesh:"))
  batch_line = next(l for l in out.splitlines() if l.startswith("batch:"))
  assert "data=3" in mesh_line and "8 are available" in mesh_line
  assert "--config.mesh.data=-1" in mesh_line
  assert "config.train.batch_size=12" in batch_line and "8 devices" in batch_line
  assert "--config.train.batch_size=16" in batch_line


def test_cli_reports_a_batch_that_does_not_divide(tmp_path, compilation_cache):
  # Through the CLI (no traceback, exit status 2); 3 images over 2 devices.
  env = subprocess_env(compilation_cache, devices=2)
  data = tmp_path / "demo"
  demo.make_demo_dataset(str(data), seed=0, classes=("brick",), n_train=4, n_good=1,
                         n_per_defect=1)
  r = subprocess.run([sys.executable, "-m", "inpformer_jax.main", "--config",
                      f"{REPO}/configs/demo.py:runlocal=True", "--workdir",
                      str(tmp_path / "w"), f"--config.data.roots.demo={data}",
                      "--config.data.categories.demo=brick", "--config.train.batch_size=3",
                      "--mode=train"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error: config.train.batch_size=3 does not divide over the 2 devices" in r.stderr
  assert "Traceback" not in r.stderr


def test_mesh_shape_from_config():
  cfg = lambda **kw: ml_collections.ConfigDict(dict(data=-1, fsdp=1) | kw)  # noqa: E731
  assert sharding.mesh_shape(cfg(), 8) == (8, 1)
  assert sharding.mesh_shape(cfg(fsdp=4), 8) == (2, 4)
  assert sharding.mesh_shape(cfg(data=2, fsdp=-1), 8) == (2, 4)
  with pytest.raises(sharding.MeshError, match="config.mesh.fsdp=3 does not divide the 8"):
    sharding.mesh_shape(cfg(fsdp=3), 8)
  with pytest.raises(sharding.MeshError, match="data=2 x fsdp=2 = 4 devices, but 8"):
    sharding.mesh_shape(cfg(data=2, fsdp=2), 8)
  mesh = sharding.make_mesh(cfg())
  assert mesh.axis_names == ("data", "fsdp")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rule_table_and_auto_rule():
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert sharding.auto_spec((768, 2304), 4) == P(None, "fsdp")
  assert sharding.auto_spec((3072, 768), 4) == P("fsdp", None)
  assert sharding.auto_spec((768,), 4) == P()             # below the size threshold
  assert sharding.auto_spec((1, 6, 768), 4, min_size=1) == P(None, None, "fsdp")
  assert sharding.auto_spec((6, 7), 4, min_size=1) == P()  # nothing divides: replicated
  tree = {"decoder_0": {"mlp": {"fc1": {"kernel": jax.ShapeDtypeStruct((8, 32), np.float32),
                                        "bias": jax.ShapeDtypeStruct((32,), np.float32)}}}}
  sh = sharding.param_shardings(tree, mesh, ((r"fc1/kernel$", (None, "fsdp")),))
  assert sh["decoder_0"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp")
  assert sh["decoder_0"]["mlp"]["fc1"]["bias"].spec == P()
  with pytest.raises(sharding.MeshError, match="'model' .* is not a mesh axis"):
    sharding.param_shardings(tree, mesh, ((r"kernel", (None, "model")),))
  mesh4 = jax.sharding.AbstractMesh((1, 4), ("data", "fsdp"))
  sh = sharding.param_shardings(tree, mesh4, ((r"kernel", "auto:100"), (r"bias", "auto")))
  assert sh["decoder_0"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp")  # 256 >= 100
  assert sh["decoder_0"]["mlp"]["fc1"]["bias"].spec == P()  # 32 < FSDP_MIN_SIZE
  with pytest.raises(sharding.MeshError, match="neither 'auto'"):
    sharding.param_shardings(tree, mesh, ((r"kernel", "fsdp"),))


def test_distributed_settings_from_config_and_environment():
  assert sharding.distributed_settings(None, {}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert sharding.distributed_settings(None, env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  cfg = ml_collections.ConfigDict({"multihost": True, "distributed": {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": None}})
  assert sharding.distributed_settings(cfg, {"JAX_PROCESS_ID": "1"}) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  # multihost with nothing set: JAX detects the cluster (SLURM, Open MPI, TPU).
  assert sharding.distributed_settings(ml_collections.ConfigDict({"multihost": True}), {}) == {}
  with pytest.raises(sharding.MeshError, match="no coordinator address"):
    sharding.distributed_settings(None, {"JAX_PROCESS_ID": "1"})
  with pytest.raises(sharding.MeshError, match="process_id=4 is not in"):
    sharding.distributed_settings(None, dict(env, JAX_PROCESS_ID="4"))


def test_collective_bytes_from_hlo():
  # Compiled HLO names its operands; their shapes come from their definitions.
  hlo = "\n".join([
      "  %param.1 = f32[8,16]{1,0} parameter(1)",
      "  %dot.1 = f32[8,64]{1,0} dot(%param.1, %param.2), lhs_contracting_dims={1}",
      "  %all-reduce = f32[8,64]{1,0} all-reduce(%dot.1), channel_id=2, to_apply=%add",
      "  %a = f32[4]{0} parameter(2)",
      "  %b = bf16[2,2]{1,0} parameter(3)",
      "  %ars = (f32[4]{0}, /*index=1*/bf16[2,2]{1,0}) all-reduce-start(%a, %b), to_apply=%add",
      "  %ard = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce-done(%ars)",
      "  %all-gather = f32[32,16]{1,0} all-gather(%param.1), dimensions={0}",
      "  ROOT %rs = f32[2,16]{1,0} reduce-scatter(f32[8,16]{1,0} %param.1), dimensions={0}",
      "  %add = f32[8,64]{1,0} add(%dot.1, %dot.1)"])
  c = sharding.collective_bytes(hlo)
  assert c["all-reduce"] == {"count": 2, "bytes": 8 * 64 * 4 + 16 + 8}
  assert c["all-gather"] == {"count": 1, "bytes": 8 * 16 * 4}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 8 * 16 * 4}
  assert sharding.communication_bytes(hlo) == 2048 + 24 + 512 + 512


def test_collective_bytes_of_a_compiled_step(compilation_cache):
  # Data parallelism over 4 devices all-reduces exactly the gradient (8 x 4 float32 + 4).
  out = _worker(compilation_cache, "hlo", devices=4)
  assert "all-reduce-bytes 144" in out, out
