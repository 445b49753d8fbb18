"""configs/: every config file documents its command, the defaults are the official recipe,
and a wrong config argument is a clear error."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, demo, mvtec, realiad, super_multi_class, visa
from inpformer_jax import settings

FILES = {"mvtec": mvtec, "visa": visa, "realiad": realiad, "demo": demo,
         "super_multi_class": super_multi_class}


@pytest.mark.parametrize("module", [mvtec, visa, realiad, super_multi_class, demo])
def test_config_docstring_starts_with_its_command(module):
  first = module.__doc__.strip().splitlines()[0:3]
  assert any(l.strip().startswith("python -m inpformer_jax.main --config configs/") for l in first)
  assert module.get_config() is not None


def test_defaults_are_the_official_recipe():
  c = mvtec.get_config()
  assert c.model.encoder == "dinov2reg_vit_base_14" and c.model.num_inps == 6
  assert (c.data.resize, c.data.crop, c.model.image_size) == (448, 392, 392)
  assert (c.train.batch_size, c.train.epochs, c.seed) == (16, 200, 1)
  assert (c.optim.lr, c.optim.final_lr, c.optim.warmup_steps, c.optim.clip_norm,
          c.optim.weight_decay) == (1e-3, 1e-4, 100, 0.1, 1e-4)
  assert c.setting == "multi_class" and c.eval.protocol == "official"
  assert mvtec.get_config("setting=few_shot,shots=2").few_shot.shots == 2
  assert settings.map_kind(visa.get_config("setting=zero_shot,source=mvtec")) == "inp_distance"
  assert super_multi_class.get_config().data.train == "mvtec,visa,realiad"
  assert common.SETTINGS is settings.SETTINGS  # one definition of the five settings


def test_bad_config_arguments_are_clear():
  with pytest.raises(ValueError, match="unknown config argument 'shot'"):
    mvtec.get_config("shot=4")
  with pytest.raises(ValueError, match="setting='few'"):
    mvtec.get_config("setting=few")
  with pytest.raises(ValueError, match="configs/mvtec.py: shots=0: .* integer >= 1"):
    mvtec.get_config("setting=few_shot,shots=0")
  with pytest.raises(ValueError, match="source='mvtec'"):
    mvtec.get_config("setting=zero_shot,source=mvtec")


def test_check_config_names_the_field():
  c = mvtec.get_config("runlocal=True")
  settings.check_config(c)
  for field, value, match in (("setting", "many_class", "config.setting='many_class'"),
                              ("eval.protocol", "fast", "config.eval.protocol='fast'"),
                              ("eval.map", "heat", "config.eval.map='heat'"),
                              ("train.cache_dtype", "float16",
                               r"config.train.cache_dtype='float16': one of \('float32', ")):
    bad = mvtec.get_config("runlocal=True")
    *parents, last = field.split(".")
    node = bad
    for part in parents:
      node = node[part]
    node[last] = value
    with pytest.raises(settings.ConfigError, match=match):
      settings.check_config(bad)
  with pytest.raises(settings.ConfigError, match="--mode='fit'"):
    settings.check_config(c, "fit")


@pytest.mark.parametrize("name", list(FILES))
def test_every_config_file_takes_the_same_arguments(name):
  """One parser: a bare boolean is True, and each file's settings take shots= / source=."""
  get = FILES[name].get_config
  assert get("runlocal").to_dict() == get("runlocal=True").to_dict() != get().to_dict()
  assert get("runlocal").runlocal and get("runlocal").model.width == 32
  if name == "super_multi_class":
    assert get().setting == "super_multi_class"
    return
  assert get("setting=single_class,runlocal").setting == "single_class"
  for k in (1, 3, 7):  # any k, as the official script
    assert get(f"setting=few_shot,shots={k}").few_shot.shots == k
  source = "visa" if name == "realiad" else "realiad"
  zero = get(f"setting=zero_shot,source={source}")
  assert (zero.data.train, zero.data.test) == (source, name)


@pytest.mark.parametrize("name,arg,match", [
    ("mvtec", "setting=super_multi_class", "use --config configs/super_multi_class.py"),
    ("demo", "setting=super_multi_class", "use --config configs/super_multi_class.py"),
    ("super_multi_class", "setting=few_shot", "use --config configs/mvtec.py:setting=few_shot"),
    ("visa", "encoder=lite0", ("encoder= is an argument of configs/demo.py; here pass "
                               "--config.model.encoder=NAME")),
    ("realiad", "shots=2", "shots= applies to setting=few_shot only; add setting=few_shot"),
    ("demo", "source=mvtec", "source= applies to setting=zero_shot only"),
    ("mvtec", "shots", "config argument 'shots' needs a value"),
    ("mvtec", "setting=few_shot,shots=-1", "shots=-1: .* integer >= 1"),
    ("super_multi_class", "runlocal=maybe", "runlocal='maybe': expected True or False"),
    ("demo", "setting=zero_shot,source=demo", "source='demo': .* another than the target"),
])
def test_an_argument_a_file_does_not_take_names_the_file_and_the_fix(name, arg, match):
  with pytest.raises(ValueError, match=f"^configs/{name}.py: .*{match}"):
    FILES[name].get_config(arg)


def _flags_config(*args):
  """The config as inpformer_jax.main gets it from its command line."""
  argv = ["main", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


MVTEC = os.path.join(os.path.dirname(common.__file__), "mvtec.py")


def test_a_setting_means_the_same_given_either_way():
  """`FILE.py:setting=zero_shot` and `--config.setting=zero_shot` (with the source named):
  the same config, the same map; an explicit eval.map wins either way."""
  by_arg = _flags_config(f"--config={MVTEC}:setting=zero_shot,source=visa")
  by_field = _flags_config(f"--config={MVTEC}", "--config.setting=zero_shot",
                           "--config.data.train=visa")
  assert by_arg.to_dict() == by_field.to_dict()
  assert settings.map_kind(by_arg) == settings.map_kind(by_field) == "inp_distance"
  assert settings.map_kind(_flags_config(f"--config={MVTEC}")) == "reconstruction"
  for given in ([f"--config={MVTEC}:setting=zero_shot"],
                [f"--config={MVTEC}", "--config.setting=zero_shot", "--config.data.train=visa"]):
    explicit = _flags_config(*given, "--config.eval.map=reconstruction")
    assert settings.map_kind(explicit) == "reconstruction"
  few = (_flags_config(f"--config={MVTEC}:setting=few_shot,shots=3"),
         _flags_config(f"--config={MVTEC}", "--config.setting=few_shot",
                       "--config.few_shot.shots=3"))
  assert few[0].to_dict() == few[1].to_dict()


def test_check_config_refuses_what_a_setting_given_as_a_field_left_out():
  zero = mvtec.get_config("runlocal")
  zero.setting, zero.init_from = "zero_shot", "/some/source_run"
  with pytest.raises(settings.ConfigError, match="must not be a target .* pass "
                                                 "--config.data.train=SOURCE"):
    settings.check_config(zero)
  few = mvtec.get_config("runlocal")
  few.setting, few.few_shot.shots = "few_shot", 0
  with pytest.raises(settings.ConfigError, match=r"config.few_shot.shots=0: .* integer >= 1"):
    settings.check_config(few)
  few.setting = "multi_class"  # shots are read by few-shot only
  settings.check_config(few)
  superset = mvtec.get_config("runlocal")
  superset.setting = "super_multi_class"
  with pytest.raises(settings.ConfigError, match="use --config configs/super_multi_class.py"):
    settings.check_config(superset)
  settings.check_config(super_multi_class.get_config("runlocal"))
