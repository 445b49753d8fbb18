r"""Command line: train and/or evaluate INP-Former from a config file.

  python -m inpformer_jax.main --config configs/mvtec.py --workdir workdirs/mvtec

  --config configs/FILE.py[:ARG]   e.g. configs/mvtec.py:setting=few_shot,shots=4
  --config.FIELD=VALUE             any field, e.g. --config.data.roots.mvtec=/data/mvtec
                                   (the config is locked: a misspelt field is an error)
  --workdir DIR                    checkpoints, train_metrics.jsonl, results.{md,json,csv};
                                   a DIR that holds a checkpoint is resumed
  --mode train|eval|train_and_eval
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from inpformer_jax import checkpoint
from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax import train
from inpformer_jax import xla_flags

# Config files do `from configs import common`: make the repository root importable when
# the command runs from elsewhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", list(settings.MODES), "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO; -v 0 shows them.
  xla_flags.configure_cpu_flags()  # before JAX creates its CPU backend
  try:
    # Before any other JAX computation (multi-host through jax.distributed).
    sharding.initialize_distributed(config)
    logging.info("JAX %s, %d process(es), devices: %s", jax.__version__, jax.process_count(),
                 jax.devices())
    train.train_and_evaluate(config, _WORKDIR.value, _MODE.value)
  except (settings.ConfigError, sharding.MeshError, checkpoint.CheckpointError) as e:
    # A user mistake: say what to change, without a traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
