"""configure_cpu_flags sets XLA_FLAGS only when the user did not."""

import os

from inpformer_jax import xla_flags


def test_sets_defaults_when_unset(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(xla_flags, "_backends_initialized", lambda: False)
  assert xla_flags.configure_cpu_flags() == " ".join(xla_flags.DEFAULT_CPU_FLAGS)
  assert os.environ["XLA_FLAGS"] == " ".join(xla_flags.DEFAULT_CPU_FLAGS)


def test_respects_user_setting_even_empty(monkeypatch):
  for value in ("--xla_cpu_multi_thread_eigen=false", ""):
    monkeypatch.setenv("XLA_FLAGS", value)
    assert xla_flags.configure_cpu_flags() is None
    assert os.environ["XLA_FLAGS"] == value
