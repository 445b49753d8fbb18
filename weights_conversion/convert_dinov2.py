r"""Converts a PyTorch DINOv2 ViT checkpoint into an inpformer-jax params directory.

  python weights_conversion/convert_dinov2.py \
      --input dinov2_vitb14_reg4_pretrain.pth --output weights/dinov2reg_vit_base_14

(or `python -m weights_conversion.convert_dinov2 ...`). Accepts facebookresearch `.pth`,
timm `vit_*_patch14[_reg4]_dinov2` state dicts (`.pth`/`.bin`/`.safetensors`) and Hugging
Face `Dinov2Model` / `Dinov2WithRegistersModel` `.safetensors`; the format and architecture
are read from the keys and shapes. The output directory (`params/` + `meta.json`, see
`inpformer_jax.checkpoint`) is what `inpformer_jax.pretrained.load_encoder` and a training
config's encoder weights accept.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.checkpoint import save_params  # pylint: disable=wrong-import-position
from weights_conversion import dinov2_mapping  # pylint: disable=wrong-import-position


def convert_file(input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                 prefix: str = "", fmt: str | None = None,
                 num_heads: int | None = None) -> dict:
  """Reads `input_path`, converts it and writes a params directory; returns its meta."""
  sd = dinov2_mapping.load_torch_file(input_path)
  fmt = fmt or dinov2_mapping.detect_format(sd, prefix)
  params, arch = dinov2_mapping.convert_state_dict(sd, prefix, fmt=fmt, num_heads=num_heads)
  meta = {"kind": "dinov2", "arch": arch, "format": fmt, "prefix": prefix,
          "source_file": os.path.abspath(os.fspath(input_path))}
  save_params(output_dir, params, meta)
  return meta


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="torch checkpoint (.pth/.pt/.bin/.safetensors)")
  parser.add_argument("--output", required=True, help="params directory to create")
  parser.add_argument("--prefix", default="",
                      help="convert only keys under this prefix, e.g. 'encoder.' or 'module.'")
  parser.add_argument("--format", default=None, choices=dinov2_mapping.FORMATS,
                      help="source format (default: detected from the key names)")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads (default: from the width, e.g. 768 -> 12)")
  args = parser.parse_args(argv)
  try:
    meta = convert_file(args.input, args.output, prefix=args.prefix, fmt=args.format,
                        num_heads=args.num_heads)
  except (dinov2_mapping.ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  arch = meta["arch"]
  print(f"wrote {args.output}: {meta['format']} DINOv2 width {arch['width']} depth {arch['depth']} "
        f"heads {arch['num_heads']} registers {arch['num_register_tokens']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
