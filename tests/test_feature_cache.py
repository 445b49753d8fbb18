"""The feature cache is exact: training from cached encoder features (in device memory or
memory-mapped from disk) gives the uncached run's losses and parameters, for any number of
feature groups; it stores the groups only when they determine the fused input, in float32 or
bfloat16. Sharded: the global batches depend on the shard count only, not on the
process count; a process reads and stores only its own shards' rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mvtec
from inpformer_jax import feature_cache
from inpformer_jax import params as params_lib
from inpformer_jax import reports
from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax import train
from inpformer_jax.data import pipeline
from inpformer_jax.models.inp_former import INPFormer
from tests.runlocal import (assert_same_rows, fast_compile_module, final_params,  # noqa: F401
                            local_config, make_mvtec_like, max_abs_diff)

# Four steps, no warm-up: lr > 0 at every compared step, so the parameters move.
STEPS = {"train.total_steps": 4, "train.checkpoint_every_steps": 100,
         "train.log_every_steps": 1, "optim.warmup_steps": 0}
OFF, DEVICE = ("off", {}), ("device", {"train.cache_features": True})
DISK = ("disk", {"train.cache_features": True, "train.cache_device_bytes": 0})
THREE_GROUPS = {"model.fuse_groups": ((0, 1, 2), (3, 4, 5), (6, 7)),
                "model.decoder_groups": ((0, 1), (2, 3, 4), (5, 6, 7))}
# 22 rows in 4 shards: shards 0, 1 hold 6 rows, shards 2, 3 hold 5 (unequal epochs).
N, G, SEED, BATCHES = 22, 4, 3, 12
OWN = {2: ((0,), (1,)), 4: ((0, 1), (2, 3))}  # shards -> each of 2 processes' shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return {"mvtec": make_mvtec_like(tmp_path_factory.mktemp("data") / "mvtec")}


@pytest.fixture(scope="module")
def recipes():
  """Shared: the build test reuses the two-group recipe (model and encoder), run last."""
  return train.Recipes()


# The cache's storage does not depend on the group count: the disk copy is checked once.
@pytest.mark.parametrize("groups,caches", [(THREE_GROUPS, (OFF, DEVICE)),
                                           ({}, (OFF, DEVICE, DISK))],
                         ids=["three_groups", "two_groups"])
def test_cached_training_equals_uncached(data, recipes, tmp_path, groups, caches):
  runs, params = {}, {}
  for name, extra in caches:
    c = local_config(mvtec.get_config, "", data, **STEPS, **groups, **extra)
    train.train_and_evaluate(c, str(tmp_path / name), mode="train", recipes=recipes)
    runs[name] = reports.read_metrics(tmp_path / name)
    params[name] = final_params(tmp_path / name)
  initial = recipes.get(local_config(mvtec.get_config, "", data, **STEPS, **groups), 4).trainable
  assert len(runs["off"]) == 4 and all(r["lr"] > 0 for r in runs["off"])
  assert max_abs_diff(params["off"], initial) > 1e-3
  for cached in [name for name, _ in caches[1:]]:
    # float32 sums over differently fused programs: 6e-8 measured, losses and params
    # (`python benchmarks/cache_drift.py --steps 4 --fast-compile`; docs/engine.md).
    assert_same_rows(runs["off"], runs[cached], keys=("loss", "reconstruction", "coherence", "lr"))
    assert_same_rows(runs["off"], runs[cached], keys=("grad_norm",), tol=1e-5)
    assert max_abs_diff(params["off"], params[cached]) <= 1e-6, cached
  # two equal groups of all layers: the fused input is derived in the step, not stored;
  # three unequal ones: stored
  n = len(groups.get("model.fuse_groups", ((), ())))
  model = recipes.get(local_config(mvtec.get_config, "", data, **STEPS, **groups), 4).model
  groups_only = tuple(f"group_{g}" for g in range(n))
  assert feature_cache.keys(model) == (groups_only if n == 2 else (*groups_only, "fused"))
  if DISK in caches:
    files = sorted(f.stem for f in (tmp_path / "disk" / "feature_cache").glob("*.npy"))
    assert files == list(groups_only)


@pytest.mark.parametrize("fusion,fuse_groups,derived", [
    ("mean", ((0, 1, 2, 3), (4, 5, 6, 7)), True),
    ("mean", ((4, 5, 6, 7), (0, 1, 2, 3)), True),
    ("mean", ((0, 1, 2), (3, 4, 5), (6, 7)), False),  # unequal
    ("mean", ((0, 1), (2, 3)), False),                # partial
    ("concat", ((0,), (1, 2)), True)], ids=["mean", "mean_swapped", "unequal", "partial",
                                           "concat"])
def test_the_cache_stores_the_fused_input_only_when_the_groups_do_not_determine_it(
    fusion, fuse_groups, derived):
  model = INPFormer(encoder=None, fusion=fusion, fuse_groups=fuse_groups,
                    target_layers=tuple(range(8)) if fusion == "mean" else (4, 7, 10))
  names = tuple(f"group_{g}" for g in range(len(fuse_groups)))
  assert feature_cache.keys(model) == (names if derived else (*names, "fused"))


def _batches(shards, process_index, process_count):
  it = iter(feature_cache.index_stream(N, G, SEED, shards, process_index=process_index,
                                       process_count=process_count))
  return [next(it) for _ in range(BATCHES)]


@pytest.mark.parametrize("shards", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(shards):
  one = _batches(shards, 0, 1)
  two = [_batches(shards, p, 2) for p in (0, 1)]
  for b in range(BATCHES):
    assert one[b]["index"].shape == (G,) and two[0][b]["index"].shape == (G // 2,)
    np.testing.assert_array_equal(
        one[b]["index"], np.concatenate([two[0][b]["index"], two[1][b]["index"]]))


@pytest.mark.parametrize("shards", [2, 4])
def test_a_process_reads_its_shards_each_row_once_per_shard_epoch(shards):
  per_shard = G // shards
  for p, own in enumerate(OWN[shards]):
    batches = _batches(shards, p, 2)
    local = np.concatenate([np.arange(s, N, shards) for s in own])  # the cache's row order
    for b in batches:
      np.testing.assert_array_equal(local[b["row"]], b["index"])
    for t, s in enumerate(own):  # shard own[t] fills the t-th block of the process's rows
      seq = np.concatenate([b["index"][t * per_shard:(t + 1) * per_shard] for b in batches])
      rows = np.arange(s, N, shards)
      epochs = [seq[e * len(rows):(e + 1) * len(rows)] for e in range(len(seq) // len(rows))]
      assert len(epochs) >= 2
      for e in epochs:
        np.testing.assert_array_equal(np.sort(e), rows)
      assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_the_stream_resumes_from_its_checkpointed_state():
  it = iter(feature_cache.index_stream(N, G, SEED, 4, process_index=1, process_count=2))
  for _ in range(5):
    next(it)
  state = it.get_state()  # what checkpoint.TrainCheckpointer saves with the run state
  after = [next(it)["index"] for _ in range(BATCHES)]
  resumed = iter(feature_cache.index_stream(N, G, SEED, 4, process_index=1, process_count=2))
  resumed.set_state(state)
  np.testing.assert_array_equal([next(resumed)["index"] for _ in range(BATCHES)], after)


def test_one_shard_is_the_uncached_pipelines_order():
  ref = iter(pipeline.train_dataset(np.zeros((N, 4, 4, 3), np.float32), resize=4, crop=4,
                                    global_batch_size=G, seed=SEED))
  for b in _batches(1, 0, 1):
    r = next(ref)
    np.testing.assert_array_equal(b["index"], r["index"])
    np.testing.assert_array_equal(b["row"], r["index"])


def test_the_shard_count_divides_the_batch_and_is_a_multiple_of_the_processes():
  c = mvtec.get_config("runlocal=True")
  c.train.batch_size = 4
  assert feature_cache.num_shards(c, process_count=2) == 2  # 0: the process count
  c.train.cache_shards = 4
  assert feature_cache.num_shards(c, process_count=2) == 4
  for shards, processes in ((3, 1), (2, 4)):
    c.train.cache_shards = shards
    with pytest.raises(settings.ConfigError, match=f"config.train.cache_shards={shards}"):
      feature_cache.num_shards(c, process_count=processes)


def test_a_process_encodes_and_stores_only_its_shards(data, recipes, tmp_path):
  r = recipes.get(local_config(mvtec.get_config, "", data, **STEPS), 4)
  params = params_lib.merge(r.encoder, r.trainable)
  images = np.random.default_rng(0).normal(size=(10, 28, 28, 3)).astype(np.float32)
  feats = jax.device_get(jax.jit(lambda p, x: r.model.apply(
      {"params": p}, x, method=INPFormer.encode))(params, images))
  ref = dict(zip(feature_cache.keys(r.model), feats["en_tokens"]))  # two groups: no "fused"
  # the fused input the cached step derives from them is encode's, to the bit
  np.testing.assert_array_equal(jax.jit(r.model.fused_from_groups)(feats["en_tokens"]),
                                feats["fused"])

  def build(process_index, **over):
    cc = local_config(mvtec.get_config, "", data, **STEPS, **{"train.batch_size": 4,
                                                              "train.cache_shards": 4, **over})
    cache, on_device = feature_cache.build_feature_cache(
        r.model, params, images, cc, r.mesh, tmp_path, process_index=process_index,
        process_count=2)
    assert not on_device  # several processes: never the replicated device copy
    return cache

  # 10 rows, 4 shards: process 0 owns shards 0, 1 (6 rows, 3 encoder steps of 2), process 1
  # shards 2, 3 (4 rows, padded to the same 3 steps), in memory and on disk.
  for p, rows, over in ((0, [0, 4, 8, 1, 5, 9], {}),
                        (1, [2, 6, 3, 7], {"train.cache_device_bytes": 0})):
    cache = build(p, **over)
    for k in ref:
      assert cache[k].shape == (len(rows), *ref[k].shape[1:])
      np.testing.assert_allclose(cache[k], ref[k][rows], atol=1e-5, err_msg=f"{p} {k}")
  folder = tmp_path / "feature_cache" / "process_1"
  meta = json.loads((folder / "meta.json").read_text())
  assert (meta["shards"], meta["own_shards"]) == (4, [2, 3])
  # the stream's rows address this cache where their source rows' features are
  it = iter(feature_cache.index_stream(10, 4, SEED, 4, process_index=1, process_count=2))
  for _ in range(4):
    b = next(it)
    np.testing.assert_allclose(cache["group_1"][b["row"]], ref["group_1"][b["index"]],
                               atol=1e-5)
  # another shard count in the same folder is built anew, not read back, and so is another
  # dtype: bfloat16 (on disk its bits as uint16) after float32 and float32 after bfloat16
  for dtype in ("float32", "bfloat16", "float32"):
    cache = build(1, **{"train.cache_device_bytes": 0, "train.cache_shards": 2,
                        "train.cache_dtype": dtype})
    assert json.loads((folder / "meta.json").read_text())["dtype"] == dtype
    assert np.load(folder / "group_0.npy", mmap_mode="r").dtype == (
        np.uint16 if dtype == "bfloat16" else np.float32)
    for k in ref:
      assert cache[k].dtype == jnp.dtype(dtype) and cache[k].shape == (5, *ref[k].shape[1:])
      np.testing.assert_allclose(cache[k].astype(np.float32), ref[k][[1, 3, 5, 7, 9]],
                                 rtol=2**-8 if dtype == "bfloat16" else 0, atol=1e-5)
  # bfloat16 in device memory (one process), and a training step from it
  cc = local_config(mvtec.get_config, "", data, **STEPS, **{"train.cache_dtype": "bfloat16"})
  cache, on_device = feature_cache.build_feature_cache(r.model, params, images, cc, r.mesh,
                                                       tmp_path, process_index=0,
                                                       process_count=1)
  assert on_device and all(v.dtype == jnp.bfloat16 for v in cache.values())
  gather = jax.jit(lambda c, i: {k: jnp.take(v, i, axis=0) for k, v in c.items()},
                   out_shardings=sharding.batch_sharding(r.mesh))
  batch = gather(cache, sharding.global_batch({"row": np.arange(cc.train.batch_size)},
                                              r.mesh)["row"])
  state, metrics = r.train_step(cc.loss, cached=True)(r.init_state(r.trainable, SEED),
                                                      r.encoder, batch)
  assert metrics["lr"] > 0 and np.isfinite(metrics["loss"])
  assert max_abs_diff(jax.device_get(state["params"]), r.trainable) > 1e-4
