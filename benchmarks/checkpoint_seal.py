r"""What the checkpoint seal costs: hashing on save (in the background) and on restore.

  python benchmarks/checkpoint_seal.py [--megabytes 822] [--dir /tmp/seal_bench]

A run state of the given size (default: ViT-B/14-reg INP-Former's 68.5 M trainable params with
StableAdamW's two moments, 822 MB in float32) is saved through `checkpoint.TrainCheckpointer`;
it prints the time until the step is written and sealed, the time to verify the seal alone,
and the time of a whole restore (seal verified, then read by orbax).
"""

import argparse
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from inpformer_jax import checkpoint


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--megabytes", type=float, default=822.0)
  ap.add_argument("--dir", default="/tmp/seal_bench")
  a = ap.parse_args()
  root = Path(a.dir)
  shutil.rmtree(root, ignore_errors=True)
  n = int(a.megabytes * 1e6 / 4 / 3)
  rng = np.random.default_rng(0)
  state = {"params": rng.standard_normal(n, np.float32),
           "opt_state": {"mu": rng.standard_normal(n, np.float32),
                         "nu": rng.random(n, np.float32)}, "step": np.int32(1)}
  ck = checkpoint.TrainCheckpointer(root, save_interval_steps=1)
  t0 = time.perf_counter()
  ck.save(1, state)
  t_call = time.perf_counter() - t0
  ck.wait_until_finished()
  t_sealed = time.perf_counter() - t0
  ck.close()
  step_dir = root / checkpoint.CKPT_SUBDIR / "1"
  size = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()) / 1e6
  t0 = time.perf_counter()
  checkpoint.read_seal(step_dir)
  t_verify = time.perf_counter() - t0
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  ck = checkpoint.TrainCheckpointer(root)
  t0 = time.perf_counter()
  ck.restore(abstract)
  t_restore = time.perf_counter() - t0
  ck.close()
  print(f"state {a.megabytes:.0f} MB, on disk {size:.0f} MB")
  print(f"save() returned after {t_call:.2f} s; written and sealed after {t_sealed:.2f} s")
  print(f"seal verified alone (SHA-256 of every file): {t_verify:.2f} s "
        f"({size / t_verify:.0f} MB/s)")
  print(f"restore (seal verified, then read): {t_restore:.2f} s")
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
