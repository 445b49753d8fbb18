"""The five settings, and what a config must satisfy before anything runs.

The settings differ in config only (`configs/common.py::apply_setting`):
  multi_class / super_multi_class  one model on the union of the training sets;
  single_class                     the same loop once per class, in WORKDIR/<dataset>/<class>;
  few_shot                         k shots per class x 22 fixed augmentations as the source;
  zero_shot                        no training: the source model (config.init_from) scores
                                   the target with its INP-distance map.
"""

from __future__ import annotations

from inpformer_jax import anomaly_map
from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax import metrics

SETTINGS = ("multi_class", "single_class", "few_shot", "zero_shot", "super_multi_class")
MODES = ("train", "eval", "train_and_eval")


class ConfigError(errors.UserError, ValueError):
  """A user mistake in the config; the message names the field and the fix."""


def check_config(config, mode: str = "train_and_eval") -> None:
  """Raises ConfigError for a config that cannot run, before any data or model is touched."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r}: {', '.join(MODES)}")
  if config.setting not in SETTINGS:
    raise ConfigError(f"config.setting={config.setting!r}; choose one of {SETTINGS}")
  if config.setting == "zero_shot" and not config.init_from:
    raise ConfigError("setting=zero_shot evaluates a trained source model: pass "
                      "--config.init_from=WORKDIR_OF_THE_SOURCE_RUN (or a converted params dir)")
  if config.eval.protocol not in metrics.PROTOCOLS:
    raise ConfigError(f"config.eval.protocol={config.eval.protocol!r}: one of "
                      f"{metrics.PROTOCOLS}")
  if config.eval.map not in anomaly_map.MAP_KINDS:
    raise ConfigError(f"config.eval.map={config.eval.map!r}: one of {anomaly_map.MAP_KINDS}")
  # Paths that are read only after the model is built: a mistake in them costs no wait.
  if config.init_from and checkpoint.kind_of(config.init_from) == "none":
    raise ConfigError(checkpoint.explain_unusable(config.init_from, "config.init_from"))
  if config.resume and checkpoint.kind_of(config.resume) != "workdir":
    raise ConfigError(f"config.resume={config.resume} is not a training workdir (it has no "
                      f"{checkpoint.CKPT_SUBDIR}/); name the workdir of the run to continue")
