"""cli: a user mistake is one `error:` line on stderr and exit status 2, in every entry point;
a bug keeps its traceback; --verbose prints the traceback of a mistake too.

Cheap: each entry point's main(argv) runs in-process and stops before any compilation; the
absl flag parser runs on its own FlagValues; two subprocesses check `python -m
inpformer_jax.main` itself (flag parsing only, a few seconds). Every tool parses with the one
runner, cli.run_flags, and its flags are those of docs/cli.md's table.
"""

import contextlib
import io
import re
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import mvtec
from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax import loading
from inpformer_jax import train
from inpformer_jax.data import demo
from inpformer_jax.data import prepare
from inpformer_jax.data import preprocess
from inpformer_jax.deploy import calibrate
from inpformer_jax.deploy import export
from inpformer_jax.deploy import predict
from inpformer_jax.reproduce import __main__ as reproduce
from tests.conftest import REPO
from tests.deploy.models import CROP, tiny  # noqa: F401 (fixture)
from tests.runlocal import local_config, make_mvtec_like
from weights_conversion import convert_dinov2
from weights_conversion import convert_efficientnet_lite
from weights_conversion import convert_inpformer

DEMO_CONFIG = str(REPO / "configs" / "demo.py")
# Every command line but inpformer_jax.main, by its name in docs/cli.md's table.
TOOLS = {"predict": predict, "calibrate": calibrate, "export": export, "prepare": prepare,
         "demo": demo, "convert_dinov2": convert_dinov2,
         "convert_efficientnet_lite": convert_efficientnet_lite,
         "convert_inpformer": convert_inpformer, "reproduce": reproduce}


def _error(capsys, lines: int | None = 1) -> str:
  """The one `error:` line of stderr (no traceback); `lines`: stderr's line count, if known."""
  err = capsys.readouterr().err
  found = [x for x in err.splitlines() if x.startswith("error: ")]
  assert len(found) == 1 and "Traceback" not in err, err
  assert lines is None or len(err.splitlines()) == lines, err
  return found[0]


def _main_cli(*args):
  return subprocess.run([sys.executable, "-m", "inpformer_jax.main", "--config", "configs/demo.py",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=120)


# --- inpformer_jax.main: flags (absl + ml_collections), before main runs ---------------------

def test_main_unknown_config_field(tmp_path):
  r = _main_cli("--workdir", str(tmp_path), "--config.train.batch_sise=3")
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == ("error: --config.train.batch_sise: no such field in "
                              "configs/demo.py; did you mean config.train.batch_size?")


def test_main_verbose_shows_the_traceback(tmp_path):
  r = _main_cli("--workdir", str(tmp_path), "--config.train.batch_sise=3", "--verbose")
  assert r.returncode == 2, r.stderr
  assert "Traceback (most recent call last)" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --config.train.batch_sise: ")


def _flags(argv):
  """main's two flags on fresh FlagValues."""
  fv = flags.FlagValues()
  cli.define_config("config", "", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  return fv


def _parse(*args):
  """cli.parse_absl_flags over main's two flags, on fresh FlagValues: -> SystemExit code."""
  argv = ["main", *args]
  with pytest.raises(SystemExit) as e:
    cli.parse_absl_flags(argv, "config", _flags(argv))
  return e.value.code


def _config(*args):
  """The config main gets from these flags (parsed as main parses them)."""
  argv = ["main", "--config", DEMO_CONFIG, *args]
  fv = _flags(argv)
  assert cli.parse_absl_flags(argv, "config", fv) == ["main"]
  return fv["config"].value


def test_wrong_type_of_config_value(capsys):
  assert _parse("--config", DEMO_CONFIG, "--config.train.batch_size=abc") == 2
  line = _error(capsys)
  assert line.startswith("error: --config.train.batch_size=abc: invalid literal for int()")
  assert line.endswith("config.train.batch_size takes an int, e.g. --config.train.batch_size=8")


def test_a_new_dataset_root_is_the_run_data_unless_named_otherwise():
  c = _config("--config.data.roots.mine=/data/1e3", "--config.data.categories.mine=1,2")
  assert (c.data.roots.mine, c.data.categories.mine) == ("/data/1e3", "1,2")  # text, as given
  assert (c.data.train, c.data.test) == ("mine", "mine") and c.is_locked
  c = _config("--config.data.roots.mine=/d", "--config.data.train=demo,mine",
              "--config.data.test=mine", "--config.data.layouts.mine=folder",
              "--config.data.masks.mine=false")
  assert (c.data.train, c.data.test, c.data.layouts.mine, c.data.masks.mine) == (
      "demo,mine", "mine", "folder", False)
  c = _config("--config.data.roots.mine=/d", "--config.setting=zero_shot")
  assert (c.data.train, c.data.test) == ("demo", "mine")  # zero-shot: train names the source


@pytest.mark.parametrize("args,want", [
    (["--config.train.batch_sise=3"], "--config.train.batch_sise: no such field in {file}; "
     "did you mean config.train.batch_size?"),
    (["--config.data.rots=3"], "--config.data.rots: no such field in {file}; did you mean "
     "config.data.roots?"),
    (["--config.data.categories.mvtc=bottle"], "--config.data.categories.mvtc: no dataset "
     "'mvtc'; give its root too (--config.data.roots.mvtc=PATH)"),
    (["--config.data.roots.mvtc=/d", "--config.data.train=demo", "--config.data.test=demo"],
     "--config.data.roots.mvtc: dataset 'mvtc' is in neither config.data.train (demo) nor "
     "config.data.test (demo); did you mean --config.data.roots.mvtec? or add it there "
     "(--config.data.test=mvtc)"),
    (["--config.data.roots.mine", "/d"], "--config.data.roots.mine needs its value after '=': "
     "--config.data.roots.mine=VALUE (a new key takes no separate value)"),
    (["--config.data.roots.mine=/d", "--config.data.masks.mine=maybe"],
     "--config.data.masks.mine=maybe: takes True or False"),
])
def test_new_keys_other_than_a_dataset_are_refused(args, want, capsys):
  assert _parse("--config", DEMO_CONFIG, *args) == 2
  assert _error(capsys) == "error: " + want.format(file=DEMO_CONFIG)


def test_missing_config_file(capsys, tmp_path):
  (tmp_path / "mine.py").write_text("")
  assert _parse("--config", str(tmp_path / "mnie.py")) == 2
  assert _error(capsys) == (f"error: --config {tmp_path / 'mnie.py'}: no such config file; "
                            f"{tmp_path}/ has mine.py")


def test_config_argument_the_config_rejects(capsys):
  assert _parse(f"--config={DEMO_CONFIG}:encoder=xx") == 2
  assert _error(capsys).startswith(f"error: --config={DEMO_CONFIG}:encoder=xx: encoder='xx': "
                                   "choose auto")


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return 1 + 'a'\n")  # a TypeError: a bug, not a mistake
  argv = ["main", "--config", str(bad)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError, match="TypeError"):
    cli.parse_absl_flags(argv, "config", fv)


# --- inpformer_jax.main: what main runs (train.train_and_evaluate under cli.call) ----------

def _train(capsys, config, workdir, lines=1) -> str:
  assert cli.call(train.train_and_evaluate, config, str(workdir), "train_and_eval") == 2
  return _error(capsys, lines)


def _data_faults(capsys, config, workdir) -> list[str]:
  """The data check's error: its count line, then one line per fault."""
  assert cli.call(train.train_and_evaluate, config, str(workdir), "train_and_eval") == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("error: "), err
  return err.splitlines()


def test_dataset_layout_error(capsys, tmp_path):
  root = make_mvtec_like(tmp_path / "d")
  shutil.rmtree(f"{root}/bottle/ground_truth")
  lines = _data_faults(capsys, local_config(mvtec.get_config, "", {"mvtec": root}),
                       tmp_path / "w")
  assert lines[0].startswith("error: 1 data fault(s) in mvtec"), lines
  assert f"{root}/bottle/ground_truth is missing" in lines[1], lines
  assert not (tmp_path / "w" / "ckpt").exists()  # found before training


def test_unreadable_image(capsys, tmp_path):
  root = make_mvtec_like(tmp_path / "d")
  bad = f"{root}/bottle/train/good/000.png"
  with open(bad, "wb") as f:
    f.write(b"not a png")
  config = local_config(mvtec.get_config, "setting=few_shot,shots=4", {"mvtec": root})
  lines = _data_faults(capsys, config, tmp_path / "w")
  assert lines[0].startswith("error: 1 data fault(s) in mvtec"), lines
  assert lines[1].strip().startswith(f"{bad}: "), lines


def test_more_shots_than_images(capsys, tmp_path):
  root = make_mvtec_like(tmp_path / "d", n_train=3)
  config = local_config(mvtec.get_config, "setting=few_shot,shots=4", {"mvtec": root})
  assert _train(capsys, config, tmp_path / "w") == (
      f"error: class 'bottle' has 3 normal training images (in {root}/bottle/train/good), "
      "fewer than config.few_shot.shots=4: pass --config.few_shot.shots=3 or add images")


# --- the serving tools, prepare, the converters (absl flags, cli.run_flags) ----------------

@pytest.mark.parametrize("tool, extra", [(predict, ["--input", "x.png", "--output", "o"]),
                                         (calibrate, ["--normal", "good"]),
                                         (export, ["--output", "o"])])
def test_unusable_checkpoint(tool, extra, capsys, tmp_path):
  assert tool.main(["--checkpoint", str(tmp_path / "nope"), *extra]) == 2
  assert _error(capsys) == f"error: --checkpoint {tmp_path / 'nope'} does not exist"


def test_predict_on_a_folder_without_images(tiny, capsys, tmp_path):  # noqa: F811
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "notes.txt").write_text("not an image")
  assert predict.main(["--checkpoint", tiny, "--image_size", str(CROP), "--input",
                       str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
  assert _error(capsys) == (f"error: --input {tmp_path / 'in'} holds no images (extensions "
                            f"read: {', '.join(preprocess.IMAGE_EXTENSIONS)})")


def test_prepare_unknown_dataset(capsys, tmp_path):
  assert prepare.main(["--dataset", "imagenet", "--manual_dir", str(tmp_path), "--data_dir",
                       str(tmp_path)]) == 2
  assert _error(capsys).startswith("error: unknown dataset 'imagenet'; expected one of ")


@pytest.mark.parametrize("convert", [convert_dinov2, convert_inpformer])
def test_converters_missing_or_wrong_input(convert, capsys, tmp_path):
  out = str(tmp_path / "out")
  assert convert.main(["--input", str(tmp_path / "nope.pth"), "--output", out]) == 2
  assert _error(capsys) == f"error: checkpoint file {tmp_path / 'nope.pth'} does not exist"
  (tmp_path / "notes.pth").write_text("a text file")
  assert convert.main(["--input", str(tmp_path / "notes.pth"), "--output", out]) == 2
  assert _error(capsys).startswith(f"error: {tmp_path / 'notes.pth'} is not a torch checkpoint")


def test_efficientnet_converter_missing_checkpoint(capsys, tmp_path):
  assert convert_efficientnet_lite.main(["--checkpoint", str(tmp_path / "nope.pth"),
                                         "--output", str(tmp_path / "out")]) == 2
  assert _error(capsys) == f"error: checkpoint file {tmp_path / 'nope.pth'} does not exist"


# --- bugs and --verbose ----------------------------------------------------------------------

@pytest.mark.parametrize("bug", [RuntimeError, ValueError, FileNotFoundError])
def test_a_bug_keeps_its_traceback(bug, monkeypatch, tmp_path):
  """Only UserErrors are reported in one line: a plain ValueError or FileNotFoundError from
  the code is a bug, as before (the serving tools used to swallow those)."""
  def broken(*args, **kwargs):
    raise bug("a bug")
  monkeypatch.setattr(loading, "load", broken)
  with pytest.raises(bug, match="a bug"):
    predict.main(["--checkpoint", str(tmp_path), "--input", "x.png", "--output", "o"])


def test_verbose_prints_the_traceback_of_a_mistake(capsys, tmp_path):
  assert export.main(["--checkpoint", str(tmp_path / "nope"), "--output", "o", "--verbose"]) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "CheckpointError" in err
  assert err.strip().splitlines()[-1] == f"error: --checkpoint {tmp_path / 'nope'} does not exist"


def test_report_keeps_continuation_lines_indented(capsys):
  assert cli.report(errors.UserError("first\nsecond\n  third")) == errors.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: first\n  second\n  third\n"


# --- one command-line style: every tool through cli.run_flags, as docs/cli.md lists --------

def _documented(name: str) -> set[str]:
  """The flags docs/cli.md's table gives the command `name`."""
  rows = re.findall(r"^\| ([\w, ]+) \| `(--[\w.]+)` \|", (REPO / "docs" / "cli.md").read_text(),
                    re.M)
  return {flag for commands, flag in rows
          if name in commands.split(", ") or commands == "every command"}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_parses_the_same_way(name, capsys):
  tool = TOOLS[name]
  with contextlib.redirect_stdout(io.StringIO()) as out:
    assert tool.main(["--help"]) == 0
  helped = set(re.findall(r"^  (--\w+)  ", out.getvalue(), re.M))
  assert out.getvalue().startswith("usage: ") and helped == _documented(name), out.getvalue()
  assert tool.main(["--no_such_flag=1"]) == 2
  assert _error(capsys).startswith("error: --no_such_flag: no such flag; ")
  assert tool.main(["--no-verbose"]) == 2  # an argparse-style negative
  assert _error(capsys) == ("error: --no-verbose: no such flag; did you mean --noverbose (or "
                            "--verbose=false)?")
  underscored = sorted(f for f in helped if "_" in f)
  if underscored:  # an argparse-style spelling
    assert tool.main([underscored[0].replace("_", "-") + "=1"]) == 2
    assert _error(capsys) == (f"error: {underscored[0].replace('_', '-')}: no such flag; did "
                              f"you mean {underscored[0]}? (names are spelt with _)")


def _echo(rest):
  def define(fv):
    flags.DEFINE_multi_string("input", None, "", flag_values=fv)
    flags.DEFINE_integer("size", None, "", flag_values=fv)
    flags.mark_flag_as_required("size", flag_values=fv)
  got = []
  def run(argv):
    code = cli.run_flags(lambda fv: got.append(fv.input) or 0, define, argv, prog="t", doc="",
                         rest=rest)
    return code, got.pop() if got else None
  return run


def test_arguments_after_the_flags_are_more_inputs_only_where_the_tool_says(capsys):
  assert _echo("input")(["--size", "1", "--input", "a", "b", "--input=c", "d"]) == (
      0, ["a", "c", "b", "d"])
  assert _echo(None)(["--size", "1", "--input", "a", "b"]) == (2, None)
  assert _error(capsys) == ("error: unexpected arguments ['b']: every option is --name=value "
                            "(see t --help)")
  assert _echo(None)(["--input", "a"]) == (2, None)
  assert _error(capsys) == "error: --size is required: pass --size=VALUE"
  assert _echo(None)(["--size=x"]) == (2, None)
  assert _error(capsys).startswith("error: --size=x: invalid literal for int()")
