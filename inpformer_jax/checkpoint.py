"""Checkpoint I/O: converted-weight params directories and (below) training checkpoints.

A *params directory* is what the conversion CLIs write and what `config.init_from` /
`config.model.encoder.weights` name: `DIR/params/` (an orbax PyTree checkpoint of float32
numpy arrays) plus `DIR/meta.json` (what the params are: kind, architecture, source file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

META_FILE = "meta.json"
PARAMS_SUBDIR = "params"


def save_params(directory: str | os.PathLike, params: Any, meta: dict) -> Path:
  """Writes `params` (nested dict of arrays) and `meta` (JSON-able) to `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / PARAMS_SUBDIR
  if target.exists():
    raise FileExistsError(f"{target} already exists; choose an empty output directory")
  params = _to_numpy(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
    ckptr.wait_until_finished()
  if jax_process_index() == 0:  # multi-process: orbax wrote the params from process 0 too
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)
  return directory


def load_params(directory: str | os.PathLike) -> tuple[dict, dict]:
  """Reads a params directory written by `save_params` -> (params as numpy, meta)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = Path(directory).absolute()
  meta_path = directory / META_FILE
  if not meta_path.is_file() or not (directory / PARAMS_SUBDIR).is_dir():
    raise FileNotFoundError(
        f"{directory} is not a converted params directory (expected {META_FILE} and "
        f"{PARAMS_SUBDIR}/); create one with weights_conversion/convert_dinov2.py or "
        f"weights_conversion/convert_inpformer.py")
  meta = json.loads(meta_path.read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / PARAMS_SUBDIR)
  return _to_numpy(params), meta


def _to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(x), tree)


# ---------------------------------------------------------------------------------------
# Training checkpoints: an orbax CheckpointManager over WORKDIR/ckpt/<step>/ with two items,
# `state` (params, opt_state, step, rng: a pytree of jax arrays, restored into an abstract
# sharded state) and `data` (the grain iterator position, one JSON file per process). Orbax
# writes each step into a temporary folder and renames it when complete, so a process
# killed mid-save leaves the previous steps intact.
# ---------------------------------------------------------------------------------------

CKPT_SUBDIR = "ckpt"


class TrainCheckpointer:
  """Thin wrapper: save every N steps and at the end, restore the newest readable step."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               save_interval_steps: int = 1000, subdir: str = CKPT_SUBDIR):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.directory = Path(workdir).absolute() / subdir
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    import grain  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator=None, *, log=print):
    """-> (state, step) from the newest step that reads back, or (None, None).

    A step that fails to restore (a damaged file) is reported through `log` and the next
    older one is tried, so one bad checkpoint costs at most `save_interval_steps` steps.
    """
    import grain  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        # Moved aside (kept for inspection) so that this run can write the step again.
        bad = self.directory / f"{step}.damaged"
        log(f"WARNING: checkpoint {self.directory / str(step)} is damaged and was skipped "
            f"({type(e).__name__}: {str(e)[:300]}); moved to {bad}; trying the previous one.")
        if jax_process_index() == 0:
          shutil.rmtree(bad, ignore_errors=True)
          (self.directory / str(step)).rename(bad)
        self._mngr.reload()
        continue
      return restored["state"], step
    return None, None

  def wait_until_finished(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def find_params(path: str | os.PathLike) -> str:
  """What `config.init_from` may name -> kind: 'params_dir' or 'workdir'."""
  path = Path(path)
  if (path / META_FILE).is_file() and (path / PARAMS_SUBDIR).is_dir():
    return "params_dir"
  if (path / CKPT_SUBDIR).is_dir():
    return "workdir"
  raise FileNotFoundError(
      f"config.init_from={str(path)!r} is neither a converted params dir ({META_FILE} + "
      f"{PARAMS_SUBDIR}/, written by weights_conversion/) nor a training workdir (with "
      f"{CKPT_SUBDIR}/); fix the path")
