"""The flags every serving command line shares, and how they turn into a loaded model."""

from __future__ import annotations

import argparse
from typing import Callable

from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax import loading


class FlagError(errors.UserError, ValueError):
  """A serving flag whose value cannot work; the message names the flag and the fix."""


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
  """Parses argv and returns main(args); a user mistake is one `error:` line, exit status 2."""
  return cli.run(main, ap, argv)
