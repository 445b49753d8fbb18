"""The PyTorch side of a side-by-side benchmark in a process of its own, timed on request.

The JAX side runs in the parent; the two alternate (`Worker.seconds(n)` blocks until the
worker has run n calls), so a change of machine load hits both, and neither side's idle
threads spin beside the other. The worker is spawned with the parent's environment, so it
runs under the parent's allocator (tcmalloc after `allocator.use_tcmalloc()`), or, with
`allocator="system"`, under the system malloc, as the official code runs when launched
plainly.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os

SAME, SYSTEM = "same", "system"
TINY = "tiny"  # bench.TINY, named without importing torch into the JAX process


def _serve(conn, kind: str, args: tuple, kwargs: dict, warmup: int) -> None:
  from benchmarks.torch_reference import bench  # pylint: disable=g-import-not-at-top
  from inpformer_jax import allocator  # pylint: disable=g-import-not-at-top
  make = {"train": bench.train_step_fn, "infer": bench.infer_fn}[kind]
  variant, *rest = args
  fn = make(bench.TINY if variant == TINY else variant, *rest, **kwargs)
  bench.time_calls(fn, warmup, 1)
  conn.send(allocator.describe())
  while (n := conn.recv()) is not None:
    conn.send(sum(bench.time_calls(fn, 0, n)))


@contextlib.contextmanager
def _environment(allocator: str):
  """os.environ as the worker should inherit it."""
  if allocator == SAME:
    yield
    return
  if allocator != SYSTEM:
    raise ValueError(f"allocator {allocator!r}: choose {SAME!r} or {SYSTEM!r}")
  saved = os.environ.pop("LD_PRELOAD", None)
  try:
    yield
  finally:
    if saved is not None:
      os.environ["LD_PRELOAD"] = saved


class Worker:
  """kind 'train' (bench.train_step_fn) or 'infer' (bench.infer_fn) with *args/**kwargs (the
  variant first: 'small', 'base', 'large' or TINY), built and warmed up (`warmup` calls) in a
  spawned process before the constructor returns. `allocator` names the worker's allocator
  as it reports it (`allocator.describe()`)."""

  def __init__(self, kind: str, *args, warmup: int = 2, allocator: str = SAME, **kwargs):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_serve, args=(child, kind, args, kwargs, warmup))
    with _environment(allocator):
      self._proc.start()
    self.allocator = self._conn.recv()

  def seconds(self, n: int) -> float:
    """Wall seconds of n calls, run now."""
    self._conn.send(n)
    return self._conn.recv()

  def close(self) -> None:
    self._conn.send(None)
    self._proc.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
