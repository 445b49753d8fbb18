r"""Converts a PyTorch DINOv2 ViT checkpoint into an inpformer-jax params directory.

  python weights_conversion/convert_dinov2.py \
      --input dinov2_vitb14_reg4_pretrain.pth --output weights/dinov2reg_vit_base_14

(or `python -m weights_conversion.convert_dinov2 ...`). Accepts facebookresearch `.pth`,
timm `vit_*_patch14[_reg4]_dinov2` state dicts (`.pth`/`.bin`/`.safetensors`) and Hugging
Face `Dinov2Model` / `Dinov2WithRegistersModel` `.safetensors`; the format and architecture
are read from the keys and shapes (`inpformer_jax/conversion/dinov2.py`). The output
directory is what `config.model.encoder_weights` and `inpformer_jax.pretrained.load_encoder`
accept. No torch needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.conversion import dinov2  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "torch checkpoint (.pth/.pt/.bin/.safetensors)",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "params directory to create", flag_values=fv)
  flags.mark_flags_as_required(["input", "output"], flag_values=fv)
  flags.DEFINE_string("prefix", "", "convert only keys under this prefix, e.g. 'encoder.' or "
                      "'module.'", flag_values=fv)
  flags.DEFINE_enum("format", None, dinov2.FORMATS, "source format (default: detected from "
                    "the key names)", flag_values=fv)
  flags.DEFINE_integer("num_heads", None, "attention heads (default: from the width, e.g. "
                       "768 -> 12)", flag_values=fv)


def main(argv=None) -> int:
  def run(a):
    meta = dinov2.convert_file(a.input, a.output, prefix=a.prefix, fmt=a.format,
                               num_heads=a.num_heads)
    arch = meta["arch"]
    return (f"wrote {a.output}: {meta['format']} DINOv2 width {arch['width']} depth "
            f"{arch['depth']} heads {arch['num_heads']} registers {arch['num_register_tokens']}")
  return cli.run(run, _define, argv, script="convert_dinov2.py", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
