"""configs/: every config file documents its command, the defaults are the official recipe,
and a wrong config argument is a clear error."""

import pytest

from configs import common, demo, mvtec, realiad, super_multi_class, visa
from inpformer_jax import settings


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
  assert visa.get_config("setting=zero_shot,source=mvtec").eval.map == "inp_distance"
  assert super_multi_class.get_config().data.train == "mvtec,visa,realiad"
  assert common.SETTINGS is settings.SETTINGS  # one definition of the five settings


def test_bad_config_arguments_are_clear():
  with pytest.raises(ValueError, match="unknown config argument 'shot'"):
    mvtec.get_config("shot=4")
  with pytest.raises(ValueError, match="setting='few'"):
    mvtec.get_config("setting=few")
  with pytest.raises(ValueError, match="shots=3"):
    mvtec.get_config("setting=few_shot,shots=3")
  with pytest.raises(ValueError, match="source='mvtec'"):
    mvtec.get_config("setting=zero_shot,source=mvtec")


def test_check_config_names_the_field():
  c = mvtec.get_config("runlocal=True")
  settings.check_config(c)
  for field, value, match in (("setting", "many_class", "config.setting='many_class'"),
                              ("eval.protocol", "fast", "config.eval.protocol='fast'"),
                              ("eval.map", "heat", "config.eval.map='heat'")):
    bad = mvtec.get_config("runlocal=True")
    node, last = (bad.eval, field.split(".")[1]) if "." in field else (bad, field)
    node[last] = value
    with pytest.raises(settings.ConfigError, match=match):
      settings.check_config(bad)
  with pytest.raises(settings.ConfigError, match="--mode='fit'"):
    settings.check_config(c, "fit")
