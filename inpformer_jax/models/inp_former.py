"""INP-Former: Intrinsic Normal Prototypes extracted from the image itself guide the decoder.

Data flow (SPEC §2), shapes for ViT-B/14-reg at 392: B images (B, 392, 392, 3)
  encoder blocks 2..9 (raw, no final norm)      8 x (B, 789, 768)
  drop cls + registers                          8 x (B, 784, 768)
  fused = mean of the 8 layers                  (B, 784, 768)
  INP extractor: M tokens cross-attend fused    inps (B, M, 768)
  coherence loss / distance to nearest INP      (), (B, 784)
  bottleneck MLP (no residual)                  (B, 784, 768)
  8 INP-guided decoder blocks                   8 x (B, 784, 768), then REVERSED
  groups: encoder layers [[0..3],[4..7]] vs reversed decoder outputs [[0..3],[4..7]]
  en, de                                        2 x (B, 28, 28, 768) each

Parameter names follow the official state dict (`decoder_{j}/attn/q` <-> `decoder.{j}.attn.q`),
so `inpformer_jax/conversion/inpformer.py` is a flat table.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


Array = jax.Array
Dtype = Any

# The official code re-initialises every Linear of the trainable part with
# trunc_normal_(std=0.01, a=-0.03, b=0.03): cut-offs at +-3 sigma.
def _at_least_f32(x: Array) -> Array:
  # Outputs (and so the loss and maps) in float32 whatever the compute dtype (bfloat16 runs);
  # float64 reference runs stay float64.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def trunc_normal_init(stddev: float = 0.01, cutoff: float = 3.0):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -cutoff, cutoff, shape, dtype) * stddev
  return init


# LayerNorm eps is 1e-8 in the extractor and decoder (1e-6 in the encoder).
_norm = functools.partial(nn.LayerNorm, epsilon=1e-8)


def _gelu_derivative(a: Array) -> Array:
  """d/da of the erf GELU a * Phi(a): Phi(a) + a * phi(a)."""
  cdf = 0.5 * (1.0 + jax.lax.erf(a * (1.0 / np.sqrt(2.0)).astype(a.dtype)))
  pdf = jnp.exp(-0.5 * a * a) * (1.0 / np.sqrt(2.0 * np.pi)).astype(a.dtype)
  return cdf + a * pdf


@jax.custom_vjp
def mlp(x: Array, w1: Array, b1: Array, w2: Array, b2: Array) -> Array:
  """fc2(GELU_erf(fc1(x))), x (..., D), w1 (D, F), w2 (F, D) -> (..., D).

  The backward is written out on (rows, features) matrices: XLA's own transpose of the
  (B, N, D) dots (batch and token dims contracted together, erf evaluated in several
  fusions) took 1.3 s where this takes 1.0 s for eight ViT-S/224 MLPs at batch 8 on a
  2-core CPU (benchmarks/README.md, "Where the CPU step's time went"). The forward is
  unchanged; gradients equal to rounding.
  """
  return _mlp_fwd(x, w1, b1, w2, b2)[0]


def _mlp_fwd(x, w1, b1, w2, b2):
  a = x @ w1 + b1
  h = jax.nn.gelu(a, approximate=False)
  # h is kept, not recomputed from a in the backward: one pass less over (rows, 4D), which
  # at ViT-B/392 is 5-8 % of the MLP gradient on the CPU (benchmarks/README.md).
  return h @ w2 + b2, (x, w1, w2, a, h)


def _mlp_bwd(res, g):
  x, w1, w2, a, h = res
  rows = lambda t: t.reshape(-1, t.shape[-1])
  x2, a2, h2, g2 = rows(x), rows(a), rows(h), rows(g)
  contract_rows = lambda u, v: jax.lax.dot_general(u, v, (((0,), (0,)), ((), ())))
  da = (g2 @ w2.T) * _gelu_derivative(a2)
  return ((da @ w1.T).reshape(x.shape), contract_rows(x2, da), jnp.sum(da, axis=0),
          contract_rows(h2, g2), jnp.sum(g2, axis=0))


mlp.defvjp(_mlp_fwd, _mlp_bwd)


@jax.custom_vjp
def linear(x: Array, w: Array, b: Array) -> Array:
  """x @ w + b, x (..., D_in); its backward on (rows, features) matrices, as `mlp`'s."""
  return x @ w + b


def _linear_fwd(x, w, b):
  return x @ w + b, (x, w)


def _linear_bwd(res, g):
  x, w = res
  g2 = g.reshape(-1, g.shape[-1])
  dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g2, (((0,), (0,)), ((), ())))
  return (g @ w.T, dw, jnp.sum(g2, axis=0))


linear.defvjp(_linear_fwd, _linear_bwd)


def _linear_params(module: nn.Module, in_features: int, features: int):
  """The kernel (in, out) and bias (out,) of an official trainable Linear, as nn.Dense names
  them, float32, trunc-normal kernel init."""
  return (module.param("kernel", trunc_normal_init(), (in_features, features)),
          module.param("bias", nn.initializers.zeros, (features,)))


class _DenseParams(nn.Module):
  """Only the parameters of a trainable Linear (`mlp` computes with them)."""
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    return _linear_params(self, in_features, self.features)


class _Dense(nn.Module):
  """A trainable official Linear through `linear`. (..., D_in) -> (..., features)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w, b = _linear_params(self, x.shape[-1], self.features)
    return linear(*nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype))


class TrainableMlp(nn.Module):
  """fc1 -> GELU(erf) -> fc2 with the official trunc-normal init. (..., D) -> (..., D).

  Parameters as two nn.Dense would hold them (fc1/kernel, fc1/bias, ...); computed by `mlp`.
  """
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    w1, b1 = _DenseParams(self.hidden_dim, name="fc1")(d)
    w2, b2 = _DenseParams(d, name="fc2")(self.hidden_dim)
    return mlp(*nn.dtypes.promote_dtype(x, w1, b1, w2, b2, dtype=self.dtype))


class AggregationAttention(nn.Module):
  """Softmax cross-attention, queries x (B, M, D) over keys/values y (B, N, D) -> (B, M, D).

  kv output channels are [k (H*d) | v (H*d)] as in the official `kv` Linear.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    q, k, v = _cross_qkv(x, y, self.num_heads, self.dtype)
    out = jax.nn.dot_product_attention(q, k, v)  # scale d**-0.5
    return _Dense(x.shape[-1], dtype=self.dtype, name="proj")(out.reshape(x.shape))


def _cross_qkv(x: Array, y: Array, num_heads: int, dtype) -> tuple[Array, Array, Array]:
  """Inside a compact module: Dense `q` on x (B, Tq, D), Dense `kv` on y (B, Tk, D) ->
  q (B, Tq, H, d), k and v (B, Tk, H, d); kv channels are [k | v] as in the official Linear."""
  b, tq, dim = x.shape
  d = dim // num_heads
  q = _Dense(dim, dtype=dtype, name="q")(x).reshape(b, tq, num_heads, d)
  kv = _Dense(2 * dim, dtype=dtype, name="kv")(y).reshape(b, y.shape[1], 2, num_heads, d)
  return q, kv[:, :, 0], kv[:, :, 1]


def _mlp_residual(x: Array, mlp_ratio: float, dtype) -> Array:
  """Inside a compact module: x + mlp(norm2(x)), the second half of both block kinds."""
  mlp = TrainableMlp(int(x.shape[-1] * mlp_ratio), dtype, name="mlp")
  return x + mlp(_norm(dtype=dtype, name="norm2")(x))


class AggregationBlock(nn.Module):
  """INP extractor block. inps (B, M, D), fused patch tokens (B, N, D) -> inps (B, M, D).

  One LayerNorm (`norm1`) normalises both the queries and the key/value source.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    norm1 = _norm(dtype=self.dtype, name="norm1")
    x = x + AggregationAttention(self.num_heads, self.dtype, name="attn")(norm1(x), norm1(y))
    return _mlp_residual(x, self.mlp_ratio, self.dtype)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class PrototypeAttention(nn.Module):
  """Cosine, ReLU-gated cross-attention of tokens (B, N, D) on INPs (B, M, D) -> (B, N, D).

  q and k are L2-normalised per head, scaled by a learned per-head `learn_scale` (H, 1, 1),
  passed through ReLU; no softmax and no 1/sqrt(d). The weights (B, H, N, M) are sown as
  intermediates['attn'].

  The output projection is folded into the values: proj(sum_h attn_h v_h) equals
  sum_h attn_h (v_h W_h) + b, and v_h W_h is (M, D) per image. The (N, D) x (D, D) product
  becomes (N, H*M) x (H*M, D), a tenth of the work with 6 INPs (H*M = 36 or 72 against
  D = 384 or 768), forward and backward; parameters as the official `proj` Linear.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prototypes: Array) -> Array:
    b, n, dim = x.shape
    h, m = self.num_heads, prototypes.shape[1]
    learn_scale = self.param("learn_scale", nn.initializers.ones, (h, 1, 1))
    w, bias = _DenseParams(dim, name="proj")(dim)
    q, k, v = _cross_qkv(x, prototypes, h, self.dtype)
    q, k = l2_normalize(q), l2_normalize(k)
    q, k, v, w, bias, learn_scale = nn.dtypes.promote_dtype(
        q, k, v, w, bias, learn_scale, dtype=self.dtype)
    attn = jax.nn.relu(jnp.einsum("bnhd,bmhd->bnhm", q, k) * learn_scale.reshape(h, 1))
    self.sow("intermediates", "attn", attn.transpose(0, 2, 1, 3))
    values = jnp.einsum("bmhd,hde->bhme", v, w.reshape(h, dim // h, dim))
    return (jnp.einsum("bnk,bke->bne", attn.reshape(b, n, h * m),
                       values.reshape(b, h * m, dim)) + bias)


class PrototypeBlock(nn.Module):
  """INP-guided decoder block. tokens (B, N, D), INPs (B, M, D) -> (B, N, D).

  NO residual around the attention: the output can only be assembled from INP values, so an
  anomalous token cannot be copied through. Residual around the MLP only.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prototypes: Array) -> Array:
    norm1 = _norm(dtype=self.dtype, name="norm1")
    x = PrototypeAttention(self.num_heads, self.dtype, name="attn")(norm1(x), norm1(prototypes))
    return _mlp_residual(x, self.mlp_ratio, self.dtype)


COSINE_EPS = 1e-8  # torch F.cosine_similarity's default


def _clamped_norm(x: Array, axis: int = -1, eps: float = COSINE_EPS) -> Array:
  return jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis)), eps)


def cosine_distance(a: Array, b: Array, axis: int = -1, eps: float = COSINE_EPS) -> Array:
  """1 - cos(a, b) along `axis`, torch F.cosine_similarity semantics (norms clamped at eps)."""
  dot = jnp.sum(a * b, axis=axis)
  return 1.0 - dot / (_clamped_norm(a, axis, eps) * _clamped_norm(b, axis, eps))


def inp_distance(tokens: Array, inps: Array) -> tuple[Array, Array]:
  """Per-token distance to the nearest INP. tokens (B, N, D), inps (B, M, D) -> (B, N) x 2.

  dist[b, n, m] = 1 - cos(tokens[b, n], inps[b, m]) (`cosine_distance`'s semantics, norms
  clamped at COSINE_EPS); returns (min over m, argmin over m). The dot products are one (N, D) x
  (D, M) product per image, not a broadcast (B, N, M, D) array: 10x faster at ViT-B/392.
  """
  dot = jnp.einsum("bnd,bmd->bnm", tokens, inps)
  dist = 1.0 - dot / (_clamped_norm(tokens)[:, :, None] * _clamped_norm(inps)[:, None, :])
  return jnp.min(dist, axis=-1), jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _group_means(layers: Sequence[Array], groups: Sequence[Sequence[int]]) -> list[Array]:
  # Stack-then-mean, as the official fuse_feature does (keeps the summation order).
  return [jnp.mean(jnp.stack([layers[i] for i in g], axis=1), axis=1) for g in groups]


class INPFormer(nn.Module):
  """INP-Former around a frozen encoder. images (B, S, S, 3) normalised -> outputs dict.

  Attributes:
    encoder: see `inpformer_jax.models.encoders` for the contract (DinoViT fulfils it).
    target_layers: encoder layers used ([2..9] for ViT-S/B, [4,6,..,18] for ViT-L).
    fuse_groups: index groups into `target_layers` forming the encoder groups.
    decoder_groups: index groups into the REVERSED list of decoder outputs.
    fusion: how layers become groups and the fused input.
      'mean' (the official ViT rule): group = mean of its layers; fused = mean of all
        layers; every layer has the encoder width D.
      'concat' (layers of different widths, e.g. CNN stages): group = channel
        concatenation of its layers (width C_g); fused = concatenation of the groups
        (width D = sum C_g); the decoder works at D and group g is reconstructed by the
        channel slice of its decoder group that lines up with C_g. Fixed, not learned.
    num_inps: M, the number of INP tokens.
    num_decoder_blocks: decoder depth (8).
    num_heads: heads of the extractor and decoder (the official code uses the encoder's).
  """
  encoder: nn.Module
  target_layers: Sequence = (2, 3, 4, 5, 6, 7, 8, 9)
  fuse_groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7))
  decoder_groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7))
  fusion: str = "mean"
  num_inps: int = 6
  num_decoder_blocks: int = 8
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  def group_dims(self) -> list[int]:
    """Width of each encoder group; the fused width is their max ('mean') or sum."""
    dims = self.encoder.feature_dims(tuple(self.target_layers))
    if self.fusion == "mean":
      if len(set(dims)) != 1:
        raise ValueError(f"fusion='mean' needs layers of one width, got {dims}; "
                         "use fusion='concat'")
      return [dims[0]] * len(self.fuse_groups)
    if self.fusion == "concat":
      return [sum(dims[i] for i in g) for g in self.fuse_groups]
    raise ValueError(f"unknown fusion {self.fusion!r}; choose 'mean' or 'concat'")

  @property
  def embed_dim(self) -> int:
    dims = self.group_dims()
    return dims[0] if self.fusion == "mean" else sum(dims)

  def setup(self):
    dim = self.embed_dim
    if dim % self.num_heads:
      raise ValueError(f"fused width {dim} is not divisible by {self.num_heads} heads")
    # torch.randn(M, D): standard normal, never re-initialised.
    self.prototype_token = self.param("prototype_token", nn.initializers.normal(1.0),
                                      (self.num_inps, dim))
    self.bottleneck = TrainableMlp(int(dim * self.mlp_ratio), self.dtype, name="bottleneck_0")
    self.aggregation = AggregationBlock(self.num_heads, self.mlp_ratio, self.dtype,
                                        name="aggregation_0")
    self.decoder = [
        PrototypeBlock(self.num_heads, self.mlp_ratio, self.dtype, name=f"decoder_{j}")
        for j in range(self.num_decoder_blocks)
    ]

  # -- encoder side -------------------------------------------------------------------

  def encoder_layers(self, images: Array) -> list[Array]:
    """Patch tokens (B, N, C_i) of each target layer, prefix tokens removed, no gradient."""
    layers = self.encoder(images, layers=tuple(self.target_layers))
    p = self.encoder.num_prefix_tokens
    return [jax.lax.stop_gradient(x[:, p:]) for x in layers]

  @property
  def fused_derivable(self) -> bool:
    """Whether the fused input is a function of the groups (`fused_from_groups`): always for
    'concat'; for 'mean' when the groups partition the target layers into equal sizes (then
    the mean of the group means is the mean of all layers). The feature cache then stores
    the groups only."""
    if self.fusion == "concat":
      return True
    flat = sorted(i for g in self.fuse_groups for i in g)
    return (len({len(g) for g in self.fuse_groups}) == 1
            and flat == list(range(len(self.target_layers))))

  def fused_from_groups(self, groups: Sequence[Array]) -> Array:
    """The decoder's fused input (B, N, D) from the groups, when `fused_derivable`; at least
    float32 (a bfloat16 feature cache's groups are averaged in float32)."""
    groups = [_at_least_f32(g) for g in groups]
    if self.fusion == "concat":
      return jnp.concatenate(groups, axis=-1)
    return jnp.mean(jnp.stack(groups, axis=1), axis=1)

  def encode(self, images: Array) -> dict:
    """Encoder side only (what the feature cache stores). -> {"en_tokens", "fused"}.

    en_tokens: one (B, N, C_g) array per group; fused: the decoder's input (B, N, D),
    computed from the groups when it can be (`fused_derivable`), so that a cached run that
    stores only the groups derives the same bits.
    """
    layers = self.encoder_layers(images)
    if self.fusion == "concat":
      groups = [jnp.concatenate([layers[i] for i in g], axis=-1) for g in self.fuse_groups]
    else:
      groups = _group_means(layers, self.fuse_groups)
    if self.fused_derivable:
      return {"en_tokens": groups, "fused": self.fused_from_groups(groups)}
    return {"en_tokens": groups, "fused": jnp.mean(jnp.stack(layers, axis=1), axis=1)}

  # -- INP-Former proper --------------------------------------------------------------

  def decode(self, en_tokens: Sequence[Array], fused: Array | None = None) -> dict:
    """Everything after the encoder. en_tokens: groups (B, N, C_g); fused (B, N, D), or None:
    `fused_from_groups(en_tokens)` (needs `fused_derivable`)."""
    if fused is None:
      if not self.fused_derivable:
        raise ValueError(f"fuse_groups {self.fuse_groups} do not determine the fused input "
                         "(fusion='mean' with unequal or partial groups): pass it")
      fused = self.fused_from_groups(en_tokens)
    b, n, dim = fused.shape
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f"{n} patch tokens do not form a square grid")
    fused = fused.astype(self.dtype)
    inps = jnp.broadcast_to(self.prototype_token[None], (b, self.num_inps, dim)).astype(fused.dtype)
    inps = self.aggregation(inps, fused)
    distance, cluster_index = inp_distance(_at_least_f32(fused), _at_least_f32(inps))
    x = self.bottleneck(fused)
    self.sow("intermediates", "bottleneck", x)
    de_list = []
    for blk in self.decoder:
      x = blk(x, inps)
      de_list.append(x)
    self.sow("intermediates", "decoder_blocks", tuple(de_list))
    de_tokens = _group_means(de_list[::-1], self.decoder_groups)
    if self.fusion == "concat":
      offsets = np.cumsum([0] + [t.shape[-1] for t in en_tokens])
      de_tokens = [d[..., offsets[g]:offsets[g + 1]] for g, d in enumerate(de_tokens)]
    grid = lambda t: _at_least_f32(t).reshape(b, side, side, t.shape[-1])
    return {
        "en": [grid(t) for t in en_tokens],
        "de": [grid(t) for t in de_tokens],
        "inps": _at_least_f32(inps),
        "fused": _at_least_f32(fused),
        "distance": distance,
        "cluster_index": cluster_index,
        "coherence_loss": jnp.mean(distance),
    }

  def __call__(self, images: Array) -> dict:
    """images (B, S, S, 3) -> {"en", "de": groups (B, h, w, C_g), "inps" (B, M, D),
    "distance", "cluster_index" (B, h*w), "coherence_loss" (), "fused" (B, N, D)}."""
    enc = self.encode(images)
    return self.decode(enc["en_tokens"], enc["fused"])
