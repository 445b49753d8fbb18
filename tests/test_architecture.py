"""The shape of the code, checked: no import cycle, no torch or weights_conversion in the core,
imports at the top (a few named exceptions), modules of at most 500 lines, tests that mirror
the package, and a core that imports without torch and without starting JAX."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NO_TORCH, REPO

PACKAGE = REPO / "inpformer_jax"
MAX_LINES = 500
MAX_FUNCTION_IMPORTS = 10
# Test modules named after a topic rather than a module of the package.
TOPIC_TESTS = {"test_architecture.py", "test_configs.py", "test_multiprocess.py",
               "test_reference.py"}


def _modules() -> dict[str, Path]:
  """'inpformer_jax.data.pipeline' -> its file, for every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _imports(tree: ast.AST, module: str) -> list[tuple[str, ast.stmt, bool]]:
  """(imported module, node, at module level) for every import statement."""
  top = set(map(id, tree.body))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      for a in node.names:  # `from pkg import submodule` imports the submodule
        full = f"{base}.{a.name}"
        out.append((full if full in MODULES else base, node, id(node) in top))
  return out


def _parsed():
  return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def test_no_import_cycle_inside_the_package():
  graph = {m: {i for i, _, at_top in _imports(t, m) if at_top and i in MODULES and i != m}
           for m, t in _parsed().items()}
  # A package's __init__ runs before its submodules: `pkg.sub` also depends on `pkg`.
  state, cycle = {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        cycle.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycle, f"import cycles: {cycle}"


def test_core_never_imports_torch_or_the_converter_clis():
  bad = [(m, i, n.lineno) for m, t in _parsed().items() for i, n, _ in _imports(t, m)
         if i.split(".")[0] in ("torch", "weights_conversion")]
  assert not bad, bad


def test_imports_are_at_the_top_but_for_a_few_with_a_reason():
  lines = {m: p.read_text().splitlines() for m, p in MODULES.items()}
  late = [(m, n.lineno) for m, t in _parsed().items() for _, n, at_top in _imports(t, m)
          if not at_top and not _guarded_top_level(t, n)]
  late = sorted(set(late))
  assert len(late) <= MAX_FUNCTION_IMPORTS, late
  for m, lineno in late:
    before = lines[m][lineno - 2].strip()
    assert before.startswith("#") or "#" in lines[m][lineno - 1], (
        f"{MODULES[m]}:{lineno}: a function-level import needs its reason in a comment")


def _guarded_top_level(tree: ast.Module, node: ast.stmt) -> bool:
  """An import inside a module-level try/except (an optional dependency) is at the top."""
  return any(isinstance(s, ast.Try) and node in ast.walk(s) for s in tree.body)


def test_no_module_over_500_lines():
  long = {str(p.relative_to(REPO)): n for p in MODULES.values()
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_tests_mirror_the_package():
  for path in sorted((REPO / "tests").rglob("test_*.py")):
    rel = path.relative_to(REPO / "tests")
    if rel.name in TOPIC_TESTS or rel.parts[0] == "torch_reference":
      continue
    target = PACKAGE.joinpath(*rel.parts[:-1], rel.name[len("test_"):])
    assert target.is_file() or target.with_suffix("").is_dir(), (
        f"tests/{rel} tests no module: expected {target.relative_to(REPO)}")
  for d in sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and
                  (p / "__init__.py").exists()):
    assert d.name == "torch_reference" or (PACKAGE / d.name).is_dir(), d


@pytest.mark.slow
def test_the_core_imports_without_torch_and_without_starting_jax():
  code = NO_TORCH + """
import pkgutil, importlib
import inpformer_jax
skip = ("inpformer_jax.data.tfds_builders", "inpformer_jax.data.prepare")  # the tfds extra
for m in pkgutil.walk_packages(inpformer_jax.__path__, "inpformer_jax."):
  if not m.name.startswith(skip):
    importlib.import_module(m.name)
from jax._src import xla_bridge
assert not xla_bridge.backends_are_initialized(), "an import ran a JAX computation"
print("ok", len(sys.modules))
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ))
  assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_golden_fixture_fails_under_ci_and_skips_elsewhere(tmp_path, ci):
  test = "tests/test_metrics.py::test_official_matches_golden_oracle"
  env = dict(os.environ, CI=ci, INPFORMER_GOLDEN=str(tmp_path / "no_golden"))
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                      test], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  missing = str(tmp_path / "no_golden" / "metrics_dev.npz")
  if ci:
    assert r.returncode == 1 and ("1 failed" in r.stdout or "1 error" in r.stdout), r.stdout[-2000:]
  else:
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
  assert missing in r.stdout
