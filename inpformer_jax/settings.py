"""The five settings, and what a config must satisfy before anything runs.

The settings differ in config only (`configs/common.py::apply_setting`; `--config.setting=X`
gives the same run, the values that depend on the setting being resolved here, from the final
config: `map_kind`):
  multi_class / super_multi_class  one model on the union of the training sets;
  single_class                     the same loop once per class, in WORKDIR/<dataset>/<class>;
  few_shot                         k shots per class x 22 fixed augmentations as the source;
  zero_shot                        no training: the source model (config.init_from) scores
                                   the target with its INP-distance map (config.data.train
                                   names the source dataset: it must not be a target).
"""

from __future__ import annotations

from inpformer_jax import anomaly_map
from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax import metrics

SETTINGS = ("multi_class", "single_class", "few_shot", "zero_shot", "super_multi_class")
MODES = ("train", "eval", "train_and_eval")
# The anomaly map of a setting when config.eval.map is None: zero-shot has no decoder trained
# on the target, so it scores with the INP distance (SPEC §6, §7.3); every other, reconstruction.
DEFAULT_MAP = "reconstruction"
_SETTING_MAP = {"zero_shot": "inp_distance"}
CACHE_DTYPES = ("float32", "bfloat16")  # config.train.cache_dtype (`feature_cache`)


class ConfigError(errors.UserError, ValueError):
  """A user mistake in the config; the message names the field and the fix."""


def map_kind(config) -> str:
  """The map a run scores with: config.eval.map, or (None) its setting's. Every reader of the
  map kind (evaluation, the report's info, a finished run's config.json) goes through this."""
  kind = config.eval.get("map")
  return kind if kind is not None else _SETTING_MAP.get(config.get("setting"), DEFAULT_MAP)


def check_shots(shots, field: str = "config.few_shot.shots") -> None:
  """Few-shot takes any k >= 1 normal images per class, as the official script does."""
  if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
    raise ConfigError(f"{field}={shots!r}: the normal images per class, an integer >= 1")


def comma_list(field: str | None) -> list[str]:
  """'mvtec, visa' (config.data.train / .test / .categories.NAME) -> ['mvtec', 'visa']."""
  return [n.strip() for n in (field or "").split(",") if n.strip()]


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
  if map_kind(config) not in anomaly_map.MAP_KINDS:
    raise ConfigError(f"config.eval.map={config.eval.map!r}: one of {anomaly_map.MAP_KINDS} "
                      "(or None: the setting's)")
  if config.setting == "few_shot":
    check_shots(config.few_shot.shots)
  if config.train.cache_dtype not in CACHE_DTYPES:
    raise ConfigError(f"config.train.cache_dtype={config.train.cache_dtype!r}: one of "
                      f"{CACHE_DTYPES}")
  _check_datasets_of_setting(config)
  # Paths that are read only after the model is built: a mistake in them costs no wait.
  if config.init_from and checkpoint.kind_of(config.init_from) == "none":
    raise ConfigError(checkpoint.explain_unusable(config.init_from, "config.init_from"))
  if config.resume and checkpoint.kind_of(config.resume) != "workdir":
    raise ConfigError(f"config.resume={config.resume} is not a training workdir (it has no "
                      f"{checkpoint.CKPT_SUBDIR}/); name the workdir of the run to continue")


def _check_datasets_of_setting(config) -> None:
  """What `configs/FILE.py:setting=X` sets about the data, refused when `--config` left it out."""
  train, test = comma_list(config.data.train), comma_list(config.data.test)
  if config.setting == "zero_shot" and set(train) & set(test):
    raise ConfigError(
        f"setting=zero_shot: config.data.train={config.data.train!r} names the source model's "
        f"dataset and must not be a target (config.data.test={config.data.test!r}); pass "
        "--config.data.train=SOURCE (what configs/FILE.py:setting=zero_shot,source=SOURCE sets)")
  if config.setting == "super_multi_class" and len(train) < 2:
    raise ConfigError(
        f"setting=super_multi_class trains one model on several datasets, config.data.train="
        f"{config.data.train!r} names one; use --config configs/super_multi_class.py, list them "
        "(--config.data.train=mvtec,visa,realiad) or use setting=multi_class")
