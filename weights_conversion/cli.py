"""What the conversion command lines share: a user mistake is one `error:` line, exit status 2.

(`inpformer_jax/cli.py`: a missing or unconvertible input, an existing --output; `--verbose`
adds the traceback; absl flags, docs/cli.md.)
"""

from __future__ import annotations

from typing import Callable

from absl import flags

from inpformer_jax import cli
from inpformer_jax import errors


def run(convert: Callable[[flags.FlagValues], str], define: Callable[[flags.FlagValues], None],
        argv=None, *, script: str, doc: str) -> int:
  """Parses argv (the flags define(fv) defines), runs convert(fv) and prints what it returns."""
  def main(args):
    try:
      print(convert(args))
    except errors.UserError:
      raise
    except FileExistsError as e:  # checkpoint.save_params refuses to overwrite --output
      raise errors.OutputExistsError(f"--output: {e}") from e
    return 0
  return cli.run_flags(main, define, argv, prog=f"python weights_conversion/{script}", doc=doc)
