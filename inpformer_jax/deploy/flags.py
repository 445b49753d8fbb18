"""The flags every serving command line shares, and how they turn into a loaded model."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from inpformer_jax import loading
from inpformer_jax.checkpoint import CheckpointError
from inpformer_jax.conversion import ConversionError

# A user mistake in one of these is reported in one line, exit status 1.
USER_ERRORS = (CheckpointError, ConversionError, ValueError, FileNotFoundError)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An ArgumentParser with the shared model flags."""
  ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True,
                  help="training workdir, converted params dir or official model.pth")
  ap.add_argument("--image-size", type=int, default=None,
                  help="crop side (default: the checkpoint's config, or 392)")
  ap.add_argument("--resize", type=int, default=None,
                  help="resize side before the crop (default: config, or 448)")
  ap.add_argument("--zero-shot", action="store_true",
                  help="map = distance to the nearest INP (the zero-shot setting)")
  ap.add_argument("--calibration", default=None,
                  help="a calibration.json elsewhere (default: beside the checkpoint)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--no-progress", action="store_true")
  return ap


def load(args: argparse.Namespace) -> loading.Loaded:
  return loading.load(args.checkpoint, image_size=args.image_size, resize=args.resize,
                      zero_shot=args.zero_shot, calibration=args.calibration)


def run(main: Callable[[argparse.Namespace], int], ap: argparse.ArgumentParser,
        argv=None) -> int:
  """Parses argv and runs main(args); a user mistake is one line on stderr, exit status 1."""
  args = ap.parse_args(argv)
  try:
    return main(args)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
