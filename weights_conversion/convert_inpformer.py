"""Converts an official INP-Former `model.pth` into an inpformer-jax params directory.

  python weights_conversion/convert_inpformer.py --input model.pth --output DIR

The directory loads with `inpformer_jax.loading.load(DIR)` (as do the .pth itself and
training workdirs) and can be named by `config.init_from`. Strict: a missing, unexpected or
mis-shaped key is an error listing them (`inpformer_jax/conversion/inpformer.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.conversion import inpformer  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="official INP-Former model.pth")
  parser.add_argument("--output", required=True, help="output params directory (new)")

  def run(a):
    arch = inpformer.convert_file(a.input, a.output)["arch"]
    return (f"wrote {a.output}: D={arch['width']} heads={arch['num_heads']} "
            f"M={arch['num_inps']} encoder depth={arch['encoder']['depth']} "
            f"registers={arch['encoder']['num_register_tokens']}")
  return cli.run(run, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
