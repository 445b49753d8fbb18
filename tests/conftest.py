"""Fixtures every test folder shares: XLA flags, the golden fixtures, the repository root.

The golden fixtures (`../shared/golden/` beside the clone, or $INPFORMER_GOLDEN) hold the
official code's own outputs. A test that needs one is skipped, with the path, when it is
absent -- and FAILS under CI=true: a CI run that could not check fidelity must not pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from inpformer_jax import xla_flags
from inpformer_jax.conversion import inpformer as inpformer_conversion
from inpformer_jax.models import factory

# The flags `python -m inpformer_jax.main` sets, before JAX creates its CPU backend (XLA
# reads them then; importing jax does not create it): the
# tests check what the product runs. (With XLA's default YNNPACK fusions, on an AMD EPYC
# without AVX-512, decoder block 3 of the golden fixture is 1.05e-5 off, over its 1e-5.)
xla_flags.configure_cpu_flags()

REPO = Path(__file__).resolve().parents[1]
# configs/ and benchmarks/ are imported as packages from the repository root.
sys.path.insert(0, str(REPO))

# Prepended to a subprocess's code: any `import torch` there fails as if it were not installed.
NO_TORCH = """
import sys
class _NoTorch:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "torch":
      raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""

GOLDEN = Path(os.environ.get("INPFORMER_GOLDEN", REPO.parent / "shared" / "golden"))


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def golden_file(name: str) -> Path:
  """GOLDEN/name; a skip (a failure under CI=true) naming the path when it is missing."""
  path = GOLDEN / name
  if not path.is_file():
    msg = (f"golden fixture {path} is missing: put ../shared beside the clone or set "
           "INPFORMER_GOLDEN")
    if in_ci():
      pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def golden():
  """The model fixture: (npz arrays, json meta) of the official code at the dev size."""
  npz = np.load(golden_file("inpformer_dev.npz"))
  meta = json.loads(golden_file("inpformer_dev.json").read_text())
  return npz, meta


@pytest.fixture(scope="session")
def golden_state_dict(golden):
  """The official `model.state_dict()` of the fixture, in its key order (numpy)."""
  z, meta = golden
  return {k: z[f"sd/{k}"] for k in meta["state_dict_keys"]}


@pytest.fixture(scope="session")
def golden_model(golden_state_dict):
  """(INPFormer, params as jax arrays, arch) converted through the users' conversion table."""
  params, arch = inpformer_conversion.convert(golden_state_dict)
  return factory.model_from_arch(arch), jax.tree.map(jnp.asarray, params), arch


@pytest.fixture(scope="session")
def golden_forward(golden, golden_model):
  """(images NHWC, outputs, sown intermediates) of the converted golden model on the
  fixture's images, computed once per session."""
  z, _ = golden
  model, params, _ = golden_model
  x = jnp.asarray(z["input/images"].transpose(0, 2, 3, 1))
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  out, state = fn(params, x)
  return x, out, state["intermediates"]


@pytest.fixture(scope="session")
def golden_metrics():
  """The metric oracle: (npz arrays, json meta) of the official evaluator on synthetic maps."""
  npz = np.load(golden_file("metrics_dev.npz"))
  meta = json.loads(golden_file("metrics_dev.json").read_text())
  return npz, meta


@contextlib.contextmanager
def jax_options(**values):
  """jax.config values set while inside, restored on the way out."""
  old = {k: jax.config.values[k] for k in values}
  for k, v in values.items():
    jax.config.update(k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session, and for the subprocesses tests
  start (pass it as JAX_COMPILATION_CACHE_DIR): a program compiled once is read back, not
  compiled again (the tiny models cost seconds of XLA time per compile on two cores)."""
  path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  with jax_options(jax_compilation_cache_dir=str(path),
                   jax_persistent_cache_min_compile_time_secs=0,
                   jax_persistent_cache_min_entry_size_bytes=-1):
    jax_cache.reset_cache()  # the cache directory is read once per process: read it again
    yield str(path)
  jax_cache.reset_cache()


def subprocess_env(cache_dir: str, *, devices: int | None = None, **extra) -> dict:
  """os.environ for a test's subprocess: this process's XLA flags (plus `devices` simulated
  CPU devices) and compilation cache; `extra` variables on top."""
  flags = os.environ.get("XLA_FLAGS", "")
  if devices is not None:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", **extra)


@pytest.fixture
def fast_compile():
  """XLA without most optimisations while a test runs: the tiny models' train steps compile
  in a fraction of the time (numerics: float32 rounding only; both sides of a comparison
  must run under it)."""
  with jax_options(jax_disable_most_optimizations=True):
    yield

