"""Test helpers around the PyTorch DINOv2 of tests/torch_reference/inpformer.py.

That file is the one torch DINOv2 of the repo (it reproduces the official golden fixture); it
restates facebookresearch/dinov2 (`dinov2/layers/*`, `dinov2/models/vision_transformer.py`)
with the same attribute names, so `state_dict()` is a facebookresearch-format checkpoint
(`cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.{i}.*`,
`norm`). timm cannot stand in (timm.models imports torchvision, which does not load beside
this CPU torch). Here: `DinoVisionTransformer` (re-exported, with upstream defaults), weight
randomisation, and the fb -> timm / Hugging Face key layouts the converter must accept.

Both interpolation conventions are constructor arguments:
  * INP-Former / Dinomaly: interpolate_offset=0.1, interpolate_antialias=False (default);
  * upstream hub reg models: interpolate_offset=0, interpolate_antialias=True.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.torch_reference import inpformer


def DinoVisionTransformer(*, num_register_tokens=0, init_values=1e-5, **kwargs):  # noqa: N802  pylint: disable=invalid-name
  """inpformer.DinoVisionTransformer with facebookresearch's defaults (no registers,
  LayerScale 1e-5) instead of INP-Former's (4 registers, 1e-8); same kwargs otherwise
  (img_size, patch_size, embed_dim, depth, num_heads, interpolate_offset/antialias,
  attn_impl "official" | "sdpa")."""
  return inpformer.DinoVisionTransformer(
      num_register_tokens=num_register_tokens, init_values=init_values, **kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Re-randomises every parameter to realistic scales (in place).

  A fresh DINOv2 has LayerScale 1e-5 (1e-8 in INP-Former), which makes every block an
  identity and hides wiring bugs; here gamma ~ U(0.1, 0.6), LayerNorm affine ~ 1 +- 0.2,
  Linear/Conv weights ~ N(0, 1/fan_in), non-zero biases and tokens.
  """
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if name.endswith(".gamma"):
      p.copy_(0.1 + 0.5 * torch.rand(p.shape, generator=g))
    elif name.startswith("norm") or ".norm" in name:
      base = 1.0 if name.endswith("weight") else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    elif name.endswith("weight"):
      fan_in = p[0].numel()
      p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    elif name.endswith("bias"):
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
    else:  # cls_token, pos_embed, register_tokens, mask_token
      p.copy_(0.5 * torch.randn(p.shape, generator=g))
  return model


def state_dict_numpy(model: nn.Module) -> dict:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_timm(sd: dict) -> dict:
  """fb -> timm `vit_*_patch14[_reg4]_dinov2` layout (timm's `_convert_dinov2`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sd = dict(sd)
  sd.pop("mask_token", None)
  if "register_tokens" in sd:
    sd["reg_token"] = sd.pop("register_tokens")
    sd["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
    sd["pos_embed"] = np.ascontiguousarray(sd.pop("pos_embed")[:, 1:])
  return sd


def to_hf(sd: dict) -> dict:
  """fb -> Hugging Face Dinov2Model / Dinov2WithRegistersModel layout
  (transformers' convert_dinov2[_with_registers]_to_hf: rename + split qkv)."""
  import re  # pylint: disable=g-import-not-at-top
  out = {}
  top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
         "pos_embed": "embeddings.position_embeddings",
         "register_tokens": "embeddings.register_tokens",
         "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
         "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
         "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
  sub = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
         "attn.proj.weight": "attention.output.dense.weight",
         "attn.proj.bias": "attention.output.dense.bias"}
  for k, v in sd.items():
    if k in top:
      out[top[k]] = v
      continue
    m = re.match(r"blocks\.(\d+)\.(.*)", k)
    i, rest = m.group(1), m.group(2)
    pre = f"encoder.layer.{i}."
    if rest.startswith("attn.qkv."):
      kind = rest.rsplit(".", 1)[1]
      d = v.shape[0] // 3
      for j, name in enumerate(("query", "key", "value")):
        out[f"{pre}attention.attention.{name}.{kind}"] = v[j * d:(j + 1) * d].copy()
    else:
      out[pre + sub.get(rest, rest)] = v
  return out
