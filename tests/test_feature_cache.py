"""The feature cache is exact: training from cached encoder features (in device memory or
memory-mapped from disk) gives the uncached run's losses and parameters, for any number of
feature groups."""

import pytest

from configs import mvtec
from inpformer_jax import feature_cache
from inpformer_jax import reports
from inpformer_jax import train
from tests.runlocal import (assert_same_rows, fast_compile_module, final_params,  # noqa: F401
                            local_config, make_mvtec_like, max_abs_diff)

# Four steps, three of them with lr > 0 (the warm-up's first is 0): the parameters move.
STEPS = {"train.total_steps": 4, "train.checkpoint_every_steps": 100,
         "train.log_every_steps": 1}
OFF, DEVICE = ("off", {}), ("device", {"train.cache_features": True})
DISK = ("disk", {"train.cache_features": True, "train.cache_device_bytes": 0})
THREE_GROUPS = {"model.fuse_groups": ((0, 1, 2), (3, 4, 5), (6, 7)),
                "model.decoder_groups": ((0, 1), (2, 3, 4), (5, 6, 7))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return {"mvtec": make_mvtec_like(tmp_path_factory.mktemp("data") / "mvtec")}


# The cache's storage does not depend on the group count: the disk copy is checked once.
@pytest.mark.parametrize("groups,caches", [({}, (OFF, DEVICE, DISK)),
                                           (THREE_GROUPS, (OFF, DEVICE))],
                         ids=["two_groups", "three_groups"])
def test_cached_training_equals_uncached(data, tmp_path, groups, caches):
  recipes = train.Recipes()
  runs, params = {}, {}
  for name, extra in caches:
    c = local_config(mvtec.get_config, "", data, **STEPS, **groups, **extra)
    train.train_and_evaluate(c, str(tmp_path / name), mode="train", recipes=recipes)
    runs[name] = reports.read_metrics(tmp_path / name)
    params[name] = final_params(tmp_path / name)
  initial = recipes.get(local_config(mvtec.get_config, "", data, **STEPS, **groups), 4).trainable
  assert len(runs["off"]) == 4 and max_abs_diff(params["off"], initial) > 1e-3
  for cached in [name for name, _ in caches[1:]]:
    # float32 sums over differently fused programs: ~1e-7 relative per value.
    assert_same_rows(runs["off"], runs[cached], keys=("loss", "reconstruction", "coherence", "lr"))
    assert_same_rows(runs["off"], runs[cached], keys=("grad_norm",), tol=1e-5)
    assert max_abs_diff(params["off"], params[cached]) <= 1e-5, cached
  n = len(groups.get("model.fuse_groups", ((), ())))
  names = feature_cache.keys(n)
  assert names[-1] == "fused" and len(names) == n + 1
  if DISK in caches:
    assert all((tmp_path / "disk" / "feature_cache" / f"{k}.npy").is_file() for k in names)
