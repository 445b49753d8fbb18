r"""MVTec-AD: multi-class (default), single-class, few-shot or zero-shot INP-Former.

  python -m inpformer_jax.main --config configs/mvtec.py --workdir workdirs/mvtec_multi_class

Other settings (the official scripts' recipes, SPEC §6):
  --config configs/mvtec.py:setting=single_class         one model per class (WORKDIR/<class>/)
  --config configs/mvtec.py:setting=few_shot,shots=4     4 normal shots per class x 22 augmentations
  --config configs/mvtec.py:setting=zero_shot,source=realiad --config.init_from=SOURCE_WORKDIR
  --config configs/mvtec.py:runlocal                     tiny CPU smoke run
The same arguments as every config file, each also a --config.FIELD (docs/engine.md "Settings").
Data: --config.data.roots.mvtec=/path/to/mvtec_anomaly_detection
"""

from configs import common


def get_config(arg=None):
  return common.dataset_config("mvtec", arg)
