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

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.conversion import dinov2  # pylint: disable=wrong-import-position
from weights_conversion import cli  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True,
                      help="torch checkpoint (.pth/.pt/.bin/.safetensors)")
  parser.add_argument("--output", required=True, help="params directory to create")
  parser.add_argument("--prefix", default="",
                      help="convert only keys under this prefix, e.g. 'encoder.' or 'module.'")
  parser.add_argument("--format", default=None, choices=dinov2.FORMATS,
                      help="source format (default: detected from the key names)")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads (default: from the width, e.g. 768 -> 12)")

  def run(a):
    meta = dinov2.convert_file(a.input, a.output, prefix=a.prefix, fmt=a.format,
                               num_heads=a.num_heads)
    arch = meta["arch"]
    return (f"wrote {a.output}: {meta['format']} DINOv2 width {arch['width']} depth "
            f"{arch['depth']} heads {arch['num_heads']} registers {arch['num_register_tokens']}")
  return cli.run(run, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
