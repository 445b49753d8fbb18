r"""How every command line reports a user mistake: one `error:` line on stderr, exit status 2.

  error: <what, which file or field, the fix>

is what an `errors.UserError` (ConfigError, CheckpointError, DatasetLayoutError, ...) prints;
for `inpformer_jax.main` so does a flag that absl or ml_collections cannot take: an unknown
`--config.FIELD`, a value of the wrong type, a missing config file, a `get_config` argument
the config file rejects, an unknown or missing flag. Any other exception is a bug and keeps
its traceback. A message with continuation lines of its own (a dataset layout, a list of
keys) keeps them, indented under the `error:` line.

`--verbose`, on every command line (argparse and absl alike), prints the traceback of a user
mistake too, above the `error:` line.

  argparse commands (deploy.predict / calibrate / export, data.prepare, data.demo,
  weights_conversion/*):  return cli.run(main, parser, argv)   # main(args) -> exit status
  inpformer_jax.main:     cli.run_absl(main, config=_CONFIG, verbose=_VERBOSE)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import ml_collections

from inpformer_jax import errors

VERBOSE_FLAG = "verbose"
VERBOSE_HELP = "on a user mistake, print the traceback too (for a bug report)"
# Files listed when --config names a missing one: enough to spot the intended name.
_MAX_LISTED = 12


def report(error: BaseException, verbose: bool = False) -> int:
  """Prints `error: <message>` on stderr (after the traceback when verbose) -> exit status 2."""
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  first, *rest = [line for line in str(error).strip().splitlines() if line.strip()] or [
      type(error).__name__]
  lines = [f"error: {first}"] + [line if line.startswith(" ") else "  " + line for line in rest]
  print("\n".join(lines), file=sys.stderr, flush=True)
  return errors.EXIT_USER_ERROR


def call(fn: Callable[..., Any], *args, verbose: bool = False, **kwargs) -> Any:
  """fn(*args, **kwargs); a UserError it raises is reported -> exit status 2."""
  try:
    return fn(*args, **kwargs)
  except errors.UserError as e:
    return report(e, verbose)


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
  """Adds --verbose, parses argv and returns main(args), or 2 for a user mistake."""
  parser.add_argument(f"--{VERBOSE_FLAG}", action="store_true", help=VERBOSE_HELP)
  args = parser.parse_args(argv)
  return call(main, args, verbose=args.verbose)


def run_absl(main: Callable[[list[str]], Any], *, config: flags.FlagHolder,
             verbose: flags.FlagHolder) -> None:
  """absl's app.run(main) with `parse_absl_flags` and main's user mistakes reported."""
  app.run(lambda argv: call(main, argv, verbose=verbose.value),
          flags_parser=lambda argv: parse_absl_flags(argv, config.name))


def parse_absl_flags(argv: Sequence[str], config_flag: str = "config",
                     flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """flag_values(argv) -> the remaining arguments; a flag mistake is one line and exit 2.

  Before main runs, so --verbose is read from argv itself here.
  """
  try:
    return _parse(list(argv), config_flag, flag_values)
  except errors.UserError as e:
    wants = any(re.fullmatch(rf"--?{VERBOSE_FLAG}(=(true|t|1))?", a, re.IGNORECASE)
                for a in argv[1:])
    sys.exit(report(e, wants))


def _parse(argv: list[str], name: str, flag_values: flags.FlagValues) -> list[str]:
  config_arg = _config_arg(argv, name)
  if config_arg is not None:
    _check_config_file(config_arg.split(":", 1)[0], name)
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = _flag_message(e, name, config_arg, flag_values)
    if message is None:
      raise
    raise errors.UserError(message) from e
  except (AttributeError, KeyError, IndexError) as e:
    # ml_collections raises these while defining --config.FIELD overrides; they are a user
    # mistake only if a FIELD really is not in the config.
    message = _unknown_field(argv, name, config_arg, flag_values)
    if message is None:
      raise
    raise errors.UserError(message) from e


def _config_arg(argv: Sequence[str], name: str) -> str | None:
  """The value of --NAME (=VALUE or the next argument), as ml_collections finds it."""
  for i, arg in enumerate(argv[1:], 1):
    m = re.fullmatch(rf"--?{name}(=(.*))?", arg, re.DOTALL)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _check_config_file(path: str, name: str) -> None:
  if os.path.isfile(path):
    return
  folder = os.path.dirname(path) or "."
  there = sorted(f for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"
                 ) if os.path.isdir(folder) else []
  listing = f"; {folder}/ has {', '.join(there[:_MAX_LISTED])}" if there else ""
  raise errors.UserError(f"--{name} {path}: no such config file{listing}")


def _flag_message(e: flags.Error, name: str, config_arg: str | None,
                  flag_values: flags.FlagValues) -> str | None:
  """One line for a flag absl rejects; None when the rejection is a bug in a config file."""
  message = " ".join(str(e).split())
  if "Error whilst parsing config file" in message:
    # absl wraps ml_collections' copy of get_config's own exception, message = traceback.
    original = e
    while original.__context__ is not None:
      original = original.__context__
    if not isinstance(original, ValueError):  # config files raise ValueError for a bad ARG
      return None
    return f"--{name}={config_arg}: {original}"
  m = re.match(rf"flag --{re.escape(name)}\.([\w.]+)=", message)
  value = _lookup(flag_values, name, m.group(1)) if m else None
  if value is not None and not isinstance(value, ml_collections.ConfigDict):
    kind = type(value).__name__
    message += (f"; {name}.{m.group(1)} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                f"e.g. --{name}.{m.group(1)}={value}")
  return message.removeprefix("flag ")


def _lookup(flag_values: flags.FlagValues, name: str, path: str) -> Any:
  """The config's current value at `path` (the config parsed already), else None."""
  try:
    node = flag_values[name].value
    for part in path.split("."):
      node = node[part]
    return node
  except (KeyError, AttributeError, TypeError):
    return None


def _unknown_field(argv: Sequence[str], name: str, config_arg: str | None,
                   flag_values: flags.FlagValues) -> str | None:
  """`--NAME.a.b: no such field ...` for the first override not in the config, else None."""
  if config_arg is None:
    return None
  try:
    # The failed parse kept no config: load it again (get_config has no side effects).
    config = flag_values[name].parser.parse(config_arg)
  except Exception:  # pylint: disable=broad-except -- then the original error is reported
    return None
  file = config_arg.split(":", 1)[0]
  for arg in argv[1:]:
    m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    problem = m and _missing(config, m.group(1), name, file)
    if problem:
      return f"--{name}.{m.group(1)}: {problem}"
  return None


def _missing(config: Any, path: str, name: str, file: str) -> str | None:
  node, at = config, name
  for part in path.split("."):
    key = part.split("[", 1)[0]
    if isinstance(node, ml_collections.ConfigDict):
      keys = list(node.keys())
    elif dataclasses.is_dataclass(node):
      keys = [f.name for f in dataclasses.fields(node)]
    else:
      return f"{at} is a value ({type(node).__name__}), not a group of fields"
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      hint = (f"did you mean {at}.{close[0]}?" if close
              else f"{at} has: {', '.join(sorted(keys))}")
      return f"no such field in {file}; {hint}"
    node, at = (node[key] if isinstance(node, ml_collections.ConfigDict)
                else getattr(node, key)), f"{at}.{key}"
    if key != part:  # an index: ml_collections checks those itself
      return None
  return None
