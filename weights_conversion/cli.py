"""What the conversion command lines share: a user mistake is one `error:` line, exit status 2.

(`inpformer_jax/cli.py`: a missing or unconvertible input, an existing --output; `--verbose`
adds the traceback.)
"""

from __future__ import annotations

import argparse
from typing import Callable

from inpformer_jax import cli
from inpformer_jax import errors


def run(convert: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
        argv=None) -> int:
  """Parses argv, runs convert(args) and prints what it returns."""
  def main(args):
    try:
      print(convert(args))
    except errors.UserError:
      raise
    except FileExistsError as e:  # checkpoint.save_params refuses to overwrite --output
      raise errors.OutputExistsError(f"--output: {e}") from e
    return 0
  return cli.run(main, parser, argv)
