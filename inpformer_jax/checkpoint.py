"""What lies on disk: params directories, training checkpoints and which of them a path is.

A *params directory* is what the conversions write and what `config.init_from` /
`config.model.encoder_weights` name: `DIR/params/` (an orbax PyTree checkpoint of float32
numpy arrays) plus `DIR/meta.json` (what the params are: kind, architecture, source file).

A *training workdir* holds `config.json` and `ckpt/<step>/`: an orbax CheckpointManager with
two items, `state` (params, opt_state, step, rng) and `data` (the grain iterator position, one
JSON file per process). Orbax writes each step into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous steps intact. `inpformer_jax.loading`
turns either kind, or an official `model.pth`, into a model.

Both kinds are sealed: `inpformer_seal.json` holds the SHA-256 of every file beside it (orbax's
compressed frames carry no checksum of their own, so a flipped byte would otherwise restore as
a changed parameter) and is itself hashed. A training step is sealed once orbax has finished
it, with the run's fingerprint (what data, model and optimiser made it); a step without a
valid seal is damaged, never restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from inpformer_jax import errors

META_FILE = "meta.json"
PARAMS_SUBDIR = "params"
CKPT_SUBDIR = "ckpt"
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "calibration.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
SEAL_FILE = "inpformer_seal.json"
DAMAGED = ".damaged"    # a step that failed its seal or its restore, set aside
DIVERGED = ".diverged"  # a step whose state led to a non-finite loss, set aside
_CHUNK = 1 << 22


class CheckpointError(errors.UserError, ValueError):
  """A path that holds no usable checkpoint; the message names it and the fix."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint whose seal is missing or does not match its files."""


def _digests(directory: Path, roots=None) -> dict[str, str]:
  """SHA-256 of every file under `directory` (only under its entries `roots`, if given)."""
  out = {}
  for path in sorted(directory.rglob("*")):
    rel = path.relative_to(directory)
    if path.is_file() and str(rel) != SEAL_FILE and (roots is None or rel.parts[0] in roots):
      h = hashlib.sha256()
      with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
          h.update(chunk)
      out[str(rel)] = h.hexdigest()
  return out


def _self_hash(body: dict) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                        ).hexdigest()


def write_seal(directory: str | os.PathLike, roots=None, **fields) -> None:
  """Seals `directory` (only its entries `roots`, if given; files added beside them later,
  e.g. calibration.json, are not part of it): the SHA-256 of every file, `fields`, and a
  hash of both."""
  directory = Path(directory)
  body = {"files": _digests(directory, roots), **fields}
  tmp = directory / (SEAL_FILE + ".tmp")
  tmp.write_text(json.dumps({**body, "sha256": _self_hash(body)}, indent=1, sort_keys=True))
  tmp.replace(directory / SEAL_FILE)


def read_seal(directory: str | os.PathLike, *, verify: bool = True) -> dict:
  """The seal's fields; verify: every file hashed again and compared (DamagedCheckpoint)."""
  directory = Path(directory)
  path = directory / SEAL_FILE
  if not path.is_file():
    raise DamagedCheckpoint(f"it has no {SEAL_FILE} (its save never completed)")
  try:
    seal = json.loads(path.read_text())
    body = {k: v for k, v in seal.items() if k != "sha256"}
    intact = seal.get("sha256") == _self_hash(body) and isinstance(body.get("files"), dict)
  except (ValueError, AttributeError):
    intact = False
  if not intact:
    raise DamagedCheckpoint(f"its {SEAL_FILE} is damaged")
  if verify:
    want = body["files"]
    now = _digests(directory, {Path(k).parts[0] for k in want})
    bad = sorted(k for k in want if k in now and now[k] != want[k])
    missing, extra = sorted(set(want) - set(now)), sorted(set(now) - set(want))
    if bad or missing or extra:
      parts = [f"{len(v)} file(s) {what} (e.g. {v[0]})" for v, what in (
          (bad, "differ from their checksum"), (missing, "missing"), (extra, "not sealed"))
               if v]
      raise DamagedCheckpoint("; ".join(parts))
  return body


def differences(saved: dict, now: dict) -> list[str]:
  """'key: saved -> now' for every key of two flat fingerprints that differs."""
  return [f"{k}: {saved.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
          for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


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
    write_seal(directory, roots=(PARAMS_SUBDIR, META_FILE))
  return directory


def load_params(directory: str | os.PathLike) -> tuple[dict, dict]:
  """Reads a params directory written by `save_params` -> (params as numpy, meta)."""
  directory = Path(directory).absolute()
  if kind_of(directory) != "params_dir":
    raise CheckpointError(
        f"{directory} is not a converted params directory (expected {META_FILE} and "
        f"{PARAMS_SUBDIR}/); create one with weights_conversion/convert_dinov2.py or "
        f"weights_conversion/convert_inpformer.py")
  if (directory / SEAL_FILE).exists():
    try:
      read_seal(directory)
    except DamagedCheckpoint as e:
      raise DamagedCheckpoint(f"{directory} is damaged: {e}; convert or copy it again") from None
  else:
    print(f"WARNING: {directory} has no {SEAL_FILE} (written before checksums existed): it "
          "cannot be checked for damage; convert it again to seal it", file=sys.stderr)
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
  """Orbax's CheckpointManager with seals: save every N steps and at the end, restore the
  newest step whose seal verifies.

  fingerprint: a flat JSON-able dict sealed with every step this instance saves (what made the
  state: data, model, optimiser); `seal(step)` reads it back.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               save_interval_steps: int = 1000, fingerprint: dict | None = None):
    self.directory = Path(workdir).absolute() / CKPT_SUBDIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    self._fingerprint = dict(fingerprint or {})
    self._sealer: threading.Thread | None = None
    self._seal_failure: BaseException | None = None

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False,
           metrics: dict | None = None) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved. The step is
    sealed (with `metrics`, e.g. its loss) in the background once orbax has finished it."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._join_sealer()
      self._sealer = threading.Thread(target=self._seal, args=(step, dict(metrics or {})),
                                      name=f"seal-{step}")
      self._sealer.start()
    return saved

  def _seal(self, step: int, metrics: dict) -> None:
    try:
      self._mngr.wait_until_finished()
      if jax.process_index() == 0:  # one writer; the directory is shared by all processes
        write_seal(self.directory / str(step), step=step, fingerprint=self._fingerprint,
                   metrics=metrics)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by _join_sealer)
      self._seal_failure = e

  def _join_sealer(self) -> None:
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None
    if self._seal_failure is not None:
      failure, self._seal_failure = self._seal_failure, None
      raise failure

  def seal(self, step: int) -> dict:
    """The seal of a step already verified by `restore` (fields: step, fingerprint, metrics)."""
    return read_seal(self.directory / str(step), verify=False)

  def set_aside(self, step: int, suffix: str) -> Path:
    """Renames step to <step><suffix> (replacing an older one) so that it can be written
    again; every process must call it."""
    target = self.directory / f"{step}{suffix}"
    self._join_sealer()
    if jax.process_index() == 0:
      shutil.rmtree(target, ignore_errors=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"inpformer_set_aside_{step}")
    self._mngr.reload()
    return target

  def restore(self, abstract_state: Any = None, data_iterator=None, *,
              log: Callable[[str], None] = print, set_aside: bool = False,
              check: Callable[[int, dict], None] | None = None):
    """-> (state, step) from the newest step whose seal verifies; (None, None) when the
    directory holds no step at all.

    abstract_state: the (sharded) ShapeDtypeStructs to restore into; None restores the state
    as saved, on this process's first device (whatever topology saved it). A damaged step (its
    seal missing or not matching its files) is reported through `log` and the next older one
    is tried; the data iterator is not touched until a step restores. set_aside: the run that
    owns the directory renames damaged steps to `<step>.damaged`, so that it can write them
    again; readers (predict, eval, init_from, resume from another run) never change a
    checkpoint directory. When every step is damaged (or only steps set aside earlier remain)
    this raises CheckpointError: a run never starts over silently. check(step, seal) runs
    before the chosen step is restored (e.g. the resume fingerprint) and may raise.
    """
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    damaged = {int(p.name[:-len(DAMAGED)]) for p in self.directory.glob(f"*{DAMAGED}")
               if p.name[:-len(DAMAGED)].isdigit()}  # set aside by an earlier run
    for step in reversed(self.all_steps()):
      path = self.directory / str(step)
      try:
        seal = read_seal(path)
      except DamagedCheckpoint as e:
        damaged.add(step)
        moved = f"; moved to {self.set_aside(step, DAMAGED)}" if set_aside else ""
        log(f"WARNING: checkpoint {path} is damaged: {e}{moved}; trying the previous one.")
        continue
      if check is not None:
        check(step, seal)
      before = data_iterator.get_state() if data_iterator is not None else None
      items = {"state": ocp.args.StandardRestore(abstract_state, fallback_sharding=fallback)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        if before is not None:
          data_iterator.set_state(before)
        # Its files are intact (the seal verified): not damage, another model or run.
        raise CheckpointError(
            f"checkpoint {path} is intact but does not restore here ({type(e).__name__}: "
            f"{str(e)[:300]}); does the config (model, optimiser, process count) match the "
            "run that wrote it?") from e
      return restored["state"], step
    if damaged:
      raise CheckpointError(
          f"no usable checkpoint in {self.directory}: every step is damaged "
          f"({', '.join(map(str, sorted(damaged, reverse=True)))}). To start over on purpose, "
          f"move it aside "
          f"(mv {self.directory} {self.directory}.old) or use another workdir")
    return None, None

  def wait_until_finished(self):
    """Until the last save is written and sealed."""
    self._mngr.wait_until_finished()
    self._join_sealer()

  def close(self):
    try:
      self.wait_until_finished()
    finally:
      self._mngr.close()
