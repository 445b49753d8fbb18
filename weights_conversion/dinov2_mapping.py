"""DINOv2 ViT weights (PyTorch) -> `inpformer_jax.models.vit.DinoViT` params, as a table.

Three source formats, told apart by their key names:
  fb    facebookresearch `dinov2_vit{s,b,l}14[_reg4]_pretrain.pth` (and the INP-Former /
        Dinomaly copy, `encoder.` inside a full INP-Former state dict). Chunked training
        checkpoints (`blocks.{chunk}.{i}.`) are accepted too.
  timm  `vit_*_patch14[_reg4]_dinov2`: no `mask_token`; the reg4 models use timm's
        `no_embed_class` layout, i.e. `reg_token`, `pos_embed` WITHOUT the cls position and
        `cls_token` = fb cls_token + fb pos_embed[:, 0] (timm `_convert_dinov2`). We rebuild
        the fb layout with a zero cls position, which computes the same tokens exactly.
  hf    Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`: `embeddings.*`,
        `encoder.layer.{i}.*` with unfused query/key/value (concatenated back into qkv).

`MAPPING` is built per format and architecture: flax path -> (torch key(s), transform).
Conversion is strict: every expected key must be present with its expected shape and no
other key may be left over; all problems are reported together.

No torch at import time: state dicts arrive as numpy (see `load_torch_file`).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Callable

import numpy as np

FORMATS = ("fb", "timm", "hf")

# Head count is not visible in any shape; DINOv2 uses head dim 64 for every released width.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}


class ConversionError(ValueError):
  """A state dict that does not convert (wrong format, missing/extra/mis-shaped keys)."""


# ---------------------------------------------------------------------------------------
# Transforms: torch tensor(s) -> flax array. Every one returns float32.
# ---------------------------------------------------------------------------------------


def _copy(x):
  return np.asarray(x, np.float32)


def _linear(w):
  return np.ascontiguousarray(np.asarray(w, np.float32).T)  # (out, in) -> (in, out)


def _conv(w):
  return np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _qkv_kernel(q, k, v):
  return _linear(np.concatenate([q, k, v], axis=0))  # fused rows are [q | k | v]


def _qkv_bias(q, k, v):
  return _copy(np.concatenate([q, k, v], axis=0))


def _prepend_zero_cls_pos(p):
  p = _copy(p)
  return np.concatenate([np.zeros_like(p[:, :1]), p], axis=1)


TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "copy": _copy,          # tokens, biases, LayerScale gamma
    "ln_scale": _copy,      # LayerNorm weight -> scale
    "linear": _linear,
    "conv": _conv,
    "qkv_kernel": _qkv_kernel,
    "qkv_bias": _qkv_bias,
    "pos_embed_no_cls": _prepend_zero_cls_pos,
}


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

# Per-block entries shared by fb and timm (identical block layout).
_FB_BLOCK = {
    "norm1/scale": ("norm1.weight", "ln_scale"),
    "norm1/bias": ("norm1.bias", "copy"),
    "attn/qkv/kernel": ("attn.qkv.weight", "linear"),
    "attn/qkv/bias": ("attn.qkv.bias", "copy"),
    "attn/proj/kernel": ("attn.proj.weight", "linear"),
    "attn/proj/bias": ("attn.proj.bias", "copy"),
    "ls1/gamma": ("ls1.gamma", "copy"),
    "norm2/scale": ("norm2.weight", "ln_scale"),
    "norm2/bias": ("norm2.bias", "copy"),
    "mlp/fc1/kernel": ("mlp.fc1.weight", "linear"),
    "mlp/fc1/bias": ("mlp.fc1.bias", "copy"),
    "mlp/fc2/kernel": ("mlp.fc2.weight", "linear"),
    "mlp/fc2/bias": ("mlp.fc2.bias", "copy"),
    "ls2/gamma": ("ls2.gamma", "copy"),
}

_HF_BLOCK = {
    "norm1/scale": ("norm1.weight", "ln_scale"),
    "norm1/bias": ("norm1.bias", "copy"),
    "attn/qkv/kernel": (tuple(f"attention.attention.{n}.weight"
                              for n in ("query", "key", "value")), "qkv_kernel"),
    "attn/qkv/bias": (tuple(f"attention.attention.{n}.bias"
                            for n in ("query", "key", "value")), "qkv_bias"),
    "attn/proj/kernel": ("attention.output.dense.weight", "linear"),
    "attn/proj/bias": ("attention.output.dense.bias", "copy"),
    "ls1/gamma": ("layer_scale1.lambda1", "copy"),
    "norm2/scale": ("norm2.weight", "ln_scale"),
    "norm2/bias": ("norm2.bias", "copy"),
    "mlp/fc1/kernel": ("mlp.fc1.weight", "linear"),
    "mlp/fc1/bias": ("mlp.fc1.bias", "copy"),
    "mlp/fc2/kernel": ("mlp.fc2.weight", "linear"),
    "mlp/fc2/bias": ("mlp.fc2.bias", "copy"),
    "ls2/gamma": ("layer_scale2.lambda1", "copy"),
}

# Key of the cls token, patch-embedding weight and block prefix, per format (used to infer
# the architecture before the full table can be built).
_CLS_KEY = {"fb": "cls_token", "timm": "cls_token", "hf": "embeddings.cls_token"}
_PATCH_KEY = {"fb": "patch_embed.proj.weight", "timm": "patch_embed.proj.weight",
              "hf": "embeddings.patch_embeddings.projection.weight"}
_POS_KEY = {"fb": "pos_embed", "timm": "pos_embed", "hf": "embeddings.position_embeddings"}
_REG_KEY = {"fb": "register_tokens", "timm": "reg_token", "hf": "embeddings.register_tokens"}
_BLOCK_PREFIX = {"fb": "blocks.", "timm": "blocks.", "hf": "encoder.layer."}
_FC1_KEY = {"fb": "mlp.fc1.weight", "timm": "mlp.fc1.weight", "hf": "mlp.fc1.weight"}


def build_mapping(fmt: str, depth: int, num_register_tokens: int,
                  timm_pos_has_cls: bool = True) -> dict[str, tuple[str | tuple[str, ...] | None, str]]:
  """MAPPING[flax_path] = (torch key, or tuple of keys, or None for zeros; transform name)."""
  if fmt not in FORMATS:
    raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if fmt == "hf":
    m = {
        "cls_token": ("embeddings.cls_token", "copy"),
        "pos_embed": ("embeddings.position_embeddings", "copy"),
        "mask_token": ("embeddings.mask_token", "copy"),
        "patch_embed/kernel": ("embeddings.patch_embeddings.projection.weight", "conv"),
        "patch_embed/bias": ("embeddings.patch_embeddings.projection.bias", "copy"),
        "norm/scale": ("layernorm.weight", "ln_scale"),
        "norm/bias": ("layernorm.bias", "copy"),
    }
    block, prefix = _HF_BLOCK, "encoder.layer."
  else:
    m = {
        "cls_token": ("cls_token", "copy"),
        "pos_embed": ("pos_embed", "copy"),
        "mask_token": ("mask_token", "copy"),
        "patch_embed/kernel": ("patch_embed.proj.weight", "conv"),
        "patch_embed/bias": ("patch_embed.proj.bias", "copy"),
        "norm/scale": ("norm.weight", "ln_scale"),
        "norm/bias": ("norm.bias", "copy"),
    }
    block, prefix = _FB_BLOCK, "blocks."
    if fmt == "timm":
      m["mask_token"] = (None, "copy")  # timm drops it; it is never used, so zeros
      if not timm_pos_has_cls:
        m["pos_embed"] = ("pos_embed", "pos_embed_no_cls")
  if num_register_tokens:
    m["register_tokens"] = (_REG_KEY[fmt], "copy")
  for i in range(depth):
    for leaf, (key, kind) in block.items():
      key = tuple(f"{prefix}{i}.{k}" for k in key) if isinstance(key, tuple) else f"{prefix}{i}.{key}"
      m[f"blocks_{i}/{leaf}"] = (key, kind)
  return m


def expected_torch_shapes(fmt: str, arch: dict, timm_pos_has_cls: bool = True) -> dict:
  """torch key -> shape for a `fmt` state dict of architecture `arch`."""
  d, r, g, p = arch["width"], arch["num_register_tokens"], arch["pretrain_grid"], arch["patch_size"]
  hid = int(round(d * arch["mlp_ratio"]))
  mapping = build_mapping(fmt, arch["depth"], r, timm_pos_has_cls)
  # torch-side shapes, indexed by the flax path they map to
  top_shapes = {
      "cls_token": (1, 1, d), "pos_embed": (1, 1 + g * g, d), "mask_token": (1, d),
      "register_tokens": (1, r, d), "patch_embed/kernel": (d, 3, p, p),
      "patch_embed/bias": (d,), "norm/scale": (d,), "norm/bias": (d,),
  }
  leaf_shapes = {
      "norm1/scale": (d,), "norm1/bias": (d,), "norm2/scale": (d,), "norm2/bias": (d,),
      "attn/qkv/kernel": (3 * d, d), "attn/qkv/bias": (3 * d,),
      "attn/proj/kernel": (d, d), "attn/proj/bias": (d,), "ls1/gamma": (d,), "ls2/gamma": (d,),
      "mlp/fc1/kernel": (hid, d), "mlp/fc1/bias": (hid,),
      "mlp/fc2/kernel": (d, hid), "mlp/fc2/bias": (d,),
  }
  out = {}
  for path, (key, kind) in mapping.items():
    shape = top_shapes.get(path) or leaf_shapes[path.split("/", 1)[1]]
    if key is None:
      continue
    if kind == "pos_embed_no_cls":
      shape = (1, g * g, d)
    if isinstance(key, tuple):  # unfused q/k/v: each a third of the fused rows
      for k in key:
        out[k] = (shape[0] // 3,) + tuple(shape[1:])
    else:
      out[key] = tuple(shape)
  return out


# ---------------------------------------------------------------------------------------
# Format and architecture inference
# ---------------------------------------------------------------------------------------

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
  if not prefix:
    return dict(state_dict)
  out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not out:
    raise ConversionError(
        f"no key starts with prefix {prefix!r}; first keys: {sorted(state_dict)[:8]}")
  return out


def _unchunk(sd: dict) -> dict:
  """`blocks.{chunk}.{i}.x` (DINOv2 training checkpoints, block_chunks>0) -> `blocks.{i}.x`."""
  if not any(_CHUNKED.match(k) for k in sd):
    return sd
  return {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in sd.items()}


def _prefix_hint(keys) -> str:
  for k in keys:
    for marker in ("embeddings.cls_token", "cls_token"):
      if k.endswith(marker) and k not in ("cls_token", "embeddings.cls_token"):
        return f" (keys look prefixed: pass prefix={k[:-len(marker)]!r})"
  return ""


def detect_format(state_dict: dict, prefix: str = "") -> str:
  """'fb' | 'timm' | 'hf' from the key names (after removing `prefix`)."""
  keys = set(_strip_prefix(state_dict, prefix))
  if "embeddings.cls_token" in keys or any(k.startswith("encoder.layer.") for k in keys):
    return "hf"
  if "cls_token" in keys:
    if "reg_token" in keys:
      return "timm"
    if "mask_token" in keys or "register_tokens" in keys:
      return "fb"
    return "timm"  # timm drops mask_token; no-reg timm is otherwise the fb layout
  raise ConversionError(
      "not a DINOv2 ViT state dict: no 'cls_token' / 'embeddings.cls_token' key"
      f"{_prefix_hint(keys)}; first keys: {sorted(keys)[:8]}")


def _need(sd: dict, key: str, fmt: str):
  if key not in sd:
    raise ConversionError(f"{fmt}-format state dict lacks {key!r}, needed to infer the "
                          f"architecture; keys: {sorted(sd)[:12]}...")
  return sd[key]


def infer_arch(sd: dict, fmt: str, num_heads: int | None = None) -> tuple[dict, bool]:
  """(DinoViT keyword arguments, timm_pos_has_cls) from the shapes of an unprefixed sd."""
  width = int(np.shape(_need(sd, _CLS_KEY[fmt], fmt))[-1])
  pw = np.shape(_need(sd, _PATCH_KEY[fmt], fmt))
  if len(pw) != 4 or pw[2] != pw[3]:
    raise ConversionError(f"{_PATCH_KEY[fmt]} has shape {pw}; expected (D, 3, p, p)")
  patch = int(pw[-1])
  pat = re.compile("^" + re.escape(_BLOCK_PREFIX[fmt]) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  if not idx:
    raise ConversionError(f"no transformer blocks ({_BLOCK_PREFIX[fmt]}{{i}}.*) found")
  depth = max(idx) + 1
  fc1 = np.shape(_need(sd, f"{_BLOCK_PREFIX[fmt]}0.{_FC1_KEY[fmt]}", fmt))
  mlp_ratio = fc1[0] / width
  reg = sd.get(_REG_KEY[fmt])
  num_reg = int(np.shape(reg)[1]) if reg is not None else 0
  n = int(np.shape(_need(sd, _POS_KEY[fmt], fmt))[1])
  timm_pos_has_cls = True
  if fmt == "timm" and math.isqrt(n) ** 2 == n:
    timm_pos_has_cls = False  # no_embed_class layout (the reg4 models)
  else:
    n -= 1
  grid = math.isqrt(n)
  if grid * grid != n:
    raise ConversionError(f"{_POS_KEY[fmt]} has {n} patch positions, not a square grid")
  if num_heads is None:
    if width in HEADS_BY_WIDTH:
      num_heads = HEADS_BY_WIDTH[width]
    elif width % 64 == 0:
      num_heads = width // 64
    elif width % 32 == 0:
      num_heads = width // 32
    else:
      raise ConversionError(f"cannot guess the head count for width {width}; pass num_heads=")
  if width % num_heads:
    raise ConversionError(f"width {width} is not divisible by num_heads={num_heads}")
  arch = dict(width=width, depth=depth, num_heads=int(num_heads), num_register_tokens=num_reg,
              patch_size=patch, pretrain_grid=grid, mlp_ratio=float(mlp_ratio))
  return arch, timm_pos_has_cls


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def convert_state_dict(state_dict: dict, prefix: str = "", *, fmt: str | None = None,
                       num_heads: int | None = None) -> tuple[dict, dict]:
  """torch-style state dict (key -> numpy array) -> (DinoViT params, arch).

  Args:
    state_dict: flat dict of arrays (numpy or anything `np.asarray` accepts).
    prefix: only keys starting with it are converted (others ignored), e.g. 'encoder.' in a
      full INP-Former checkpoint, 'module.', 'backbone.'.
    fmt: 'fb' | 'timm' | 'hf'; detected from the key names when None.
    num_heads: head count; from the width (384:6, 768:12, 1024:16, else head dim 64, then 32)
      when None. No shape reveals it.

  Returns:
    params: nested dict for `DinoViT(**arch).apply({'params': params}, ...)`, float32 numpy.
    arch: DinoViT keyword arguments (width, depth, num_heads, num_register_tokens,
      patch_size, pretrain_grid, mlp_ratio).

  Raises:
    ConversionError listing every missing, unexpected and mis-shaped key.
  """
  sd = _strip_prefix(state_dict, prefix)
  fmt = fmt or detect_format(sd)
  if fmt not in FORMATS:
    raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if fmt == "fb":
    sd = _unchunk(sd)
  arch, pos_has_cls = infer_arch(sd, fmt, num_heads)
  expected = expected_torch_shapes(fmt, arch, pos_has_cls)
  missing = sorted(k for k in expected if k not in sd)
  unexpected = sorted(k for k in sd if k not in expected)
  misshaped = sorted(f"{k}: {tuple(np.shape(sd[k]))} != expected {expected[k]}"
                     for k in expected if k in sd and tuple(np.shape(sd[k])) != expected[k])
  if missing or unexpected or misshaped:
    lines = [f"cannot convert this {fmt}-format DINOv2 state dict (inferred {arch}"
             f"{', prefix ' + repr(prefix) if prefix else ''}):"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {missing}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}{_prefix_hint(unexpected)}")
    if misshaped:
      lines.append(f"  wrong shapes ({len(misshaped)}): {misshaped}")
    raise ConversionError("\n".join(lines))
  flat = {}
  for path, (key, kind) in build_mapping(fmt, arch["depth"], arch["num_register_tokens"],
                                         pos_has_cls).items():
    if key is None:
      flat[path] = np.zeros((1, arch["width"]), np.float32)
    elif isinstance(key, tuple):
      flat[path] = TRANSFORMS[kind](*(np.asarray(sd[k]) for k in key))
    else:
      flat[path] = TRANSFORMS[kind](np.asarray(sd[key]))
  return _unflatten(flat), arch


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "teacher")


def _to_numpy(v):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(v, torch.Tensor):
    v = v.detach().cpu()
    if v.dtype in (torch.bfloat16, torch.float16):
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt`/`.bin` (torch.load, weights_only) or `.safetensors` file.

  A checkpoint that wraps its weights in {'state_dict'|'model'|'teacher': {...}} is unwrapped.
  Truncated or corrupt files raise ConversionError naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      sd = load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
      if "bfloat16" in str(e) or "bf16" in str(e).lower():
        from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
        return {k: _to_numpy(v) for k, v in load_torch(path).items()}
      raise ConversionError(f"{path}: cannot read this safetensors file ({e}); it is "
                            "probably truncated or corrupt: delete it and download it again") from e
    return {k: np.asarray(v) for k, v in sd.items()}

  import torch  # pylint: disable=g-import-not-at-top
  if os.path.getsize(path) == 0:
    raise ConversionError(f"{path} is empty (an interrupted download?): delete it and retry")
  if zipfile.is_zipfile(path) is False:
    with open(path, "rb") as f:
      magic = f.read(2)
    if not magic.startswith(b"\x80"):  # neither torch's zip format nor a legacy pickle
      raise ConversionError(f"{path} is not a torch checkpoint (no zip directory, no pickle "
                            "header); it is probably truncated or corrupt: delete it and "
                            "download it again")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/...
    raise ConversionError(f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the file is truncated, "
                          "corrupt or not a plain state dict: re-download or re-save it with "
                          "torch.save(model.state_dict(), path)") from e
  if isinstance(obj, dict):
    for wrapper in _WRAPPER_KEYS:
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    top = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ConversionError(f"{path} does not hold a flat state dict of tensors (top level: {top})")
  return {k: _to_numpy(v) for k, v in obj.items()}
