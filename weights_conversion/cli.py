"""What the conversion command lines share: a conversion error is one line, exit status 1."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from inpformer_jax.conversion import ConversionError


def run(convert: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
        argv=None) -> int:
  """Parses argv, runs convert(args) and prints what it returns."""
  args = parser.parse_args(argv)
  try:
    print(convert(args))
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
