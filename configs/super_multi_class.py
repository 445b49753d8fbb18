r"""Super-multi-class: one model trained on MVTec-AD + VisA + Real-IAD (57 classes).

  python -m inpformer_jax.main --config configs/super_multi_class.py \
      --workdir workdirs/super_multi_class

Evaluated per class and averaged per dataset, as the official script does.
Data: --config.data.roots.{mvtec,visa,realiad}=PATH
Tiny CPU smoke run: --config configs/super_multi_class.py:runlocal (the arguments of every
config file, docs/engine.md "Settings"; its only setting is super_multi_class)
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, "configs/super_multi_class.py", settings=("super_multi_class",))
  c = common.base_config()
  c.data.train = "mvtec,visa,realiad"
  c.data.test = "mvtec,visa,realiad"
  common.apply_args(c, a, "configs/super_multi_class.py")
  return c
