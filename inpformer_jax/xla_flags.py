"""XLA CPU flags this project sets by default (call before JAX creates its CPU backend).

Measured with benchmarks/encoder_forward.py (see README, "DINOv2 encoder"): on the CPU, XLA's
YNNPACK fusions made the ViT forward slower than with XLA's own emitters, so we switch them
off. GPU/TPU backends ignore XLA CPU flags.
"""

from __future__ import annotations

import os
import warnings

try:  # private API, only to warn about a late call: if it moves, the warning is skipped
  from jax._src import xla_bridge
except ImportError:
  xla_bridge = None

# Empty fusion type = no YNNPACK fusions (dots and elementwise ops go to XLA's emitters).
DEFAULT_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_cpu_flags(flags: tuple[str, ...] = DEFAULT_CPU_FLAGS) -> str | None:
  """Sets XLA_FLAGS to `flags` unless the user already set XLA_FLAGS; returns what was set.

  XLA reads XLA_FLAGS once, when the first backend is created, so call this before the first
  JAX computation (importing jax is fine). It does nothing (returns None) if XLA_FLAGS is set,
  even to an empty string, so a user can always opt out with `XLA_FLAGS= python ...`.
  """
  if "XLA_FLAGS" in os.environ:
    return None
  if _backends_initialized():
    warnings.warn("configure_cpu_flags() called after JAX created its backends; the XLA CPU "
                  "flags take effect only in a new process", stacklevel=2)
  value = " ".join(flags)
  os.environ["XLA_FLAGS"] = value
  return value


def _backends_initialized() -> bool:
  try:
    return bool(xla_bridge.backends_are_initialized())
  except AttributeError:
    return False
