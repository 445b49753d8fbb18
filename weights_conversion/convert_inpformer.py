"""Converts an official INP-Former `model.pth` into an inpformer-jax params directory.

  python weights_conversion/convert_inpformer.py --input model.pth --output DIR

The directory loads with `inpformer_jax.loading.load(DIR)` (as do the .pth itself and
training workdirs) and can be named by `config.init_from`. Strict: a missing, unexpected or
mis-shaped key is an error listing them (`inpformer_jax/conversion/inpformer.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.conversion import inpformer  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "official INP-Former model.pth", flag_values=fv)
  flags.DEFINE_string("output", None, "output params directory (new)", flag_values=fv)
  flags.mark_flags_as_required(["input", "output"], flag_values=fv)


def main(argv=None) -> int:
  def run(a):
    arch = inpformer.convert_file(a.input, a.output)["arch"]
    return (f"wrote {a.output}: D={arch['width']} heads={arch['num_heads']} "
            f"M={arch['num_inps']} encoder depth={arch['encoder']['depth']} "
            f"registers={arch['encoder']['num_register_tokens']}")
  return cli.run(run, _define, argv, script="convert_inpformer.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
