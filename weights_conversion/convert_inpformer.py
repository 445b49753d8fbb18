"""Convert an official INP-Former `model.pth` into an inpformer-jax params directory.

  python weights_conversion/convert_inpformer.py --input model.pth --output DIR

The directory loads with `inpformer_jax.load_official_checkpoint(DIR)` and can be named by
`config.init_from`. Strict: a missing, unexpected or mis-shaped key is an error listing them.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weights_conversion import dinov2_mapping  # pylint: disable=g-import-not-at-top
from weights_conversion import inpformer_mapping  # pylint: disable=g-import-not-at-top


def convert_file(input_path: str, output_dir: str) -> dict:
  """Reads, converts and writes; returns the meta written beside the params."""
  from inpformer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  sd = dinov2_mapping.load_torch_file(input_path)
  params, arch = inpformer_mapping.convert_inpformer_state_dict(sd)
  meta = {"kind": "inpformer", "arch": arch, "source": os.path.abspath(input_path),
          "source_format": "official_inpformer_pth"}
  checkpoint.save_params(output_dir, params, meta)
  return meta


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="official INP-Former model.pth")
  parser.add_argument("--output", required=True, help="output params directory (new)")
  args = parser.parse_args(argv)
  try:
    meta = convert_file(args.input, args.output)
  except (dinov2_mapping.ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  arch = meta["arch"]
  print(f"wrote {args.output}: D={arch['width']} heads={arch['num_heads']} "
        f"M={arch['num_inps']} encoder depth={arch['encoder']['depth']} "
        f"registers={arch['encoder']['num_register_tokens']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
