"""What keeps a training run from losing work or saving bad work (used by `train._loop`).

  run_fingerprint   what made a state (data, model, optimiser); sealed with every checkpoint
  resume_check      a checkpoint made by other settings stops the resumed run, listing them
  Preemption        SIGTERM -> a checkpoint at the next step boundary, then the run ends
  all_finite        the state is checked before each save
  diverged          a non-finite loss: the checkpoints whose state led to it are set aside
"""

from __future__ import annotations

import json
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax import feature_cache

# Config fields that decide which state a step produces. Logging, checkpointing, evaluation
# and the mesh do not (batches are global; sharding changes no value).
_FINGERPRINTED = ("seed", "setting", "model", "optim", "loss", "few_shot", "data.resize",
                  "data.crop", "train.batch_size", "train.cache_features")


class TrainingDiverged(errors.UserError, FloatingPointError):
  """A non-finite loss or state; the message names the last good checkpoint."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name  (not an error: a stop)
  """The run saved a checkpoint on SIGTERM and stopped; running it again resumes."""

  def __init__(self, step: int, directory):
    super().__init__(f"preempted (SIGTERM): checkpoint of step {step} saved in {directory}; "
                     "run the same command again to resume")
    self.step = step


def _flat(prefix: str, value) -> dict:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flat(f"{prefix}.{k}", v))
    return out
  return {prefix: json.loads(json.dumps(value, default=str))}


def run_fingerprint(config, source, total_steps: int, encoder_weights: str) -> dict:
  """A flat dict of everything that decides the states a run goes through."""
  fp = {"data.train_source": source.fingerprint(), "data.train_images": len(source),
        "train.total_steps": total_steps, "encoder_weights": encoder_weights,
        # each process keeps its own data position in the checkpoint
        "processes": jax.process_count()}
  for field in _FINGERPRINTED:
    if field == "few_shot" and config.setting != "few_shot":
      continue
    node = config
    for part in field.split("."):
      node = node[part]
    fp.update(_flat(field, node))
  if config.train.cache_features:  # the cached order depends on the shard count
    fp["train.cache_shards"] = feature_cache.num_shards(config)
    if config.train.cache_dtype != "float32":  # absent: float32, as before the field existed
      fp["train.cache_dtype"] = config.train.cache_dtype
  return fp


def resume_check(now: dict, allow: bool, log):
  """-> check(step, seal) for `TrainCheckpointer.restore`: a step made by another run's
  settings stops the resumed run (UserError listing them), or with `allow` a warning."""

  def check(step: int, seal: dict) -> None:
    diff = checkpoint.differences(seal.get("fingerprint", {}), now)
    if not diff:
      return
    if allow:
      log(f"WARNING: resuming step {step} with changed settings "
          f"(config.train.allow_resume_changes): {'; '.join(diff)}")
      return
    raise errors.UserError(
        f"checkpoint step {step} was made by other settings: {'; '.join(diff)}. Resume anyway "
        "with --config.train.allow_resume_changes=True, or train in a new --workdir")

  return check


class Preemption:
  """SIGTERM -> `reached(step)` is True at the next step boundary.

  One process: a handler for SIGTERM, installed while the loop runs. Several: JAX's preemption
  sync point (jax.distributed's service receives the signal on any host), so that all
  processes save the same step.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._requested.is_set()
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False


@jax.jit
def all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def diverged(ck: checkpoint.TrainCheckpointer, step: int, what: str, *,
             bad_state: int) -> TrainingDiverged:
  """Sets aside every checkpoint from step `bad_state` on (the first state that gave a
  non-finite value: a loss at step s comes from the state of step s - 1) -> the error that
  names the last good one."""
  ck.wait_until_finished()
  moved = [s for s in ck.all_steps() if s >= bad_state]
  for s in moved:
    ck.set_aside(s, checkpoint.DIVERGED)
  good = ck.all_steps()
  aside = (f" Checkpoint(s) {moved} led to it and were moved to <step>{checkpoint.DIVERGED}."
           if moved else "")
  if good:
    loss = ck.seal(good[-1]).get("metrics", {}).get("loss")
    tail = (f" The last good checkpoint is step {good[-1]} in {ck.directory}"
            + (f" (loss {loss:.4g})" if loss is not None else "")
            + ": lower --config.optim.lr and rerun with "
            "--config.train.allow_resume_changes=True to continue from it.")
  else:
    tail = (" No checkpoint before it is good: a rerun (e.g. with a lower --config.optim.lr) "
            "starts from step 0.")
  return TrainingDiverged(f"{what} at step {step}; training stopped.{aside}{tail}")


def finite_rows(rows) -> tuple[np.ndarray, int | None]:
  """-> (losses, index of the first non-finite loss or grad norm, or None)."""
  losses = np.array([m["loss"] for m in rows])
  ok = np.isfinite(losses) & np.isfinite(np.array([m["grad_norm"] for m in rows]))
  return losses, None if ok.all() else int(np.argmin(ok))
