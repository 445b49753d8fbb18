r"""How every command line reports a user mistake: one `error:` line on stderr, exit status 2.

  error: <what, which file or field, the fix>

is what an `errors.UserError` (ConfigError, CheckpointError, DatasetLayoutError, ...) prints;
for `inpformer_jax.main` so does a flag that absl or ml_collections cannot take: an unknown
`--config.FIELD`, a value of the wrong type, a missing config file, a `get_config` argument
the config file rejects, an unknown or missing flag. Any other exception is a bug and keeps
its traceback. A message with continuation lines of its own (a dataset layout, a list of
keys) keeps them, indented under the `error:` line.

Every command line is absl flags, spelt `--name=value` or `--name value` with `_` in names
(`--image_size`; an old `--image-size` gets a did-you-mean), booleans `--name` / `--noname` /
`--name=false`; the table of them all is docs/cli.md. `--verbose`, on every one, prints the
traceback of a user mistake too, above the `error:` line; `-h` / `--help` lists the flags.

The config (`define_config`) takes new keys of one kind only, a dataset NAME's:
`--config.data.roots.NAME=PATH` (which makes NAME a dataset), `data.categories.NAME`,
`data.layouts.NAME`, `data.masks.NAME` (these three for a NAME with a root). Their values are
the text after `=` (masks: True/False), never a Python literal. New roots not named by
`--config.data.train` / `--config.data.test` on the command line become the run's train and
test datasets (test only, zero-shot: train names the source model's data); a new root used by
neither is an error. Any other new key is the `no such field` error; then the config is locked.

  the tools (deploy.predict / calibrate / export, data.prepare, data.demo,
  weights_conversion/*):  return cli.run_flags(main, define, argv, prog=..., doc=__doc__)
                          # define(fv) defines the flags on fresh FlagValues; main(fv) -> status
  inpformer_jax.main:     cli.run_absl(main, config=_CONFIG, verbose=_VERBOSE)
"""

from __future__ import annotations

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
from ml_collections import config_flags

from inpformer_jax import errors

VERBOSE_FLAG = "verbose"
VERBOSE_HELP = "on a user mistake, print the traceback too (for a bug report)"
# Files listed when --config names a missing one: enough to spot the intended name.
_MAX_LISTED = 12
# The groups a command line may add a key to: one entry per dataset NAME.
DATASET_GROUPS = ("data.roots", "data.categories", "data.layouts", "data.masks")
_ROOTS = "data.roots"
_BOOL_GROUPS = ("data.masks",)
_DATASET_NAME = re.compile(r"[A-Za-z0-9_-]+")


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


def run_flags(main: Callable[[flags.FlagValues], int],
              define: Callable[[flags.FlagValues], None], argv: Sequence[str] | None = None, *,
              prog: str, doc: str, rest: str | None = None) -> int:
  """A tool's command line: main(fv) -> its exit status, or 2 for a user mistake.

  define(fv) defines the tool's flags on a fresh FlagValues (one per call: a tool can run
  many times in one process), --verbose is added; argv (default sys.argv[1:]) holds no
  program name. Arguments left after the flags are an error, or, with `rest` (a multi-string
  flag), more of its values: `--input dir/*.png` after the shell's expansion.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv)
  flags.DEFINE_bool(VERBOSE_FLAG, False, VERBOSE_HELP, flag_values=fv)
  options = argv[:argv.index("--")] if "--" in argv else argv
  if any(a in _HELP_FLAGS for a in options):
    print(usage(fv, prog, doc))
    return 0
  try:
    left = _parse_tool_flags(fv, [prog, *argv], rest)
  except errors.UserError as e:
    return report(e, _asks_verbose(options))
  if left:
    return report(errors.UserError(f"unexpected arguments {left}: every option is --name=value "
                                   f"(see {prog} --help)"), fv[VERBOSE_FLAG].value)
  return call(main, fv, verbose=fv[VERBOSE_FLAG].value)


def usage(fv: flags.FlagValues, prog: str, doc: str) -> str:
  """--help's text: the doc, then one entry per flag (name, type, default, help)."""
  lines = [f"usage: {prog} --name=value ...", "", doc.strip(), "", "flags:"]
  for name in fv:
    flag = fv[name]
    if flag.name != name:  # a short alias
      continue
    kind = "bool" if flag.boolean else flag.flag_type()
    if flag.boolean:
      default = f"--{name} (default) / --no{name}" if flag.default else f"--no{name} (default)"
    else:
      default = "default none" if flag.default is None else f"default {flag.default!r}"
    lines.append(f"  --{name}  {kind}, {default}{', required' if _required(fv, name) else ''}")
    lines.append(f"      {' '.join(flag.help.split())}")
  return "\n".join(lines)


_HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _asks_verbose(args: Sequence[str]) -> bool:
  """--verbose among args, read before (or without) a successful parse."""
  return any(re.fullmatch(rf"--?{VERBOSE_FLAG}(=(true|t|1))?", a, re.IGNORECASE) for a in args)


def _required(fv: flags.FlagValues, name: str) -> bool:
  """Whether define() marked it (flags.mark_flag_as_required: that validator's message)."""
  return any(getattr(v, "message", None) == f"Flag --{name} must have a value other than None."
             for v in fv[name].validators)


def _parse_tool_flags(fv: flags.FlagValues, argv: list[str], rest: str | None) -> list[str]:
  """fv(argv) -> the arguments left (appended to --REST when given); a mistake is a UserError."""
  try:
    left = fv(argv)[1:]
  except flags.UnrecognizedFlagError as e:
    raise errors.UserError(_unknown_flag(fv, e.flagname)) from e
  except flags.Error as e:
    message = " ".join(str(e).split()).removeprefix("flag ")
    m = re.search(r"Flag --(\w+) must have a value other than None", message)
    if m:
      message = f"--{m.group(1)} is required: pass --{m.group(1)}=VALUE"
    m = re.match(r"--(\w+)=(.*): \('Non-boolean argument to boolean flag'", message)
    if m:
      message = (f"--{m.group(1)}={m.group(2)}: a yes/no flag: --{m.group(1)}, "
                 f"--no{m.group(1)} or --{m.group(1)}=true|false")
    raise errors.UserError(message) from e
  if rest is not None and left:
    fv[rest].value = [*(fv[rest].value or []), *left]
    return []
  return left


def _unknown_flag(fv: flags.FlagValues, name: str) -> str:
  """`--NAME: no such flag` with the flag meant: _ for -, --noNAME for --no-NAME."""
  names = [n for n in fv if fv[n].name == n]
  spelt = name.replace("-", "_")
  negated = re.sub(r"^no_", "", spelt)
  if negated != spelt and negated in names and fv[negated].boolean:
    hint = f"did you mean --no{negated} (or --{negated}=false)?"
  elif spelt in names:
    hint = f"did you mean --{spelt}? (names are spelt with _)"
  else:
    close = difflib.get_close_matches(spelt, names, n=1)
    hint = (f"did you mean --{close[0]}?" if close
            else "flags: " + ", ".join(f"--{n}" for n in names))
  return f"--{name}: no such flag; {hint}"


def run_absl(main: Callable[[list[str]], Any], *, config: flags.FlagHolder,
             verbose: flags.FlagHolder) -> None:
  """absl's app.run(main) with `parse_absl_flags` and main's user mistakes reported."""
  app.run(lambda argv: call(main, argv, verbose=verbose.value),
          flags_parser=lambda argv: parse_absl_flags(argv, config.name))


def define_config(name: str, help_text: str, **kwargs) -> flags.FlagHolder:
  """The --NAME config-file flag, open to new dataset keys (`parse_absl_flags` checks them
  and locks the config); kwargs go to config_flags.DEFINE_config_file."""
  return config_flags.DEFINE_config_file(name, None, help_text, lock_config=False,
                                         accept_new_attributes=True, **kwargs)


def parse_absl_flags(argv: Sequence[str], config_flag: str = "config",
                     flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """flag_values(argv) -> the remaining arguments; a flag mistake is one line and exit 2.

  Before main runs, so --verbose is read from argv itself here.
  """
  try:
    return _parse(list(argv), config_flag, flag_values)
  except errors.UserError as e:
    sys.exit(report(e, _asks_verbose(argv[1:])))


def _parse(argv: list[str], name: str, flag_values: flags.FlagValues) -> list[str]:
  config_arg = _config_arg(argv, name)
  if config_arg is not None:
    _check_config_file(config_arg.split(":", 1)[0], name)
  try:
    rest = flag_values(argv)
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
  config = flag_values[name].value if name in flag_values else None
  if isinstance(config, ml_collections.ConfigDict) and config_arg is not None:
    _take_new_keys(config, argv, name, config_arg, flag_values)
    config.lock()
  return rest


def _take_new_keys(config: ml_collections.ConfigDict, argv: Sequence[str], name: str,
                   config_arg: str, flag_values: flags.FlagValues) -> None:
  """Checks the keys the command line added to `config` (see the module doc) and sets their
  values from argv's text."""
  pristine = flag_values[name].parser.parse(config_arg)
  file = config_arg.split(":", 1)[0]
  given = _given(argv, name)
  new_roots = []
  for path in _added(config, pristine):
    group, _, dataset = path.rpartition(".")
    if group not in DATASET_GROUPS:
      raise errors.UserError(f"--{name}.{path}: {_missing(pristine, path, name, file)}")
    if not _DATASET_NAME.fullmatch(dataset):
      raise errors.UserError(f"--{name}.{path}: a dataset name is letters, digits, _ and -")
    node = config
    for part in group.split("."):
      node = node[part]
    value = _new_value(path, given.get(path), name, group in _BOOL_GROUPS)
    del node[dataset]  # ml_collections typed it by its literal reading of the text
    node[dataset] = value
    if group == _ROOTS:
      new_roots.append(dataset)
    elif dataset not in config.data.roots:
      raise errors.UserError(f"--{name}.{path}: no dataset {dataset!r}; give its root too "
                             f"(--{name}.data.roots.{dataset}=PATH)")
  if not new_roots:
    return
  for which in ("train", "test"):
    if f"data.{which}" not in given and not (which == "train"
                                             and config.get("setting") == "zero_shot"):
      config.data[which] = ",".join(new_roots)
  used = {n.strip() for w in ("train", "test") for n in config.data[w].split(",")}
  for dataset in new_roots:
    if dataset not in used:
      close = difflib.get_close_matches(dataset, list(pristine.data.roots), n=1)
      hint = f"did you mean --{name}.data.roots.{close[0]}? or " if close else ""
      raise errors.UserError(
          f"--{name}.data.roots.{dataset}: dataset {dataset!r} is in neither {name}.data.train "
          f"({config.data.train}) nor {name}.data.test ({config.data.test}); {hint}add it "
          f"there (--{name}.data.test={dataset})")


def _added(config: ml_collections.ConfigDict, pristine: ml_collections.ConfigDict,
           prefix: str = "") -> list[str]:
  """Dotted paths of the keys of `config` that `pristine` lacks."""
  out = []
  for key in config:
    if key not in pristine:
      out.append(prefix + key)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        pristine[key], ml_collections.ConfigDict):
      out += _added(config[key], pristine[key], f"{prefix}{key}.")
  return out


def _given(argv: Sequence[str], name: str) -> dict[str, str | None]:
  """--NAME.PATH[=TEXT] of argv -> {PATH: TEXT} (the last one; None: no `=`, 'false': --noNAME)."""
  out = {}
  for arg in argv[1:]:
    m = re.fullmatch(rf"--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?", arg, re.DOTALL)
    if m:
      out[m.group(2)] = "false" if m.group(1) else m.group(3)
  return out


def _new_value(path: str, text: str | None, name: str, boolean: bool) -> str | bool:
  if boolean:
    text = "true" if text is None else text.strip().lower()
    if text not in ("true", "false", "1", "0"):
      raise errors.UserError(f"--{name}.{path}={text}: takes True or False")
    return text in ("true", "1")
  if text is None:
    raise errors.UserError(f"--{name}.{path} needs its value after '=': --{name}.{path}=VALUE "
                           "(a new key takes no separate value)")
  return text


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
