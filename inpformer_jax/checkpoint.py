"""What lies on disk: params directories, training checkpoints and which of them a path is.

A *params directory* is what the conversions write and what `config.init_from` /
`config.model.encoder_weights` name: `DIR/params/` (an orbax PyTree checkpoint of float32
numpy arrays) plus `DIR/meta.json` (what the params are: kind, architecture, source file).

A *training workdir* holds `config.json` and `ckpt/<step>/`: an orbax CheckpointManager with
two items, `state` (params, opt_state, step, rng) and `data` (the grain iterator position, one
JSON file per process). Orbax writes each step into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous steps intact. `inpformer_jax.loading`
turns either kind, or an official `model.pth`, into a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "meta.json"
PARAMS_SUBDIR = "params"
CKPT_SUBDIR = "ckpt"
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "calibration.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class CheckpointError(ValueError):
  """A path that holds no usable checkpoint; the message names it and the fix."""


def save_params(directory: str | os.PathLike, params: Any, meta: dict) -> Path:
  """Writes `params` (nested dict of arrays) and `meta` (JSON-able) to `directory`."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / PARAMS_SUBDIR
  if target.exists():
    raise FileExistsError(f"{target} already exists; choose an empty output directory")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
  if jax.process_index() == 0:  # multi-process: orbax wrote the params from process 0 too
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)
  return directory


def load_params(directory: str | os.PathLike) -> tuple[dict, dict]:
  """Reads a params directory written by `save_params` -> (params as numpy, meta)."""
  directory = Path(directory).absolute()
  if kind_of(directory) != "params_dir":
    raise CheckpointError(
        f"{directory} is not a converted params directory (expected {META_FILE} and "
        f"{PARAMS_SUBDIR}/); create one with weights_conversion/convert_dinov2.py or "
        f"weights_conversion/convert_inpformer.py")
  meta = json.loads((directory / META_FILE).read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / PARAMS_SUBDIR)
  return jax.tree.map(np.asarray, params), meta


def kind_of(path: str | os.PathLike) -> str:
  """'workdir' | 'params_dir' | 'torch_file' | 'none' (nothing usable there)."""
  p = Path(path)
  if p.is_dir() and (p / CKPT_SUBDIR).is_dir():
    return "workdir"
  if p.is_dir() and (p / META_FILE).is_file() and (p / PARAMS_SUBDIR).is_dir():
    return "params_dir"
  if p.is_file() and p.suffix.lower() in TORCH_SUFFIXES:
    return "torch_file"
  return "none"


def explain_unusable(path: str | os.PathLike, flag: str) -> str:
  """One line saying why `path` (given as `flag`) is not a checkpoint, and what would be."""
  p = Path(path).absolute()
  if not p.exists():
    return f"{flag} {p} does not exist"
  subs = sorted(q.parent.relative_to(p) for q in p.glob(f"*/*/{CONFIG_FILE}")) if p.is_dir() else []
  hint = f" (single-class runs keep one workdir per class, e.g. {p / subs[0]})" if subs else ""
  return (f"{flag} {p} is neither a training workdir ({CKPT_SUBDIR}/), a converted params dir "
          f"({META_FILE} + {PARAMS_SUBDIR}/) nor a torch checkpoint file "
          f"({', '.join(TORCH_SUFFIXES)}){hint}")


def calibration_path(checkpoint: str | os.PathLike) -> Path:
  """Where calibration.json lives: inside a workdir / params dir; beside a torch file
  (<file>.calibration.json)."""
  p = Path(checkpoint).absolute()
  return p / CALIBRATION_FILE if p.is_dir() else p.with_name(p.name + "." + CALIBRATION_FILE)


def read_calibration(path: str | os.PathLike) -> dict | None:
  p = Path(path)
  return json.loads(p.read_text()) if p.is_file() else None


class TrainCheckpointer:
  """Thin orbax wrapper: save every N steps and at the end, restore the newest readable step."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               save_interval_steps: int = 1000):
    self.directory = Path(workdir).absolute() / CKPT_SUBDIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any = None, data_iterator=None, *,
              log: Callable[[str], None] = print, set_aside: bool = False):
    """-> (state, step) from the newest step that reads back, or (None, None).

    abstract_state: the (sharded) ShapeDtypeStructs to restore into; None restores the state
    as saved, on this process's first device (whatever topology saved it). A step that
    fails to restore (a damaged file) is reported through `log` and the next older one is
    tried, so one bad checkpoint costs at most `save_interval_steps` steps. set_aside: the
    run that owns the directory moves such a step to `<step>.damaged`, so that it can write
    the step again; readers (predict, eval, init_from, resume from another run) never
    change a checkpoint directory.
    """
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state, fallback_sharding=fallback)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        bad = self.directory / f"{step}.damaged"
        log(f"WARNING: checkpoint {self.directory / str(step)} does not read back "
            f"({type(e).__name__}: {str(e)[:300]})"
            + (f"; moved to {bad}" if set_aside else "") + "; trying the previous one.")
        if set_aside:
          if jax.process_index() == 0:
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
