r"""VisA: multi-class (default), single-class, few-shot or zero-shot INP-Former.

  python -m inpformer_jax.main --config configs/visa.py --workdir workdirs/visa_multi_class

Other settings (the official scripts' recipes, SPEC §6):
  --config configs/visa.py:setting=single_class         one model per class (WORKDIR/<class>/)
  --config configs/visa.py:setting=few_shot,shots=4     4 normal shots per class x 22 augmentations
  --config configs/visa.py:setting=zero_shot,source=realiad --config.init_from=SOURCE_WORKDIR
  --config configs/visa.py:runlocal                     tiny CPU smoke run
The same arguments as every config file, each also a --config.FIELD (docs/engine.md "Settings").
Data: --config.data.roots.visa=/path/to/VisA_pytorch/1cls
"""

from configs import common


def get_config(arg=None):
  return common.dataset_config("visa", arg)
