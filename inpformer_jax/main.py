r"""Command line: train and/or evaluate INP-Former from a config file.

  python -m inpformer_jax.main --config configs/mvtec.py --workdir workdirs/mvtec

  --config configs/FILE.py[:ARG]   e.g. configs/mvtec.py:setting=few_shot,shots=4
  --config.FIELD=VALUE             any field, e.g. --config.data.roots.mvtec=/data/mvtec
                                   (the config is locked: a misspelt field is an error)
  --config.data.roots.NAME=PATH    your own dataset under the name NAME (layout detected, or
                                   --config.data.layouts.NAME=mvtec|visa|realiad|mpdd|btad|
                                   folder); it is the run's train and test data unless
                                   --config.data.train / --config.data.test say otherwise
  --workdir DIR                    checkpoints, train_metrics.jsonl, results.{md,json,csv};
                                   a DIR that holds a checkpoint is resumed
  --mode train|eval|train_and_eval
  --verbose                        a user mistake prints its traceback too

A user mistake (an unknown field, a wrong value, a missing dataset or checkpoint) is one
`error: ...` line on stderr and exit status 2 (`inpformer_jax/cli.py`); a traceback is a bug.
"""

import os
import sys

from inpformer_jax import allocator

if __name__ == "__main__":
  allocator.use_tcmalloc()  # re-executes this command under tcmalloc, before JAX is imported

from absl import flags
from absl import logging
import jax

from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax import train
from inpformer_jax import xla_flags

# Config files do `from configs import common`: make the repository root importable when
# the command runs from elsewhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = cli.define_config("config", "Config file (configs/*.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", list(settings.MODES), "What to run.")
_VERBOSE = flags.DEFINE_bool(cli.VERBOSE_FLAG, False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}: every option is --name=value")
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO; -v 0 shows them.
  xla_flags.configure_cpu_flags()  # before JAX creates its CPU backend
  # Before any other JAX computation (multi-host through jax.distributed).
  sharding.initialize_distributed(config)
  logging.info("JAX %s, %d process(es), devices: %s, allocator: %s", jax.__version__,
               jax.process_count(), jax.devices(), allocator.describe())
  train.train_and_evaluate(config, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  cli.run_absl(main, config=_CONFIG, verbose=_VERBOSE)
