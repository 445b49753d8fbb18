"""The command line: user mistakes are one line on stderr with the fix, exit status 2."""

import subprocess
import sys

from tests.conftest import REPO
from tests.runlocal import make_mvtec_like


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "inpformer_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_cli_rejects_unknown_keys_and_missing_roots(tmp_path):
  typo = _cli("--config", "configs/mvtec.py:runlocal=True", "--workdir", str(tmp_path),
              "--config.train.batchsize=3")
  assert typo.returncode != 0 and "batchsize" in typo.stderr
  missing = _cli("--config", "configs/mvtec.py:runlocal=True", "--workdir", str(tmp_path),
                 f"--config.data.roots.mvtec={tmp_path}/nowhere")
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert "error: dataset root for 'mvtec' not found" in missing.stderr
  assert "--config.data.roots.mvtec=" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_names_an_unusable_init_from(tmp_path):
  # (checked with the config, before any data or model is read)
  r = _cli("--config", "configs/mvtec.py:setting=zero_shot,runlocal=True", "--workdir",
           str(tmp_path / "w"), f"--config.data.roots.mvtec={make_mvtec_like(tmp_path / 'd')}",
           "--config.data.categories.mvtec=bottle,cable",
           f"--config.init_from={tmp_path}/no_such_run")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "no_such_run" in r.stderr
