r"""How far training from the feature cache drifts from the uncached run (float32 summation order).

  python benchmarks/cache_drift.py                     # 80 steps, warm-up 0, product XLA flags
  python benchmarks/cache_drift.py --fast-compile      # as tests/test_feature_cache.py compiles

The runlocal MVTec-like tiny data (tests/runlocal.py: 2 classes x 4 training images, the tiny
random ViT, global batch 2), trained uncached and with `train.cache_features` (one process, so
one shard: the same batches), the same recipe. The control: the uncached run compiled the other
way (with / without jax_disable_most_optimizations), two equally valid float32 programs and no
cache. Prints, for each pair, the largest |loss difference| over the steps (absolute, relative,
and up to step 1, 2, 5, ...), and for the final trainable params the largest |difference|,
relative to the largest |param| of its leaf and to the largest |update| (final - initial).
What the cache computes is exact; the programs fuse and sum differently, and training
amplifies a 1e-7 difference from step to step, so the gap grows with the steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax import xla_flags  # noqa: E402

xla_flags.configure_cpu_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import mvtec  # noqa: E402
from inpformer_jax import reports, train  # noqa: E402
from tests.conftest import jax_options  # noqa: E402
from tests.runlocal import final_params, local_config, make_mvtec_like  # noqa: E402


def _compare(a, b, initial, steps) -> dict:
  """Two runs' (rows, params): their largest loss and parameter differences."""
  loss_a = np.array([r["loss"] for r in a[0]])
  loss_b = np.array([r["loss"] for r in b[0]])
  diff = np.abs(loss_a - loss_b)
  leaves = [(np.asarray(x), np.asarray(y), np.asarray(i)) for x, y, i in zip(
      jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), jax.tree.leaves(initial))]
  return {
      "max_abs_loss_diff": float(diff.max()),
      "max_rel_loss_diff": float(np.max(diff / np.abs(loss_a))),
      # how the gap grows: the largest |loss difference| up to each step
      "max_abs_loss_diff_up_to": {s: float(diff[:s].max())
                                  for s in (1, 2, 5, 10, 20, 40, 80) if s <= steps},
      "max_abs_param_diff": max(float(np.max(np.abs(x - y))) for x, y, _ in leaves),
      "max_rel_param_diff": max(float(np.max(np.abs(x - y)) / np.max(np.abs(x)))
                                for x, y, _ in leaves if np.max(np.abs(x)) > 0),
      "max_rel_update_diff": max(float(np.max(np.abs(x - y)) / np.max(np.abs(x - i)))
                                 for x, y, i in leaves if np.max(np.abs(x - i)) > 0)}


def measure(steps: int, warmup: int, fast_compile: bool, root: Path) -> dict:
  data = {"mvtec": make_mvtec_like(root / "mvtec")}
  over = {"train.total_steps": steps, "train.checkpoint_every_steps": 10 * steps,
          "train.log_every_steps": 1, "optim.warmup_steps": warmup}
  recipes, runs = train.Recipes(), {}

  def run(name, fast, recipes, **extra):
    c = local_config(mvtec.get_config, "", data, **over, **extra)
    with jax_options(jax_disable_most_optimizations=fast):
      train.train_and_evaluate(c, str(root / name), mode="train", recipes=recipes)
    runs[name] = (reports.read_metrics(root / name), final_params(root / name))

  run("off", fast_compile, recipes)
  run("cached", fast_compile, recipes, **{"train.cache_features": True})
  # the control: the uncached run compiled the other way (a new recipe: new programs), two
  # equally valid float32 programs without any cache
  run("off_other_compile", not fast_compile, train.Recipes())
  initial = recipes.get(local_config(mvtec.get_config, "", data, **over), steps).trainable
  lr = [r["lr"] for r in runs["off"][0]]
  return {"steps": steps, "warmup": warmup, "fast_compile": fast_compile, "min_lr": min(lr),
          "max_update": max(float(np.max(np.abs(np.asarray(x) - np.asarray(i)))) for x, i in
                            zip(jax.tree.leaves(runs["off"][1]), jax.tree.leaves(initial))),
          "cached_vs_uncached": _compare(runs["off"], runs["cached"], initial, steps),
          "uncached_vs_uncached_other_compile": _compare(runs["off"], runs["off_other_compile"],
                                                         initial, steps)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=80)
  ap.add_argument("--warmup", type=int, default=0)
  ap.add_argument("--fast-compile", action="store_true",
                  help="jax_disable_most_optimizations, as the tests compile")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    out = measure(args.steps, args.warmup, args.fast_compile, Path(tmp))
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
