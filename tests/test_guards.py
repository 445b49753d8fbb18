"""The run's guards on their own (the trainer's use of them: tests/test_train.py)."""

import os
import signal

import numpy as np
import pytest

from configs import demo
from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax import guards
from inpformer_jax.data import sources


def test_sigterm_is_caught_only_while_the_loop_runs():
  before = signal.getsignal(signal.SIGTERM)
  with guards.Preemption() as preemption:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled by Python at the next bytecode
    assert preemption.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before  # a server process keeps its own handler


def test_all_finite_sees_one_bad_value_anywhere():
  tree = {"a": np.zeros((3, 3), np.float32), "b": {"c": np.ones(4, np.float32)},
          "step": np.int32(7)}
  assert bool(guards.all_finite(tree))
  for value in (np.nan, np.inf):
    bad = {**tree, "b": {"c": np.array([1, 1, value, 1], np.float32)}}
    assert not bool(guards.all_finite(bad))


def test_the_fingerprint_lists_what_changed():
  config = demo.get_config("runlocal=True")
  source = sources.ArraySource(np.zeros((4, 8, 8, 3), np.float32))
  fp = guards.run_fingerprint(config, source, 10, "random")
  assert fp["optim.lr"] == config.optim.lr and fp["train.total_steps"] == 10
  assert not any(k.startswith("few_shot") for k in fp)  # not a few-shot run
  config.optim.lr, config.train.log_every_steps = 0.5, 999  # logging makes no other state
  changed = guards.run_fingerprint(config, sources.ArraySource(np.ones((4, 8, 8, 3), np.float32)),
                                   10, "random")
  diff = checkpoint.differences(fp, changed)
  assert [d.split(":")[0] for d in diff] == ["data.train_source", "optim.lr"], diff
  check = guards.resume_check(changed, allow=False, log=pytest.fail)
  with pytest.raises(errors.UserError, match="optim.lr: 0.001 -> 0.5"):
    check(7, {"fingerprint": fp})
  warnings = []
  guards.resume_check(changed, allow=True, log=warnings.append)(7, {"fingerprint": fp})
  assert len(warnings) == 1 and "allow_resume_changes" in warnings[0]
  # a bfloat16 feature cache trains from other values than a float32 one
  config.train.cache_features = True
  cached = guards.run_fingerprint(config, source, 10, "random")
  config.train.cache_dtype = "bfloat16"
  diff = checkpoint.differences(cached, guards.run_fingerprint(config, source, 10, "random"))
  assert [d.split(":")[0] for d in diff] == ["train.cache_dtype"], diff
