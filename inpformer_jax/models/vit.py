"""DINOv2 vision transformer (ViT-S/B/L, patch 14, optional register tokens) in Flax linen.

Computes what the PyTorch DINOv2 of facebookresearch computes (the copy vendored by
INP-Former / Dinomaly), so converted checkpoints reproduce the PyTorch block outputs to
float32 precision. The encoder is frozen in INP-Former, so it returns the RAW outputs of the
blocks a caller names (no final norm) and runs no block past the last one named.

Parameter tree (names chosen so `inpformer_jax/conversion/dinov2.py` is a flat table):
  patch_embed/{kernel (14,14,3,D), bias}   cls_token (1,1,D)   pos_embed (1,1+G*G,D)
  register_tokens (1,R,D) [R>0]            mask_token (1,D)  (unused, kept for strictness)
  blocks_{i}/{norm1,norm2}/{scale,bias}    blocks_{i}/attn/{qkv,proj}/{kernel,bias}
  blocks_{i}/{ls1,ls2}/gamma               blocks_{i}/mlp/{fc1,fc2}/{kernel,bias}
  norm/{scale,bias}
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# (width, depth, heads); mlp_ratio is 4 for all DINOv2 ViT variants used here.
VARIANTS = {
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

PATCH_SIZE = 14
PRETRAIN_GRID = 37  # 518 / 14: the grid the released pos_embed was trained at.


# ---------------------------------------------------------------------------------------
# Position-embedding interpolation. Done with a fixed interpolation matrix built in numpy
# at trace time: jax.image.resize uses another cubic coefficient and the in/out size
# ratio, whereas torch's F.interpolate(scale_factor=s) maps dst -> src with the GIVEN s.
# ---------------------------------------------------------------------------------------

# Named (interpolate_offset, interpolate_antialias) pairs, read as facebookresearch's
# DinoVisionTransformer.interpolate_pos_encoding reads them: offset > 0 resizes with
# F.interpolate(scale_factor=(g + offset) / G), offset 0 with F.interpolate(size=(g, g)); all
# are mode='bicubic', align_corners=False, computed in float32. docs/encoder.md has the table.
POS_EMBED_PRESETS = {
    # INP-Former / Dinomaly: their vendored dinov2 `vision_transformer.py` defaults, which
    # `vit_encoder` keeps for every variant; also facebookresearch's hub models WITHOUT
    # registers (`_make_dinov2_model` defaults).
    "inpformer": (0.1, False),
    # facebookresearch hub `dinov2_vit*14_reg` (interpolate_offset=0.0, interpolate_antialias=True).
    "dinov2_hub_reg": (0.0, True),
    # timm `resample_abs_pos_embed`: F.interpolate(size=new_size, mode='bicubic', antialias=True)
    # on posemb.float(), for its dinov2 models with and without registers.
    "timm": (0.0, True),
    # transformers `Dinov2WithRegistersEmbeddings.interpolate_pos_encoding`:
    # F.interpolate(x.to(float32), size=(h, w), mode='bicubic', align_corners=False,
    # antialias=True).
    "hf_dinov2_registers": (0.0, True),
    # transformers `Dinov2Embeddings.interpolate_pos_encoding` (Dinov2Model): the same call
    # without `antialias`, i.e. torch's default False.
    "hf_dinov2": (0.0, False),
}
DEFAULT_POS_EMBED_PRESET = "inpformer"


def pos_embed_preset(name: str) -> dict:
  """-> {interpolate_offset, interpolate_antialias} of a POS_EMBED_PRESETS name."""
  if name not in POS_EMBED_PRESETS:
    raise ValueError(f"unknown position-embedding preset {name!r}; choose one of "
                     f"{', '.join(POS_EMBED_PRESETS)}")
  offset, antialias = POS_EMBED_PRESETS[name]
  return {"interpolate_offset": offset, "interpolate_antialias": antialias}


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with coefficient `a` (torch/PIL formulation)."""
  x = np.abs(x)
  return np.where(
      x <= 1.0,
      ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
      np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
  )


def bicubic_matrix(in_size: int, scale_factor: float | None = None, *, antialias: bool,
                   size: int | None = None) -> np.ndarray:
  """(out, in) matrix equal to torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=antialias) along one axis, given `scale_factor` or `size`.

  torch maps dst -> src with 1/scale_factor when a scale factor is given (out =
  floor(in * s)), and with in/out when a size is. Without antialias: A = -0.75,
  src = (dst + 0.5) * inv - 0.5, the four taps clamped to the border (torch
  `upsample_bicubic2d`). With antialias: torch's separable AA kernel (PIL's algorithm,
  A = -0.5, support widened by inv when shrinking, weights renormalised).
  """
  if (scale_factor is None) == (size is None):
    raise ValueError("give exactly one of scale_factor and size")
  if size is None:
    out_size, inv = math.floor(in_size * scale_factor), 1.0 / scale_factor
  else:
    out_size, inv = int(size), in_size / size
  mat = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    for i in range(out_size):
      src = inv * (i + 0.5) - 0.5
      i0 = math.floor(src)
      t = src - i0
      for k in range(-1, 3):
        idx = min(max(i0 + k, 0), in_size - 1)
        mat[i, idx] += _cubic(np.array(t - k), -0.75)
    return mat
  support_scale = max(inv, 1.0)
  support = 2.0 * support_scale  # bicubic interp_size / 2 = 2
  for i in range(out_size):
    center = inv * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    js = np.arange(xmin, xmax)
    w = _cubic((js - center + 0.5) / support_scale, -0.5)
    total = w.sum()
    if total != 0:
      w = w / total
    mat[i, xmin:xmax] = w
  return mat


@functools.lru_cache(maxsize=32)
def pos_embed_matrices(src_grid: int, dst_grid: int, offset: float, antialias: bool):
  """Row interpolation matrix (dst_grid, src_grid), or None when no resize is needed."""
  if src_grid == dst_grid:
    return None  # DINOv2 returns pos_embed unchanged at its pretraining size
  if offset:
    mat = bicubic_matrix(src_grid, (dst_grid + offset) / src_grid, antialias=antialias)
  else:  # facebookresearch (`if self.interpolate_offset:`), timm and transformers: size=
    mat = bicubic_matrix(src_grid, antialias=antialias, size=dst_grid)
  if mat.shape[0] != dst_grid:
    raise ValueError(
        f"pos-embed interpolation gives a {mat.shape[0]}-grid, expected {dst_grid} "
        f"(offset={offset}); use an input side that is a multiple of {PATCH_SIZE}.")
  return mat.astype(np.float32)


def interpolate_pos_embed(pos_embed: Array, grid: int, *, offset: float = 0.1,
                          antialias: bool = False) -> Array:
  """pos_embed (1, 1+G*G, D) -> (1, 1+grid*grid, D), as DINOv2's interpolate_pos_encoding.

  Defaults are INP-Former's (offset 0.1, no antialias); POS_EMBED_PRESETS names the
  settings of the other DINOv2 implementations.
  """
  n = pos_embed.shape[1] - 1
  src = int(round(math.sqrt(n)))
  if src * src != n:
    raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
  mat = pos_embed_matrices(src, grid, float(offset), bool(antialias))
  if mat is None:
    return pos_embed
  cls_pos = pos_embed[:, :1]
  patch = pos_embed[0, 1:].astype(jnp.promote_types(pos_embed.dtype, jnp.float32))
  patch = patch.reshape(src, src, -1)
  m = jnp.asarray(mat)
  hi = jax.lax.Precision.HIGHEST
  patch = jnp.einsum("ij,jkd->ikd", m, patch, precision=hi)
  patch = jnp.einsum("lk,ikd->ild", m, patch, precision=hi)
  patch = patch.reshape(1, grid * grid, -1).astype(pos_embed.dtype)
  return jnp.concatenate([cls_pos, patch], axis=1)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2. (..., D) -> (..., out_dim or D)."""
  hidden_dim: int
  out_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_dim = self.out_dim or x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # torch nn.GELU() default is the erf form
    return nn.Dense(out_dim, dtype=self.dtype, name="fc2")(x)


class LayerScale(nn.Module):
  """x * gamma (D,); gamma is overwritten by the checkpoint (init 1e-8 upstream)."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


def explicit_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(d)) v as DINOv2 writes it (q scaled first). (B, L, H, d) each.

  On the CPU this is faster than jax.nn.dot_product_attention's XLA path (which scales the
  (B, H, L, L) logits instead of q); see benchmarks/encoder_forward.py.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("blhd,bmhd->bhlm", q, k)
  # softmax in float32 at least (bfloat16 runs), float64 in float64 reference runs.
  probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                         axis=-1).astype(v.dtype)
  return jnp.einsum("bhlm,bmhd->blhd", probs, v)


class Attention(nn.Module):
  """Fused-qkv multi-head self-attention. (B, L, D) -> (B, L, D).

  qkv output channels are [q (H*d) | k (H*d) | v (H*d)], each head contiguous, as in the
  PyTorch checkpoints. Goes through jax.nn.dot_product_attention so GPUs get the fused
  (cuDNN) kernel; on the CPU it is the XLA reference path. `implementation="explicit"` uses
  `explicit_attention` instead (faster on the CPU).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, l, dim = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, l, 3, h, dim // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, d)
    if self.implementation == "explicit":
      out = explicit_attention(q, k, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return nn.Dense(dim, dtype=self.dtype, name="proj")(out.reshape(b, l, dim))


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale. (B, L, D) -> (B, L, D)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        norm(name="norm1")(x))
    x = x + LayerScale(name="ls1")(y)
    y = Mlp(int(dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(norm(name="norm2")(x))
    return x + LayerScale(name="ls2")(y)


class DinoViT(nn.Module):
  """DINOv2 ViT. images (B, S, S, 3) normalised -> raw outputs of the requested blocks.

  Attributes:
    width, depth, num_heads: architecture (see VARIANTS).
    num_register_tokens: 0 or 4 (the `_reg4` checkpoints).
    pretrain_grid: side of the stored pos_embed grid (37 for the released weights).
    interpolate_offset / interpolate_antialias: INP-Former uses 0.1 / False for every
      variant; `pos_embed_preset(name)` gives the pair of each POS_EMBED_PRESETS name.
    dtype: compute dtype (params stay float32).
    attention_impl: None / 'xla' / 'cudnn' go to jax.nn.dot_product_attention (None lets
      JAX pick: cuDNN on GPUs); 'explicit' is DINOv2's own formulation, faster on the CPU.
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  num_register_tokens: int = 4
  patch_size: int = PATCH_SIZE
  pretrain_grid: int = PRETRAIN_GRID
  mlp_ratio: float = 4.0
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.num_register_tokens

  def feature_dims(self, layers: Sequence[int]) -> list[int]:
    return [self.width] * len(layers)

  def grid_size(self, image_size: int) -> int:
    if image_size % self.patch_size:
      raise ValueError(f"image size {image_size} is not a multiple of the patch size "
                       f"{self.patch_size}")
    return image_size // self.patch_size

  def setup(self):
    d = self.width
    init = nn.initializers.normal(0.02)
    self.patch_embed = nn.Conv(d, (self.patch_size, self.patch_size),
                               strides=(self.patch_size, self.patch_size), padding="VALID",
                               dtype=self.dtype, name="patch_embed")
    self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    self.pos_embed = self.param("pos_embed", init, (1, 1 + self.pretrain_grid**2, d))
    if self.num_register_tokens:
      self.register_tokens = self.param("register_tokens", nn.initializers.normal(1e-6),
                                        (1, self.num_register_tokens, d))
    self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, d))
    self.blocks = [
        Block(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
              name=f"blocks_{i}") for i in range(self.depth)
    ]
    self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")

  def interpolated_pos_embed(self, grid: int) -> Array:
    """(1, 1+grid*grid, D) float32 position embedding for a grid x grid input."""
    return interpolate_pos_embed(self.pos_embed, grid, offset=self.interpolate_offset,
                                 antialias=self.interpolate_antialias)

  def prepare_tokens(self, images: Array) -> Array:
    """images (B, S, S, 3) -> tokens (B, 1+R+N, D) = [cls, registers, patches]."""
    b, s, s2, _ = images.shape
    if s != s2 or s % self.patch_size:
      raise ValueError(f"input must be square with a side that is a multiple of "
                       f"{self.patch_size}, got {s}x{s2}")
    grid = s // self.patch_size
    x = self.patch_embed(images.astype(self.dtype)).reshape(b, grid * grid, self.width)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.width)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.interpolated_pos_embed(grid).astype(x.dtype)
    if self.num_register_tokens:
      # Registers are inserted AFTER the position embedding is added: they get none.
      reg = jnp.broadcast_to(self.register_tokens,
                             (b, self.num_register_tokens, self.width)).astype(x.dtype)
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x

  def __call__(self, images: Array, layers: Sequence[int] = (), *,
               final_norm: bool = False) -> list[Array]:
    """Raw outputs (B, 1+R+N, D) of blocks `layers` (0-based), in the order given.

    Blocks after max(layers) are not run. `final_norm=True` instead returns the final
    LayerNorm output of the last block (the upstream `x_norm` features) as the only entry.
    """
    layers = tuple(int(i) for i in layers)
    if any(i < 0 or i >= self.depth for i in layers):
      raise ValueError(f"layers {layers} out of range for depth {self.depth}")
    last = self.depth - 1 if (final_norm or not layers) else max(layers)
    if self.is_initializing():
      last = self.depth - 1  # create every parameter so full checkpoints load strictly
    x = self.prepare_tokens(images)
    outs = {}
    for i in range(last + 1):
      x = self.blocks[i](x)
      outs[i] = x
    if final_norm or self.is_initializing():
      normed = self.norm(x)
      if final_norm:
        return [normed]
    return [outs[i] for i in layers]


def vit_from_variant(variant: str, *, num_register_tokens: int = 4, **kwargs) -> DinoViT:
  """DinoViT for 'small' | 'base' | 'large' (patch 14)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}")
  width, depth, heads = VARIANTS[variant]
  return DinoViT(width=width, depth=depth, num_heads=heads,
                 num_register_tokens=num_register_tokens, **kwargs)
