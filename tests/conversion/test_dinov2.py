"""DINOv2 weight conversion: three source formats, strictness, file errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inpformer_jax.checkpoint import load_params
from inpformer_jax.conversion import ConversionError
from inpformer_jax.conversion.dinov2 import convert, detect_format
from inpformer_jax.conversion.torch_files import load_state_dict
from inpformer_jax.models import vit
from weights_conversion import convert_dinov2

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402  pylint: disable=wrong-import-position

from tests.torch_reference import dinov2 as ref  # noqa: E402  pylint: disable=wrong-import-position

REPO = Path(__file__).resolve().parents[2]
WIDTH, DEPTH, HEADS = 128, 2, 2  # head dim 64, so the head count is inferred
SIZE = 56


def _model(regs, seed=0):
  torch.manual_seed(seed)
  m = ref.DinoVisionTransformer(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                num_register_tokens=regs)
  return ref.randomize_(m, seed).eval()


@pytest.fixture(scope="module", params=[4, 0], ids=["reg4", "noreg"])
def torch_model(request):
  return _model(request.param, seed=request.param)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)


def _torch_layers(m, x):
  with torch.no_grad():
    return [t.numpy() for t in m(torch.from_numpy(x), (0, 1))]


def _flax_layers(arch, params, x):
  out = vit.DinoViT(**arch).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                  layers=(0, 1))
  return [np.asarray(o) for o in out]


def _assert_close(want, got):
  for w, g in zip(want, got):
    assert np.abs(w - g).max() <= 1e-5


def _write_all_formats(m, tmp_path) -> dict[str, Path]:
  sd = ref.state_dict_numpy(m)
  files = {"fb.pth": tmp_path / "fb.pth", "timm.pth": tmp_path / "timm.pth",
           "timm.safetensors": tmp_path / "timm.safetensors",
           "hf.safetensors": tmp_path / "hf.safetensors"}
  torch.save(m.state_dict(), files["fb.pth"])
  timm_sd = ref.to_timm(sd)
  torch.save({k: torch.from_numpy(v) for k, v in timm_sd.items()}, files["timm.pth"])
  save_file(timm_sd, files["timm.safetensors"])
  save_file(ref.to_hf(sd), files["hf.safetensors"])
  return files


def test_all_formats_convert_and_agree(torch_model, images, tmp_path):
  files = _write_all_formats(torch_model, tmp_path)
  want = _torch_layers(torch_model, images)
  converted = {}
  for name, path in files.items():
    sd = load_state_dict(path)
    fmt = detect_format(sd)
    assert fmt == name.split(".")[0]
    params, arch = convert(sd)
    assert arch == dict(width=WIDTH, depth=DEPTH, num_heads=HEADS,
                        num_register_tokens=torch_model.num_register_tokens, patch_size=14,
                        pretrain_grid=37, mlp_ratio=4.0)
    converted[name] = params
    _assert_close(want, _flax_layers(arch, params, images))
  # fb and hf carry the same numbers; timm folds the cls position into cls_token.
  jax.tree.map(np.testing.assert_array_equal, converted["fb.pth"], converted["hf.safetensors"])
  jax.tree.map(np.testing.assert_array_equal, converted["timm.pth"], converted["timm.safetensors"])
  fb, timm = converted["fb.pth"], converted["timm.pth"]
  np.testing.assert_array_equal(fb["blocks_1"]["attn"]["qkv"]["kernel"],
                                timm["blocks_1"]["attn"]["qkv"]["kernel"])


def test_chunked_and_prefixed_checkpoints(images):
  m = _model(4)
  sd = ref.state_dict_numpy(m)
  want, _ = convert(sd)
  # DINOv2 training checkpoints with block_chunks=2: blocks.{chunk}.{i}.*
  chunked = {(k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 2}.", 1)
              if k.startswith("blocks.") else k): v for k, v in sd.items()}
  got, _ = convert(chunked)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  # A full-model state dict: keys outside the prefix are ignored.
  full = {f"encoder.{k}": v for k, v in sd.items()}
  full["prototype_token"] = np.zeros((6, WIDTH), np.float32)
  full["decoder.0.norm1.weight"] = np.zeros((WIDTH,), np.float32)
  got, _ = convert(full, prefix="encoder.")
  jax.tree.map(np.testing.assert_array_equal, want, got)
  with pytest.raises(ConversionError, match="prefix='encoder.'"):
    convert(full)  # forgot the prefix: the error says which one to pass


@pytest.mark.parametrize("fmt", ["fb", "hf"])
def test_strict_errors_list_every_problem(fmt):
  sd = ref.state_dict_numpy(_model(4))
  if fmt == "hf":
    sd = ref.to_hf(sd)
    missing, wrong = "encoder.layer.1.layer_scale1.lambda1", "encoder.layer.0.mlp.fc2.bias"
  else:
    missing, wrong = "blocks.1.ls1.gamma", "blocks.0.mlp.fc2.bias"
  bad = dict(sd)
  del bad[missing]
  bad["head.weight"] = np.zeros((10, WIDTH), np.float32)
  bad[wrong] = np.zeros((WIDTH + 1,), np.float32)
  with pytest.raises(ConversionError) as e:
    convert(bad)
  msg = str(e.value)
  assert f"missing keys (1): ['{missing}']" in msg
  assert "unexpected keys (1): ['head.weight']" in msg
  assert (f"wrong shape (1): ['{wrong} ({WIDTH + 1},) -> blocks_0/mlp/fc2/bias: "
          f"({WIDTH + 1},), expected ({WIDTH},)']") in msg


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_each_strictness_error_alone(problem):
  sd = ref.state_dict_numpy(_model(0))
  if problem == "missing":
    del sd["norm.bias"]
    match = r"missing keys \(1\): \['norm.bias'\]"
  elif problem == "extra":
    sd["blocks.0.attn.q_norm.weight"] = np.ones((WIDTH,), np.float32)
    match = r"unexpected keys \(1\): \['blocks.0.attn.q_norm.weight'\]"
  else:
    sd["mask_token"] = np.zeros((1, 1, WIDTH), np.float32)
    match = (rf"wrong shape \(1\): \['mask_token \(1, 1, {WIDTH}\) -> mask_token: "
             rf"\(1, 1, {WIDTH}\), expected \(1, {WIDTH}\)'\]")
  with pytest.raises(ConversionError, match=match):
    convert(sd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(suffix, tmp_path):
  m = _model(4)
  path = tmp_path / f"ckpt{suffix}"
  if suffix == ".pth":
    torch.save(m.state_dict(), path)
  else:
    save_file(ref.state_dict_numpy(m), path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ConversionError, match="truncated or corrupt") as e:
    load_state_dict(path)
  assert str(path) in str(e.value)
  path.write_bytes(b"")
  with pytest.raises(ConversionError, match=str(path)):
    load_state_dict(path)
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / "nope.pth")


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "list.pth"
  torch.save([torch.zeros(2)], path)
  with pytest.raises(ConversionError, match="flat state dict"):
    load_state_dict(path)
  wrapped = tmp_path / "wrapped.pth"
  torch.save({"model": _model(0).state_dict(), "epoch": 3}, wrapped)
  assert "blocks.1.ls2.gamma" in load_state_dict(wrapped)


def test_cli_round_trip_reproduces_torch_blocks(images, tmp_path):
  m = _model(4, seed=11)
  src = tmp_path / "dinov2_vit_tiny_reg4_pretrain.pth"
  torch.save(m.state_dict(), src)
  out = tmp_path / "converted"
  proc = subprocess.run(
      [sys.executable, str(REPO / "weights_conversion" / "convert_dinov2.py"),
       "--input", str(src), "--output", str(out)],
      capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  params, meta = load_params(out)
  assert meta["kind"] == "dinov2" and meta["format"] == "fb"
  assert meta["source_file"] == str(src)
  assert meta["source_pos_embed_preset"] == "dinov2_hub_reg"  # what that source's code does
  _assert_close(_torch_layers(m, images), _flax_layers(meta["arch"], params, images))
  # Refuses to overwrite, and reports conversion errors without a traceback.
  assert convert_dinov2.main(["--input", str(src), "--output", str(out)]) == 2
  bad = tmp_path / "bad.pth"
  sd = m.state_dict()
  del sd["blocks.0.norm1.weight"]
  torch.save(sd, bad)
  assert convert_dinov2.main(["--input", str(bad), "--output", str(tmp_path / "o2")]) == 2
