"""The command lines run under tcmalloc when it is installed, and that is what keeps XLA:CPU's
buffers off fresh pages; the opt-out, a library the loader refuses and a wrong value."""

import ast
import os
import subprocess
import sys

import pytest

from inpformer_jax import allocator
from tests.conftest import REPO, in_ci

# The command lines that run models: each re-executes itself under tcmalloc before JAX loads.
COMMANDS = ("inpformer_jax/main.py", "inpformer_jax/reproduce/__main__.py",
            "inpformer_jax/deploy/predict.py", "inpformer_jax/deploy/calibrate.py")

# Minor page faults of a call of a jitted function whose 64 MiB intermediate XLA allocates on
# every call (a stand-in for a train step's buffers), the median of 7 calls (tcmalloc maps
# new memory once in a while, not on every call).
FAULTS = """
import resource, statistics
from inpformer_jax import allocator
allocator.use_tcmalloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x)[::-1] * x))
x = jnp.ones((4096, 4096))
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(allocator.describe(), int(statistics.median(faults)))
"""


def _needs_tcmalloc():
  if allocator.find() is None:
    msg = "tcmalloc is not installed (apt-get install libtcmalloc-minimal4)"
    if in_ci():
      pytest.fail(f"CI=true: {msg}; .ci/run installs it", pytrace=False)
    pytest.skip(msg)


def _python(code, **env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", allocator.ENV)}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(base, **env))


def test_tcmalloc_keeps_xla_buffers_off_fresh_pages():
  _needs_tcmalloc()
  runs = {}
  for choice in (allocator.TCMALLOC, allocator.SYSTEM):
    r = _python(FAULTS, **{allocator.ENV: choice})
    assert r.returncode == 0, r.stderr[-2000:]
    name, faults = r.stdout.split()[0], int(r.stdout.split()[-1])
    runs[choice] = (name, faults)
  assert runs[allocator.TCMALLOC][0] == "tcmalloc", runs
  assert runs[allocator.SYSTEM][0] == "system", runs
  # glibc maps and unmaps the 64 MiB buffer on every call: 16.4 k faults of 4 KiB pages.
  assert runs[allocator.SYSTEM][1] > 4000, runs
  assert runs[allocator.TCMALLOC][1] < runs[allocator.SYSTEM][1] / 20, runs


def test_the_training_command_runs_under_tcmalloc(tmp_path):
  _needs_tcmalloc()
  # -v 0 shows main's start-up line, written before the run finds its missing data.
  r = subprocess.run([sys.executable, "-m", "inpformer_jax.main", "-v", "0", "--config",
                      "configs/demo.py", "--workdir", str(tmp_path / "w"),
                      f"--config.data.roots.demo={tmp_path}/nowhere"],
                     cwd=REPO, capture_output=True, text=True, timeout=300,
                     env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
  assert r.returncode == 2, r.stderr[-3000:]
  assert "allocator: tcmalloc (" in r.stderr, r.stderr[-3000:]


def test_every_model_command_chooses_the_allocator_before_importing_jax():
  for rel in COMMANDS:
    body = ast.parse((REPO / rel).read_text()).body
    hook = next(i for i, node in enumerate(body) if isinstance(node, ast.If)
                and "__main__" in ast.unparse(node.test)
                and ast.unparse(node.body[0]) == "allocator.use_tcmalloc()")
    before = [a.name if isinstance(n, ast.Import) else f"{n.module}.{a.name}"
              for n in body[:hook] if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names]
    # Only the standard library and the allocator itself are loaded before the choice.
    heavy = [m for m in before if m.split(".")[0] not in sys.stdlib_module_names
             and m not in ("__future__.annotations", "inpformer_jax.allocator")]
    assert not heavy and "inpformer_jax.allocator" in before, (rel, heavy)


def test_system_value_and_a_refused_library(tmp_path):
  starts = tmp_path / "starts"
  code = (f"open({str(starts)!r}, 'a').write('x')\n"
          "from inpformer_jax import allocator\nallocator.use_tcmalloc()\n"
          "print(allocator.describe())")
  r = _python(code, **{allocator.ENV: allocator.SYSTEM})
  assert r.returncode == 0 and r.stdout.strip() == "system malloc", r.stderr
  assert starts.read_text() == "x"  # not re-executed
  # A file the loader cannot preload: one re-execution (the loader says why), then no more.
  starts.unlink()
  bogus = tmp_path / "libnot.so"
  bogus.write_text("not a library")
  r = _python(code, **{allocator.ENV: str(bogus)})
  assert r.returncode == 0 and r.stdout.strip() == "system malloc", r.stderr
  assert starts.read_text() == "xx"
  assert "cannot be preloaded" in r.stderr


def test_a_wrong_value_is_one_error_line():
  r = _python("from inpformer_jax import allocator\nallocator.use_tcmalloc()",
              **{allocator.ENV: "tcmaloc"})
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f"error: {allocator.ENV}='tcmaloc' is neither 'tcmalloc', 'system' nor a library file; "
      "unset it or give the path of libtcmalloc_minimal.so.4"]
