r"""The evaluation command's images/s next to the forward-only images/s of the same model.

  python benchmarks/eval_loop.py                      # the demo recipe (make demo's data)
  python benchmarks/eval_loop.py --config configs/demo.py:encoder=random --repeats 3 \
      --config.eval.batch_size=16

forward-only: the jitted forward that evaluation runs (`evaluate.make_forward`: model, maps,
scores) on one batch already on the device, called back to back, timed until the last result
is ready: what the model alone can do. evaluation: `evaluate.evaluate` on the whole test set
as the command runs it (reading and resizing the images, masks, per-class metric
accumulation, the final metrics, the report gallery's panels written into a temporary
workdir), compiled first by an untimed run; images/s = test images / wall time.
The trained part has random weights (speed does not depend on them); the encoder is the
config's. Prints both (median of --repeats runs of each, alternating), the ratio of the
medians and the median of each round's ratio: a shared machine drifts between rounds, a
round's two runs are seconds apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inpformer_jax import allocator  # noqa: E402
from inpformer_jax import xla_flags  # noqa: E402

if __name__ == "__main__":
  allocator.use_tcmalloc()  # as the command lines run; before JAX is imported
xla_flags.configure_cpu_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from inpformer_jax import evaluate as eval_lib  # noqa: E402
from inpformer_jax import params as params_lib  # noqa: E402
from inpformer_jax import sharding  # noqa: E402
from inpformer_jax import train  # noqa: E402
from inpformer_jax.data import datasets  # noqa: E402


def load_config(spec: str, overrides: list[str]):
  """`--config FILE.py:ARG` and its `--config.FIELD=VALUE` overrides, read as the trainer
  reads them (ml_collections' config flag)."""
  argv = ["eval_loop", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--data", default="demo_data", help="config.data.roots.demo")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--forward_batches", type=int, default=8)
  a, overrides = ap.parse_known_args(argv)  # --config.FIELD=VALUE: the config's overrides
  config = load_config(a.config, [f"--config.data.roots.demo={a.data}", *overrides])
  test = datasets.read_split(config.data, "test")
  r = train.Recipe.create(config, total_steps=1)
  with jax.set_mesh(r.mesh):
    params = params_lib.merge(jax.device_put(r.encoder, r.encoder_sh), r.trainable)
    params = jax.device_put(params)
    forward = r.forward(config)
    b, s = config.eval.batch_size, config.data.crop
    x = sharding.global_batch(
        {"image": np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)},
        r.mesh)["image"]
    jax.block_until_ready(forward(params, x))

    def forward_only() -> float:
      t0 = time.perf_counter()
      outs = [forward(params, x) for _ in range(a.forward_batches)]
      jax.block_until_ready(outs)
      return b * a.forward_batches / (time.perf_counter() - t0)

    def evaluation() -> float:
      with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        eval_lib.evaluate(r.model, params, test.samples, config, r.mesh, forward=forward,
                          source=test.source, workdir=workdir)
        return len(test.samples) / (time.perf_counter() - t0)

    evaluation()  # compiles what the first call of each shape needs
    fw, ev = [], []
    for _ in range(a.repeats):  # alternating, so load changes hit both
      fw.append(forward_only())
      ev.append(evaluation())
  dev = jax.devices()[0]
  f, e = statistics.median(fw), statistics.median(ev)
  print(f"{dev.platform} ({dev.device_kind}) x {jax.device_count()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; {config.model.encoder} at {s}px, eval batch "
        f"{b}, {len(test.samples)} test images, median of {a.repeats}; {allocator.describe()}")
  print("| loop | images/s |")
  print("|---|---:|")
  print(f"| forward only | {f:.1f} |")
  print(f"| evaluation command | {e:.1f} |")
  print(f"| ratio of the medians | {e / f:.2f} |")
  print(f"| median of the rounds' ratios | "
        f"{statistics.median(v / u for u, v in zip(fw, ev, strict=True)):.2f} |")
  print("runs: forward " + ", ".join(f"{v:.1f}" for v in fw) + "; evaluation "
        + ", ".join(f"{v:.1f}" for v in ev))


if __name__ == "__main__":
  main()
