"""A small PyTorch DINOv2 ViT that follows facebookresearch/dinov2 line by line.

Used as the parity reference for `inpformer_jax.models.vit` (tests) and the torch side of
`benchmarks/encoder_forward.py`. timm cannot be imported here (timm.models imports timm.data,
which imports torchvision, and the PyPI torchvision does not load beside this CPU torch), so
this file restates the official modules (`dinov2/layers/{patch_embed,attention,mlp,
layer_scale,block}.py`, `dinov2/models/vision_transformer.py`) with the same attribute names:
its `state_dict()` is a facebookresearch-format checkpoint (`cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.{i}.*`, `norm`).

Two interpolation conventions are reproduced:
  * INP-Former / Dinomaly (offset 0.1, antialias False): F.interpolate(scale_factor=...).
  * upstream hub (offset 0, antialias True): the current upstream code passes size=(w0, h0)
    when the offset is 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):

  def __init__(self, patch_size=14, in_chans=3, embed_dim=768):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    _, _, h, w = x.shape
    assert h % self.patch_size == 0 and w % self.patch_size == 0
    x = self.proj(x)  # B C H W
    return x.flatten(2).transpose(1, 2)  # B HW C


class Attention(nn.Module):
  """dinov2/layers/attention.py::Attention (MemEffAttention's fallback without xFormers)."""

  def __init__(self, dim, num_heads=8, fused=False):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim, bias=True)
    self.fused = fused  # benchmark only: torch's SDPA kernel instead of the explicit matmuls

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    if self.fused:
      x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    else:
      q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
      attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
      x = attn @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):

  def __init__(self, dim, init_values=1e-5):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1e-5, fused_attn=False):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, fused=fused_attn)
    self.ls1 = LayerScale(dim, init_values)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, init_values)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
  """dinov2/models/vision_transformer.py::DinoVisionTransformer with block_chunks=0."""

  def __init__(self, img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
               mlp_ratio=4.0, init_values=1e-5, num_register_tokens=0,
               interpolate_antialias=False, interpolate_offset=0.1, fused_attn=False):
    super().__init__()
    self.embed_dim = embed_dim
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_antialias = interpolate_antialias
    self.interpolate_offset = interpolate_offset
    self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
    num_patches = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                            if num_register_tokens else None)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values, fused_attn)
                                 for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

  def interpolate_pos_encoding(self, x, w, h):
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    n = self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    pos_embed = self.pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // self.patch_size
    h0 = h // self.patch_size
    m = int(math.sqrt(n))
    assert n == m * m
    kwargs = {}
    if self.interpolate_offset:
      # INP-Former/Dinomaly (and older upstream): explicit scale factor incl. the offset.
      sx = float(w0 + self.interpolate_offset) / m
      sy = float(h0 + self.interpolate_offset) / m
      kwargs["scale_factor"] = (sx, sy)
    else:
      kwargs["size"] = (w0, h0)  # upstream hub reg models (offset 0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
        antialias=self.interpolate_antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

  def prepare_tokens(self, x):
    _, _, w, h = x.shape
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    if self.register_tokens is not None:
      x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    return x

  def forward(self, x, layers):
    """Raw outputs of blocks `layers` (what INP-Former reads), stopping at max(layers)."""
    x = self.prepare_tokens(x)
    outs = {}
    for i, blk in enumerate(self.blocks[:max(layers) + 1]):
      x = blk(x)
      outs[i] = x
    return [outs[i] for i in layers]


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
