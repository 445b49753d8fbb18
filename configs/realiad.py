r"""Real-IAD: multi-class (default), single-class, few-shot or zero-shot INP-Former.

  python -m inpformer_jax.main --config configs/realiad.py --workdir workdirs/realiad_multi_class

Other settings (the official scripts' recipes, SPEC §6):
  --config configs/realiad.py:setting=single_class         one model per class (WORKDIR/<class>/)
  --config configs/realiad.py:setting=few_shot,shots=4     4 shots per class x 22 augmentations
  --config configs/realiad.py:setting=zero_shot,source=visa --config.init_from=SOURCE_WORKDIR
  --config configs/realiad.py:runlocal                     tiny CPU smoke run
The same arguments as every config file, each also a --config.FIELD (docs/engine.md "Settings").
Data: --config.data.roots.realiad=/path/to/Real-IAD
"""

from configs import common


def get_config(arg=None):
  return common.dataset_config("realiad", arg)
