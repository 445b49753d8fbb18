"""The runs of a plan, in-process, each in WORKDIR/<run key>/, resumable, finished ones skipped.

A run is finished when its results.json is there and says it was made by this run (setting,
encoder, image size) at its final step (the trainer writes it only after the last step).
An unfinished run is started or, when its workdir holds a checkpoint, resumed by the trainer
itself. A zero-shot run evaluates its source run's model (config.init_from = that run's
workdir), so the source run comes first. SIGTERM (preemption) stops the current run at a
step boundary with a checkpoint, and the command ends: run it again to go on.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from inpformer_jax import errors
from inpformer_jax import settings
from inpformer_jax import train
from inpformer_jax.reproduce.plan import Planned

RESULTS = "results.json"


class RunError(errors.UserError, ValueError):
  """A run the plan cannot start (e.g. an unknown --only key); names the fix."""


def run_dir(workdir: str | Path, key: str) -> Path:
  return Path(workdir) / key


def read_results(workdir: str | Path, key: str) -> dict | None:
  path = run_dir(workdir, key) / RESULTS
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None  # cut by a kill while written: the run is evaluated again


def finished(workdir: str | Path, p: Planned) -> bool:
  """Whether the run's results.json is this run's, at its final step."""
  report = read_results(workdir, p.run.key)
  if report is None:
    return False
  info, c = report.get("info", {}), p.config
  same = (info.get("setting") == c.setting and info.get("encoder") == c.model.encoder
          and info.get("image_size") == f"{c.data.resize}->{c.data.crop}")
  if c.setting in ("single_class", "zero_shot"):
    return same  # written once every class is trained / from the source model
  return same and info.get("step") == p.steps


def execute(planned: list[Planned], workdir: str | Path, *, only: list[str] | None = None,
            recipes: train.Recipes | None = None, log=print) -> list[str]:
  """Runs what is not finished (only: these run keys); -> the keys finished afterwards.

  recipes: compiled steps to reuse (as train.train_and_evaluate's: runs of the same model
  and steps compile once; a caller running several plans in one process passes its own).
  Returns early when a run was stopped by SIGTERM (its checkpoint saved)."""
  keys = [p.run.key for p in planned]
  unknown = [k for k in only or () if k not in keys]
  if unknown:
    raise RunError(f"--only: no run {', '.join(unknown)} in the plan; its runs: {', '.join(keys)}")
  _check_roots([p for p in planned if (only is None or p.run.key in only)
                and not finished(workdir, p)])
  recipes = recipes or train.Recipes()
  done = []
  for i, p in enumerate(planned, 1):
    key = p.run.key
    if finished(workdir, p):
      log(f"[{i}/{len(planned)}] {key}: finished, skipped")
      done.append(key)
      continue
    if only is not None and key not in only:
      log(f"[{i}/{len(planned)}] {key}: not in --only, left for later")
      continue
    config = p.config
    if p.run.source_run is not None:
      source = p.run.source_run.key
      if source not in done:
        log(f"[{i}/{len(planned)}] {key}: waits for its source run {source}")
        continue
      config = copy.deepcopy(config)
      with config.unlocked():
        config.init_from = str(run_dir(workdir, source).absolute())
    log(f"[{i}/{len(planned)}] {key}: {p.steps} steps -> {run_dir(workdir, key)}")
    train.train_and_evaluate(config, str(run_dir(workdir, key)), recipes=recipes)
    if not finished(workdir, p):
      log(f"{key}: stopped before its end (checkpoint saved); run the same command again "
          "to resume it")
      return done
    done.append(key)
  return done


def _check_roots(planned: list[Planned]) -> None:
  """Every dataset root the runs to do read, checked before the first one starts."""
  missing = {}
  for p in planned:
    c = p.config
    which = ("test",) if c.setting == "zero_shot" else ("train", "test")
    for name in {n for w in which for n in settings.comma_list(c.data[w])}:
      if c.data.source == "files" and not os.path.isdir(c.data.roots[name]):
        missing.setdefault(name, (c.data.roots[name], []))[1].append(p.run.key)
  if missing:
    lines = [f"--config_overrides=data.roots.{n}=PATH: {root!r} is not a folder (needed by "
             f"{', '.join(keys)})" for n, (root, keys) in sorted(missing.items())]
    raise RunError("dataset roots not found; pass, or set $INPFORMER_DATA:\n" + "\n".join(lines))
