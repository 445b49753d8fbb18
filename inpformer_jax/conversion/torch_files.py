"""Reads PyTorch checkpoint files into flat {key: numpy array} dicts, without torch.

Formats: what `torch.save` writes (the zip format of torch >= 1.6 and the legacy pickle stream
before it; `.pth`, `.pt`, `.bin`) and `.safetensors`. torch is not imported because the core
package runs without torch. The pickles go through a restricted unpickler with the same refusals
as torch.load(weights_only=True): torch's globals resolve to stand-ins defined here, anything
else stops the load before it is called, so a hostile file never runs code.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from inpformer_jax import errors
from inpformer_jax.conversion import ConversionError

_WRAPPER_KEYS = ("state_dict", "model", "teacher")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_FIX = "delete it and download it again"
_RESAVE = "re-save it with torch.save(model.state_dict(), path)"

_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "int8": np.int8, "int16": np.int16, "int32": np.int32,
    "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}
# Widened to float32 as the torch-based reader did (`.float()`); float32 holds each value exactly.
_WIDEN = {np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                ml_dtypes.float8_e5m2)}
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 names the tensor's dtype itself
}
_SAFETENSORS = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
    "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class _StandIn:
  # pickle's BUILD calls __setstate__ when there is one; without it, it would setattr freely
  # on our stand-ins (or a function's __defaults__), so the pickle could edit this module.
  __slots__ = ()

  def __setstate__(self, state):
    raise pickle.UnpicklingError("BUILD on a torch stand-in")


class _Global(_StandIn):
  __slots__ = ("fn",)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


class _Dtype(_StandIn):
  __slots__ = ("dtype",)

  def __init__(self, name):
    self.dtype = np.dtype(_DTYPES[name])


class _Storage(_StandIn):
  __slots__ = ("dtype", "numel", "data", "big_endian")

  def __init__(self, stype, numel, data=None, big_endian=False):
    if not isinstance(stype, _Dtype):
      raise pickle.UnpicklingError(f"a storage of type {type(stype).__name__}")
    self.dtype, self.numel, self.data, self.big_endian = stype.dtype, numel, data, big_endian


class _Tensor(_StandIn):
  __slots__ = ("storage", "dtype", "offset", "size", "stride", "metadata")

  def __init__(self, storage, dtype, offset, size, stride, metadata):
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
      raise pickle.UnpicklingError("a tensor without a storage")
    self.storage, self.dtype, self.offset = storage, dtype, offset
    self.size, self.stride, self.metadata = size, stride, metadata or {}


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  return _Tensor(storage, getattr(storage, "dtype", None), offset, size, stride, metadata)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  return _Tensor(storage, getattr(dtype, "dtype", None), offset, size, stride, metadata)


def _rebuild_from_type_v2(func, new_type, args, state):
  if new_type is not _TENSOR_TYPE or not isinstance(func, _Global):
    raise pickle.UnpicklingError("a tensor subclass")
  return func(*args)


def _encode(text, encoding="latin1"):  # how protocol 2 spells bytes; only that, not any codec
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode outside the bytes idiom")
  return text.encode("latin-1")


_TENSOR_TYPE = _Global(None)
_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,  # C types: BUILD cannot setattr them
    "collections.Counter": _Global(collections.Counter),  # a Python class: wrapped
    "builtins.set": set, "builtins.bytearray": bytearray, "builtins.complex": complex,
    "_codecs.encode": _Global(_encode), "torch.Size": tuple,
    "torch.device": _Global(lambda *args: ("device",) + args),
    "torch.Tensor": _TENSOR_TYPE, "torch.nn.parameter.Parameter": _TENSOR_TYPE,
    "torch._utils._rebuild_tensor": _Global(_rebuild_v2),
    "torch._utils._rebuild_tensor_v2": _Global(_rebuild_v2),
    "torch._utils._rebuild_tensor_v3": _Global(_rebuild_v3),
    "torch._utils._rebuild_parameter": _Global(lambda data, *_: data),
    "torch._utils._rebuild_parameter_with_state": _Global(lambda data, *_: data),
    "torch._tensor._rebuild_from_type_v2": _Global(_rebuild_from_type_v2),
}


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler whose globals are the stand-ins above and nothing else."""

  def __init__(self, file, path, persistent_load=None):
    super().__init__(file, encoding="utf-8")
    self._path, self._persistent = path, persistent_load

  def find_class(self, module, name):
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 pickles, as torch maps them
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = _GLOBALS.get(f"{module}.{name}")
    if found is not None:
      return found
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGES:
      return _Dtype(_STORAGES[name])
    if module == "torch" and name in _DTYPES:
      return _Dtype(name)
    raise ConversionError(f"{self._path} holds objects other than tensors ({module}.{name}); "
                          f"it was not executed: load it with the code that wrote it and {_RESAVE}")

  def persistent_load(self, pid):
    if self._persistent is None or not isinstance(pid, tuple) or pid[:1] != ("storage",):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    return self._persistent(*pid[1:])


def _read(f, n, size):
  if n < 0 or f.tell() + n > size:  # checked first: a corrupt count must not allocate terabytes
    raise EOFError(f"{n} bytes announced past the end of the file")
  return f.read(n)


def _load_zip(path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkl:
      raise ConversionError(f"{path} is a zip file but not a torch.save checkpoint (no "
                            f"<archive>/data.pkl): {_RESAVE}")
    prefix = pkl[0][:-len("/data.pkl")]  # torch names the folder after the file it saved first
    # Without a byteorder record torch assumes little-endian; so does this.
    order = zf.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in names else b"little"
    if order not in (b"little", b"big"):
      raise ValueError(f"byteorder record {order[:20]!r}")
    storages = {}

    def load(stype, key, location, numel):
      if key not in storages:
        storage, info = _Storage(stype, numel), zf.getinfo(f"{prefix}/data/{key}")
        if info.file_size != numel * storage.dtype.itemsize:
          raise ValueError(f"storage {key} holds {info.file_size} bytes, not {numel} elements")
        storage.data, storage.big_endian = zf.read(info), order == b"big"
        storages[key] = storage
      return storages[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), path, load).load()


def _load_legacy(path):
  size = os.path.getsize(path)
  storages, views = {}, []

  def load(stype, root_key, location, numel, view_metadata):
    if root_key not in storages:
      storages[root_key] = _Storage(stype, numel)
    root = storages[root_key]
    if view_metadata is None:
      return root
    _, offset, view_size = view_metadata  # pre-0.4 storage slices, in elements of the root
    views.append((_Storage(stype, view_size), root, offset))
    return views[-1][0]

  with open(path, "rb") as f:
    if _Unpickler(f, path).load() != _LEGACY_MAGIC:
      raise ConversionError(f"{path} is a pickle but not a torch.save checkpoint (no torch magic "
                            f"number): {_RESAVE}")
    if _Unpickler(f, path).load() != _LEGACY_PROTOCOL:
      raise ConversionError(f"{path} uses an unknown legacy torch.save protocol: {_RESAVE}")
    _Unpickler(f, path).load()  # sys_info: storages are little-endian on disk whatever it says
    obj = _Unpickler(f, path, load).load()
    for key in _Unpickler(f, path).load():
      storage = storages[key]
      (count,) = struct.unpack("<q", _read(f, 8, size))
      if count != storage.numel:
        raise ValueError(f"storage {key} holds {count} elements, not {storage.numel}")
      storage.data = _read(f, count * storage.dtype.itemsize, size)
  for view, root, offset in views:
    view.data = root.data[offset * root.dtype.itemsize:][:view.numel * root.dtype.itemsize]
  return obj


def _to_numpy(t: _Tensor) -> np.ndarray:
  s, dtype = t.storage, t.dtype
  if s.data is None or len(s.data) % dtype.itemsize:
    raise ValueError("a tensor whose storage is missing or of the wrong size")
  flat = np.frombuffer(s.data, dtype=dtype)
  offset, size, stride = int(t.offset), tuple(map(int, t.size)), tuple(map(int, t.stride))
  if len(size) != len(stride) or min((offset,) + size + stride) < 0:
    raise ValueError(f"tensor geometry offset={offset} size={size} stride={stride}")
  if not all(size):
    return np.zeros(size, np.float32 if dtype in _WIDEN else dtype)
  # as_strided trusts its arguments, so the last element must be checked against the storage.
  if offset + sum((n - 1) * st for n, st in zip(size, stride)) >= len(flat):
    raise ValueError(f"tensor (offset={offset} size={size} stride={stride}) is out of bounds")
  # Strided as raw bytes: as_strided goes through __array_interface__, which loses ml_dtypes' types.
  raw = np.dtype((np.void, dtype.itemsize))
  arr = np.empty(size, dtype)
  arr.view(raw)[...] = np.lib.stride_tricks.as_strided(
      flat.view(raw)[offset:], size, [st * dtype.itemsize for st in stride], writeable=False)
  if s.big_endian:
    arr = arr.byteswap()
  if t.metadata.get("conj"):  # torch stores a conj()/neg view's data and a bit, not the result
    arr = np.conj(arr)
  if t.metadata.get("neg"):
    arr = np.negative(arr)
  return arr.astype(np.float32) if dtype in _WIDEN else arr


def _load_safetensors(path):
  size, out = os.path.getsize(path), {}
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", _read(f, 8, size))
    header = json.loads(_read(f, n, size))
    for key, info in header.items():
      if key == "__metadata__":
        continue
      if info["dtype"] not in _SAFETENSORS:
        raise ConversionError(f"{path}: tensor {key} has dtype {info['dtype']}, which this reader "
                              "does not convert: save it as F32 or BF16")
      dtype = np.dtype(_DTYPES[_SAFETENSORS[info["dtype"]]])
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(x) for x in info["data_offsets"])
      if begin < 0 or end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
        raise ValueError(f"tensor {key}: data_offsets {begin}..{end} for shape {shape}")
      arr = np.empty(shape, dtype)  # read straight into an array that owns its memory
      f.seek(8 + n + begin)
      if f.readinto(arr.reshape(-1).view(np.uint8)) != end - begin:
        raise EOFError(f"tensor {key} is cut short")
      out[key] = arr.astype(np.float32) if dtype in _WIDEN else arr
  return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """.pth/.pt/.bin (torch.save: zip or legacy pre-1.6 format) or .safetensors -> {key: array}.

  A checkpoint that wraps its weights in {'state_dict'|'model'|'teacher': {...}} is unwrapped.
  bfloat16/float16 become float32 (exactly); other dtypes are kept. Missing file:
  FileNotFoundError; empty, truncated, corrupt or non-tensor content: ConversionError.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"checkpoint file {path} does not exist")
  if os.path.getsize(path) == 0:
    raise ConversionError(f"{path} is empty (an interrupted download?): {_FIX}")
  with open(path, "rb") as f:
    head = f.read(4)
  try:
    if path.endswith(".safetensors"):
      return _load_safetensors(path)
    if head == b"PK\x03\x04":
      obj = _load_zip(path)
    elif head[:1] == b"\x80":  # a pickle's PROTO opcode: the legacy format
      obj = _load_legacy(path)
    else:
      raise ConversionError(f"{path} is not a torch checkpoint (neither a zip archive nor a "
                            f"pickle); it is probably truncated or corrupt: {_FIX}")
    if isinstance(obj, dict):
      for wrapper in _WRAPPER_KEYS:
        if isinstance(obj.get(wrapper), dict):
          obj = obj[wrapper]
          break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
      top = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
      raise ConversionError(f"{path} does not hold a flat state dict of tensors (top level: {top})")
    return {k: _to_numpy(v) for k, v in obj.items()}
  except ConversionError:
    raise
  except Exception as e:  # zipfile/pickle/struct/json each raise their own kinds for bad bytes
    raise ConversionError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}): {_FIX}") from e
