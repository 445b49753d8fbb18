"""DINOv2 ViT weights (PyTorch) -> `models.vit.DinoViT` params, as a table.

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
The architecture is read from the shapes; the head count, which no shape shows, from the width.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from inpformer_jax import checkpoint
from inpformer_jax import params as params_lib
from inpformer_jax.conversion import ConversionError
from inpformer_jax.conversion import mapping
from inpformer_jax.conversion import torch_files
from inpformer_jax.models import vit

FORMATS = ("fb", "timm", "hf")

# Head count is not visible in any shape; DINOv2 uses head dim 64 for every released width.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}

_FB_BLOCK = {
    "norm1/scale": ("norm1.weight", "copy"),
    "norm1/bias": ("norm1.bias", "copy"),
    "attn/qkv/kernel": ("attn.qkv.weight", "linear"),
    "attn/qkv/bias": ("attn.qkv.bias", "copy"),
    "attn/proj/kernel": ("attn.proj.weight", "linear"),
    "attn/proj/bias": ("attn.proj.bias", "copy"),
    "ls1/gamma": ("ls1.gamma", "copy"),
    "norm2/scale": ("norm2.weight", "copy"),
    "norm2/bias": ("norm2.bias", "copy"),
    "mlp/fc1/kernel": ("mlp.fc1.weight", "linear"),
    "mlp/fc1/bias": ("mlp.fc1.bias", "copy"),
    "mlp/fc2/kernel": ("mlp.fc2.weight", "linear"),
    "mlp/fc2/bias": ("mlp.fc2.bias", "copy"),
    "ls2/gamma": ("ls2.gamma", "copy"),
}
_HF_BLOCK = {
    **_FB_BLOCK,
    "attn/qkv/kernel": (tuple(f"attention.attention.{n}.weight" for n in ("query", "key", "value")),
                        "concat_linear"),
    "attn/qkv/bias": (tuple(f"attention.attention.{n}.bias" for n in ("query", "key", "value")),
                      "concat"),
    "attn/proj/kernel": ("attention.output.dense.weight", "linear"),
    "attn/proj/bias": ("attention.output.dense.bias", "copy"),
    "ls1/gamma": ("layer_scale1.lambda1", "copy"),
    "ls2/gamma": ("layer_scale2.lambda1", "copy"),
}
_TOP = {
    "fb": {"cls_token": "cls_token", "pos_embed": "pos_embed", "mask_token": "mask_token",
           "register_tokens": "register_tokens", "patch_embed": "patch_embed.proj",
           "norm": "norm", "blocks": "blocks."},
    "hf": {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "mask_token": "embeddings.mask_token", "register_tokens": "embeddings.register_tokens",
           "patch_embed": "embeddings.patch_embeddings.projection", "norm": "layernorm",
           "blocks": "encoder.layer."},
}
_TOP["timm"] = {**_TOP["fb"], "mask_token": None, "register_tokens": "reg_token"}
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def table(fmt: str, depth: int, num_register_tokens: int, timm_pos_has_cls: bool = True
          ) -> mapping.Table:
  """MAPPING[flax path] = (torch key(s), hook) for a `fmt` state dict."""
  top = _TOP[fmt]
  m: mapping.Table = {
      "cls_token": (top["cls_token"], "copy"),
      "pos_embed": (top["pos_embed"], "copy" if timm_pos_has_cls else "prepend_zero_position"),
      # timm drops the mask token; it is never used, so zeros.
      "mask_token": (top["mask_token"], "copy") if top["mask_token"] else (None, "zeros"),
      "patch_embed/kernel": (f"{top['patch_embed']}.weight", "conv"),
      "patch_embed/bias": (f"{top['patch_embed']}.bias", "copy"),
      "norm/scale": (f"{top['norm']}.weight", "copy"),
      "norm/bias": (f"{top['norm']}.bias", "copy"),
  }
  if num_register_tokens:
    m["register_tokens"] = (top["register_tokens"], "copy")
  block = _HF_BLOCK if fmt == "hf" else _FB_BLOCK
  for i in range(depth):
    m.update(mapping.prefixed(block, f"blocks_{i}", f"{top['blocks']}{i}."))
  return m


def detect_format(state_dict: Mapping, prefix: str = "") -> str:
  """'fb' | 'timm' | 'hf' from the key names (after removing `prefix`)."""
  keys = set(strip_prefix(state_dict, prefix))
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


def strip_prefix(state_dict: Mapping, prefix: str) -> dict:
  if not prefix:
    return dict(state_dict)
  out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not out:
    raise ConversionError(
        f"no key starts with prefix {prefix!r}; first keys: {sorted(state_dict)[:8]}")
  return out


def _prefix_hint(keys) -> str:
  for k in keys:
    for marker in ("embeddings.cls_token", "cls_token"):
      if k.endswith(marker) and k not in ("cls_token", "embeddings.cls_token"):
        return f" (keys look prefixed: pass prefix={k[:-len(marker)]!r})"
  return ""


def _need(sd: Mapping, key: str, fmt: str):
  if key not in sd:
    raise ConversionError(f"{fmt}-format state dict lacks {key!r}, needed to infer the "
                          f"architecture; keys: {sorted(sd)[:12]}...")
  return sd[key]


def infer_arch(sd: Mapping, fmt: str, num_heads: int | None = None) -> tuple[dict, bool]:
  """(DinoViT keyword arguments, timm_pos_has_cls) from the shapes of an unprefixed sd."""
  top = _TOP[fmt]
  width = int(np.shape(_need(sd, top["cls_token"], fmt))[-1])
  pw = np.shape(_need(sd, f"{top['patch_embed']}.weight", fmt))
  if len(pw) != 4 or pw[2] != pw[3]:
    raise ConversionError(f"{top['patch_embed']}.weight has shape {pw}; expected (D, 3, p, p)")
  pat = re.compile("^" + re.escape(top["blocks"]) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  if not idx:
    raise ConversionError(f"no transformer blocks ({top['blocks']}{{i}}.*) found")
  fc1 = np.shape(_need(sd, f"{top['blocks']}0.mlp.fc1.weight", fmt))
  reg = sd.get(top["register_tokens"])
  n = int(np.shape(_need(sd, top["pos_embed"], fmt))[1])
  timm_pos_has_cls = not (fmt == "timm" and math.isqrt(n) ** 2 == n)  # no_embed_class (reg4)
  n -= timm_pos_has_cls
  grid = math.isqrt(n)
  if grid * grid != n:
    raise ConversionError(f"{top['pos_embed']} has {n} patch positions, not a square grid")
  if num_heads is None:
    num_heads = HEADS_BY_WIDTH.get(width) or next(
        (width // d for d in (64, 32) if width % d == 0), None)
    if num_heads is None:
      raise ConversionError(f"cannot guess the head count for width {width}; pass num_heads=")
  if width % num_heads:
    raise ConversionError(f"width {width} is not divisible by num_heads={num_heads}")
  arch = dict(width=width, depth=max(idx) + 1, num_heads=int(num_heads),
              num_register_tokens=int(np.shape(reg)[1]) if reg is not None else 0,
              patch_size=int(pw[-1]), pretrain_grid=grid, mlp_ratio=float(fc1[0] / width))
  return arch, timm_pos_has_cls


def model_shapes(arch: Mapping) -> dict[str, tuple[int, ...]]:
  """{flax path: shape} of every parameter of DinoViT(**arch) (no compute)."""
  model = vit.DinoViT(**arch)
  side = arch["patch_size"] * arch["pretrain_grid"]  # the stored grid: no interpolation
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  return params_lib.shapes(jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"])


def convert(state_dict: Mapping, prefix: str = "", *, fmt: str | None = None,
            num_heads: int | None = None) -> tuple[dict, dict]:
  """torch-style state dict (key -> numpy array) -> (DinoViT params, arch).

  prefix: only keys starting with it are converted (others ignored), e.g. 'encoder.' in a
    full INP-Former checkpoint, 'module.', 'backbone.'.
  fmt: 'fb' | 'timm' | 'hf'; detected from the key names when None.
  num_heads: head count; from the width (384:6, 768:12, 1024:16, else head dim 64, then 32).
  Returns float32 numpy params for `DinoViT(**arch)` and arch (width, depth, num_heads,
  num_register_tokens, patch_size, pretrain_grid, mlp_ratio). Raises ConversionError listing
  every missing, unexpected and mis-shaped key.
  """
  sd = strip_prefix(state_dict, prefix)
  fmt = fmt or detect_format(sd)
  if fmt not in FORMATS:
    raise ConversionError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if fmt == "fb" and any(_CHUNKED.match(k) for k in sd):  # block_chunks > 0
    sd = {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in sd.items()}
  arch, pos_has_cls = infer_arch(sd, fmt, num_heads)
  t = table(fmt, arch["depth"], arch["num_register_tokens"], pos_has_cls)
  what = (f"this {fmt}-format DINOv2 state dict (inferred {arch}"
          f"{', prefix ' + repr(prefix) if prefix else ''})")
  hint = _prefix_hint(set(sd) - set(mapping.torch_keys(t)))
  return mapping.convert(sd, t, model_shapes(arch), what=what, hint=hint), arch


def source_pos_embed_preset(fmt: str, arch: Mapping) -> str:
  """The `vit.POS_EMBED_PRESETS` name the source's own model interpolates with: a record
  only. Nothing applies it, because INP-Former runs every encoder with 'inpformer' (its
  official code does so with the hub reg4 files); `config.model.pos_embed_preset` chooses."""
  regs = bool(arch["num_register_tokens"])
  if fmt == "hf":
    return "hf_dinov2_registers" if regs else "hf_dinov2"
  if fmt == "timm":
    return "timm"
  return "dinov2_hub_reg" if regs else "inpformer"  # hub: reg models 0 + antialias, else 0.1


def convert_file(input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                 prefix: str = "", fmt: str | None = None, num_heads: int | None = None) -> dict:
  """A DINOv2 checkpoint file -> a params directory (`checkpoint.save_params`); -> its meta."""
  sd = torch_files.load_state_dict(input_path)
  fmt = fmt or detect_format(sd, prefix)
  params, arch = convert(sd, prefix, fmt=fmt, num_heads=num_heads)
  meta = {"kind": "dinov2", "arch": arch, "format": fmt, "prefix": prefix,
          "source_pos_embed_preset": source_pos_embed_preset(fmt, arch),
          "source_file": os.path.abspath(os.fspath(input_path))}
  checkpoint.save_params(output_dir, params, meta)
  return meta

