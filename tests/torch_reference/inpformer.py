"""PyTorch re-creation of the official INP-Former (luow23/INP-Former @ 17d2653): speed baseline.

It is our own reference, not a copy of the official files (which cannot be downloaded here):
every module follows /work/shared/SPEC.md §2–§8 and is checked number by number against the
golden fixture by tests/torch_reference/test_reference.py. State-dict keys are the OFFICIAL
names, so an official `model.pth` loads with `strict=True` and ours can be fed to the JAX
converter. The speed benchmarks (benchmarks/torch_reference/bench.py) import it from here.

  model = build_inpformer("base", num_registers=4, inp_num=6, image_size=392)
  optimizer, scheduler = build_optimizer(model, total_iters=45_200)
  stats = train_step(model, optimizer, scheduler, images)    # images (B, 3, S, S)
  out = infer(model, images)                                 # {"map": (B,1,256,256), "score": (B,)}

What is kept deliberately "official" even where it is slow: per-block `torch.no_grad()` in the
encoder, the explicit matmul/softmax attention (`attn_impl="official"`; "sdpa" is an opt-in
faster baseline), the backward hook of the soft-mining loss, the per-tensor Python loop of
StableAdamW. That is what a user of the official code runs.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (embed_dim, depth, num_heads); mlp_ratio 4 everywhere (dinov2 vit_small/base/large).
VARIANTS = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
PATCH_SIZE = 14
PRETRAIN_IMG_SIZE = 518  # vit_encoder.load builds every encoder at 518 -> pos_embed (1, 1370, D)
TARGET_LAYERS = (2, 3, 4, 5, 6, 7, 8, 9)
TARGET_LAYERS_LARGE = (4, 6, 8, 10, 12, 14, 16, 18)
FUSE_LAYERS = ((0, 1, 2, 3), (4, 5, 6, 7))
NUM_DECODER_BLOCKS = 8
GATHER_WEIGHT = 0.2  # λ of the INP coherence loss
LOSS_Y = 3  # exponent of the soft-mining gradient factor
CLIP_NORM = 0.1


# ---------------------------------------------------------------------------------------
# Initialisation helpers (dinov1/utils.py::trunc_normal_, the one the scripts import).
# ---------------------------------------------------------------------------------------


def trunc_normal_(tensor: torch.Tensor, mean=0.0, std=1.0, a=-2.0, b=2.0) -> torch.Tensor:
  """Inverse-CDF truncated normal; a, b are ABSOLUTE cut-offs (not in units of std)."""

  def norm_cdf(x):
    return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

  with torch.no_grad():
    lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    tensor.add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


# ---------------------------------------------------------------------------------------
# DINOv2 encoder (vendored dinov2/layers + dinov2/models/vision_transformer.py).
# ---------------------------------------------------------------------------------------


class Mlp(nn.Module):
  """fc1 -> GELU (erf) -> fc2; also INP-Former's bottleneck / block MLP. (..., D) -> (..., D')."""

  def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
    super().__init__()
    hidden_features = hidden_features or in_features
    out_features = out_features or in_features
    self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, out_features, bias=True)
    self.drop = nn.Dropout(drop)  # 0 everywhere in INP-Former; kept for parity of modules

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
  """(B, 3, S, S) -> (B, N, D), row-major patches; no norm."""

  def __init__(self, patch_size=PATCH_SIZE, in_chans=3, embed_dim=768):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    _, _, h, w = x.shape
    assert h % self.patch_size == 0 and w % self.patch_size == 0, (
        f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
    return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):

  def __init__(self, dim, init_values=1e-5):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Attention(nn.Module):
  """DINOv2 self-attention. (B, L, D) -> (B, L, D); qkv rows [q | k | v], heads contiguous.

  attn_impl "official": q scaled BEFORE q @ k^T, explicit softmax (what the vendored code runs
  without xFormers). "sdpa": F.scaled_dot_product_attention (same math, fused kernel).
  """

  def __init__(self, dim, num_heads=8, qkv_bias=True, proj_bias=True, attn_impl="official"):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim, bias=proj_bias)
    self.attn_impl = attn_impl

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    if self.attn_impl == "sdpa":
      x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    else:
      q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
      attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
      x = attn @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  """Pre-norm block, LayerNorm eps 1e-6, LayerScale on both branches, drop path 0."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1e-8, attn_impl="official"):
    super().__init__()
    norm = partial(nn.LayerNorm, eps=1e-6)
    self.norm1 = norm(dim)
    self.attn = Attention(dim, num_heads, attn_impl=attn_impl)
    self.ls1 = LayerScale(dim, init_values)
    self.norm2 = norm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, init_values)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
  """DINOv2 ViT as INP-Former builds it: img_size 518, block_chunks 0, init_values 1e-8,
  interpolate_antialias False, interpolate_offset 0.1.

  The upstream hub `*_reg` models use interpolate_offset 0 and interpolate_antialias True;
  both are constructor arguments so the tests can check the JAX port against either. Also the
  parity reference of `inpformer_jax.models.vit` (tests/torch_reference/dinov2.py re-exports it).
  """

  def __init__(self, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, num_register_tokens=4,
               img_size=PRETRAIN_IMG_SIZE, patch_size=PATCH_SIZE, init_values=1e-8,
               interpolate_antialias=False, interpolate_offset=0.1, attn_impl="official"):
    super().__init__()
    self.embed_dim = self.num_features = embed_dim
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_antialias = interpolate_antialias
    self.interpolate_offset = interpolate_offset
    self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
    num_patches = (img_size // patch_size) ** 2
    # Registration order fixes the state_dict order: cls, pos, registers, mask, then children.
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                            if num_register_tokens else None)
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, mlp_ratio, init_values, attn_impl) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # never executed by INP-Former
    self.head = nn.Identity()
    self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # never used
    self._init_weights()

  def _init_weights(self):
    trunc_normal_(self.pos_embed, std=0.02)
    nn.init.normal_(self.cls_token, std=1e-6)
    if self.register_tokens is not None:
      nn.init.normal_(self.register_tokens, std=1e-6)
    for m in self.modules():  # timm vit init
      if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
          nn.init.zeros_(m.bias)

  def interpolate_pos_encoding(self, x, w, h):
    """pos_embed for an input of w x h pixels, bicubic from the m x m pre-training grid.

    offset != 0 (INP-Former, older upstream): scale factor (grid + offset) / m, which is also
    what F.interpolate uses to map coordinates. offset 0 (current upstream hub): output size
    (grid, grid), i.e. coordinates mapped by m / grid -- not the same numbers.
    """
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
    assert n == m * m, f"pos_embed holds {n} patch positions, not a square grid"
    if self.interpolate_offset:
      sx = float(w0 + self.interpolate_offset) / m
      sy = float(h0 + self.interpolate_offset) / m
      resize = {"scale_factor": (sx, sy)}
    else:
      resize = {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
        antialias=self.interpolate_antialias, **resize)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

  def prepare_tokens(self, x):
    """(B, 3, S, S) -> (B, 1+R+N, D) = [cls, registers, patches]; registers get no pos-embed."""
    b, _, w, h = x.shape
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    if self.register_tokens is not None:
      x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
    return x

  def forward(self, x, layers: Sequence[int]):
    """(B, 3, S, S) -> raw outputs (B, 1+R+N, D) of blocks `layers` (no final norm: what
    INP-Former reads); blocks after max(layers) are not run."""
    x = self.prepare_tokens(x)
    outs = {}
    for i, blk in enumerate(self.blocks[:max(layers) + 1]):
      x = blk(x)
      outs[i] = x
    return [outs[i] for i in layers]


# ---------------------------------------------------------------------------------------
# INP-Former blocks (models/vision_transformer.py).
# ---------------------------------------------------------------------------------------


class Aggregation_Attention(nn.Module):  # noqa: N801  (official name)
  """Softmax cross-attention: queries x (B, M, D) over y (B, N, D) -> (B, M, D)."""

  def __init__(self, dim, num_heads=8, qkv_bias=True, attn_impl="official"):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q = nn.Linear(dim, dim, bias=qkv_bias)
    self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.attn_impl = attn_impl

  def forward(self, x, y):
    b, t, c = x.shape
    n = y.shape[1]
    h = self.num_heads
    q = self.q(x).reshape(b, t, 1, h, c // h).permute(2, 0, 3, 1, 4)[0]
    kv = self.kv(y).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if self.attn_impl == "sdpa":
      x, attn = F.scaled_dot_product_attention(q, k, v), None
    else:
      attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
      x = attn @ v
    return self.proj(x.transpose(1, 2).reshape(b, t, c)), attn


class Aggregation_Block(nn.Module):  # noqa: N801
  """INP extractor block: x = x + attn(norm1(x), norm1(y)); x = x + mlp(norm2(x)).
  The SAME norm1 normalises the INP queries and the image tokens."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm,
               attn_impl="official"):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = Aggregation_Attention(dim, num_heads, qkv_bias, attn_impl)
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, y):
    y, _ = self.attn(self.norm1(x), self.norm1(y))
    x = x + y
    return x + self.mlp(self.norm2(x))


class Prototype_Attention(nn.Module):  # noqa: N801
  """Cosine, ReLU-gated cross-attention of image tokens x (B, N, D) over INPs (B, M, D).

  q, k L2-normalised per head, times a learned per-head scale (H, 1, 1), ReLU; no softmax, no
  1/sqrt(d). Returns (out (B, N, D), attn (B, H, N, M)).
  """

  def __init__(self, dim, num_heads=8, qkv_bias=True):
    super().__init__()
    self.num_heads = num_heads
    self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
    self.q = nn.Linear(dim, dim, bias=qkv_bias)
    self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, y):
    b, t, c = x.shape
    n = y.shape[1]
    h = self.num_heads
    q = self.q(x).reshape(b, t, 1, h, c // h).permute(2, 0, 3, 1, 4)[0]
    kv = self.kv(y).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = F.relu((q @ k.transpose(-2, -1)) * self.learn_scale)
    x = (attn @ v).transpose(1, 2).reshape(b, t, c)
    return self.proj(x), attn


class Prototype_Block(nn.Module):  # noqa: N801
  """INP-guided decoder block: x = attn(norm1(x), norm1(inps)) with NO residual; then
  x = x + mlp(norm2(x))."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = Prototype_Attention(dim, num_heads, qkv_bias)
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, prototype):
    x, _ = self.attn(self.norm1(x), self.norm1(prototype))
    return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------
# INP_Former (models/uad.py).
# ---------------------------------------------------------------------------------------


def fuse_feature(feat_list):
  return torch.stack(feat_list, dim=1).mean(dim=1)


class INP_Former(nn.Module):  # noqa: N801
  """images (B, 3, S, S) -> (en, de, g_loss); en/de: lists of 2 tensors (B, D, S/14, S/14).

  `encoder_bf16=True` runs the frozen encoder blocks under torch.autocast('cpu', bfloat16)
  (an inference/bench option, not in the official code); target-layer outputs are cast back
  to float32 so the trainable part is unchanged.
  """

  def __init__(self, encoder, bottleneck, aggregation, decoder, prototype_token,
               target_layers=TARGET_LAYERS, fuse_layer_encoder=FUSE_LAYERS,
               fuse_layer_decoder=FUSE_LAYERS, remove_class_token=True,
               encoder_require_grad_layer=()):
    super().__init__()
    # Child registration order = official state_dict order (after prototype_token).
    self.encoder = encoder
    self.bottleneck = bottleneck
    self.aggregation = aggregation
    self.decoder = decoder
    self.target_layers = list(target_layers)
    self.fuse_layer_encoder = [list(g) for g in fuse_layer_encoder]
    self.fuse_layer_decoder = [list(g) for g in fuse_layer_decoder]
    self.remove_class_token = remove_class_token
    self.encoder_require_grad_layer = list(encoder_require_grad_layer)
    self.prototype_token = prototype_token[0]  # re-registered here, as in the official code
    self.encoder_bf16 = False
    self.distance = self.cluster_index = None

  def gather_loss(self, query, keys):
    """INP coherence loss: mean over tokens of min_m (1 - cos(x_n, inp_m))."""
    self.distribution = 1.0 - F.cosine_similarity(query.unsqueeze(2), keys.unsqueeze(1), dim=-1)
    self.distance, self.cluster_index = torch.min(self.distribution, dim=2)
    return self.distance.mean()

  def encode(self, x):
    """images -> (en_list: 8 x (B, L, D) raw block outputs, side). Blocks > last target skip."""
    x = self.encoder.prepare_tokens(x)
    en_list = []
    ctx = (partial(torch.autocast, "cpu", dtype=torch.bfloat16) if self.encoder_bf16
           else contextlib.nullcontext)
    with ctx():
      for i, blk in enumerate(self.encoder.blocks):
        if i > self.target_layers[-1]:
          continue
        if i in self.encoder_require_grad_layer:
          x = blk(x)
        else:
          with torch.no_grad():
            x = blk(x)
        if i in self.target_layers:
          en_list.append(x)
    if self.encoder_bf16:
      en_list = [e.float() for e in en_list]
    side = int(math.sqrt(en_list[0].shape[1] - 1 - self.encoder.num_register_tokens))
    return en_list, side

  def forward_features(self, en_list, side):
    """Everything after the encoder (the trainable part): en_list -> (en, de, g_loss)."""
    prefix = 1 + self.encoder.num_register_tokens
    if self.remove_class_token:
      en_list = [e[:, prefix:, :] for e in en_list]
    x = fuse_feature(en_list)
    b = x.shape[0]
    agg_prototype = self.prototype_token
    for blk in self.aggregation:
      agg_prototype = blk(agg_prototype.unsqueeze(0).repeat((b, 1, 1)), x)
    g_loss = self.gather_loss(x, agg_prototype)
    for blk in self.bottleneck:
      x = blk(x)
    de_list = []
    for blk in self.decoder:
      x = blk(x, agg_prototype)
      de_list.append(x)
    de_list = de_list[::-1]
    en = [fuse_feature([en_list[i] for i in idxs]) for idxs in self.fuse_layer_encoder]
    de = [fuse_feature([de_list[i] for i in idxs]) for idxs in self.fuse_layer_decoder]
    if not self.remove_class_token:
      en = [e[:, prefix:, :] for e in en]
      de = [d[:, prefix:, :] for d in de]
    en = [e.permute(0, 2, 1).reshape([b, -1, side, side]).contiguous() for e in en]
    de = [d.permute(0, 2, 1).reshape([b, -1, side, side]).contiguous() for d in de]
    return en, de, g_loss

  def forward(self, x):
    en_list, side = self.encode(x)
    return self.forward_features(en_list, side)


def build_inpformer(variant: str | Mapping[str, Any] = "base", num_registers: int = 4,
                    inp_num: int = 6, image_size: int = 392, attn_impl: str = "official",
                    init: bool = True) -> INP_Former:
  """The model as INP_Former_Multi_Class.py assembles it (+ the official train-phase init).

  Args:
    variant: "small" | "base" | "large", or a dict with embed_dim, num_heads and optionally
      depth (default 12) and target_layers, e.g. the dev fixture {"embed_dim": 96,
      "num_heads": 3}.
    num_registers: 4 for the dinov2reg encoders, 0 for plain dinov2.
    inp_num: M, the number of INPs.
    image_size: the input side S this model will be run at (checked: multiple of 14). The
      encoder is still built at 518 (pos_embed for a 37x37 grid, interpolated per input).
    attn_impl: "official" (explicit softmax, what the official code runs) or "sdpa".
    init: apply the official trunc-normal init to the trainable part (the scripts do so in
      --phase train). The encoder keeps the DINOv2 random init; load real weights on top.
  """
  if isinstance(variant, str):
    if variant not in VARIANTS:
      raise ValueError(f"unknown variant {variant!r}; use one of {sorted(VARIANTS)} or a dict")
    cfg = dict(VARIANTS[variant])
    target_layers = TARGET_LAYERS_LARGE if variant == "large" else TARGET_LAYERS
  else:
    cfg = dict(variant)
    target_layers = tuple(cfg.pop("target_layers", TARGET_LAYERS))
    cfg.setdefault("depth", 12)
  if image_size % PATCH_SIZE:
    raise ValueError(f"image_size {image_size} must be a multiple of {PATCH_SIZE} (e.g. 392, 224)")
  dim, heads = cfg["embed_dim"], cfg["num_heads"]
  encoder = DinoVisionTransformer(embed_dim=dim, depth=cfg["depth"], num_heads=heads,
                                  num_register_tokens=num_registers, attn_impl=attn_impl)
  ln = partial(nn.LayerNorm, eps=1e-8)
  bottleneck = nn.ModuleList([Mlp(dim, dim * 4, dim, drop=0.0)])
  inp = nn.ParameterList([nn.Parameter(torch.randn(inp_num, dim))])
  extractor = nn.ModuleList([
      Aggregation_Block(dim, heads, 4.0, qkv_bias=True, norm_layer=ln, attn_impl=attn_impl)])
  decoder = nn.ModuleList([
      Prototype_Block(dim, heads, 4.0, qkv_bias=True, norm_layer=ln)
      for _ in range(NUM_DECODER_BLOCKS)])
  model = INP_Former(encoder, bottleneck, extractor, decoder, inp, target_layers=target_layers)
  model.image_size = image_size
  if init:
    init_trainable(model)
  return model


def trainable_modules(model: INP_Former) -> nn.ModuleList:
  """ModuleList([Bottleneck, INP_Guided_Decoder, INP_Extractor, INP]) — the official order."""
  return nn.ModuleList([model.bottleneck, model.decoder, model.aggregation,
                        nn.ParameterList([model.prototype_token])])


def init_trainable(model: INP_Former) -> None:
  """Official init: Linear weight trunc_normal(std .01, ±.03), bias 0; LayerNorm 1/0."""
  for m in trainable_modules(model).modules():
    if isinstance(m, nn.Linear):
      trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
      if m.bias is not None:
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
      nn.init.constant_(m.bias, 0)
      nn.init.constant_(m.weight, 1.0)


# ---------------------------------------------------------------------------------------
# Loss (utils.py::global_cosine_hm_adaptive).
# ---------------------------------------------------------------------------------------


def modify_grad_v2(x, factor):
  factor = factor.expand_as(x)
  x *= factor
  return x


def global_cosine_hm_adaptive(a, b, y=LOSS_Y, factors_out: list | None = None):
  """Mean over groups of mean_b(1 - cos(flat a_b, flat b_b)); a backward hook on b scales
  dL/db per pixel by ((1 - cos_channel) / mean) ** y. `factors_out` (a list) collects the
  factors for inspection."""
  cos_loss = nn.CosineSimilarity()
  loss = 0
  for item in range(len(a)):
    a_ = a[item].detach()
    b_ = b[item]
    with torch.no_grad():
      point_dist = 1 - cos_loss(a_, b_).unsqueeze(1).detach()
    mean_dist = point_dist.mean()
    factor = (point_dist / mean_dist) ** y
    if factors_out is not None:
      factors_out.append(factor)
    loss += torch.mean(1 - cos_loss(a_.reshape(a_.shape[0], -1), b_.reshape(b_.shape[0], -1)))
    if b_.requires_grad:
      b_.register_hook(partial(modify_grad_v2, factor=factor))
  return loss / len(a)


# ---------------------------------------------------------------------------------------
# Anomaly maps and scores (utils.py::cal_anomaly_maps / get_gaussian_kernel / evaluation_batch).
# ---------------------------------------------------------------------------------------


def cal_anomaly_maps(fs_list, ft_list, out_size=224):
  """Per group 1 - cos over channels, bilinear(align_corners=True) to out_size; mean of groups.
  -> ((B, 1, S, S), [per-group (B, 1, S, S)])."""
  if not isinstance(out_size, tuple):
    out_size = (out_size, out_size)
  a_map_list = []
  for fs, ft in zip(fs_list, ft_list):
    a_map = torch.unsqueeze(1 - F.cosine_similarity(fs, ft), dim=1)
    a_map_list.append(F.interpolate(a_map, size=out_size, mode="bilinear", align_corners=True))
  return torch.cat(a_map_list, dim=1).mean(dim=1, keepdim=True), a_map_list


def get_gaussian_kernel(kernel_size=3, sigma=2, channels=1) -> nn.Conv2d:
  """Depthwise Conv2d (zero padding k//2, no bias) with a normalised 2-D gaussian."""
  x_coord = torch.arange(kernel_size)
  x_grid = x_coord.repeat(kernel_size).view(kernel_size, kernel_size)
  y_grid = x_grid.t()
  xy_grid = torch.stack([x_grid, y_grid], dim=-1).float()
  mean = (kernel_size - 1) / 2.0
  variance = sigma ** 2.0
  kernel = (1.0 / (2.0 * math.pi * variance)) * torch.exp(
      -torch.sum((xy_grid - mean) ** 2.0, dim=-1) / (2 * variance))
  kernel = kernel / torch.sum(kernel)
  kernel = kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1)
  conv = nn.Conv2d(channels, channels, kernel_size, groups=channels, bias=False,
                   padding=kernel_size // 2)
  conv.weight.data = kernel
  conv.weight.requires_grad = False
  return conv


def _smooth_and_score(anomaly_map, resize_mask=256, max_ratio=0.01):
  """(B,1,S,S) -> smoothed (B,1,r,r) and score (B,): evaluation_batch's tail."""
  if resize_mask is not None:
    anomaly_map = F.interpolate(anomaly_map, size=resize_mask, mode="bilinear",
                                align_corners=False)
  # .to(dtype) is a no-op for the official float32 maps; it lets a float64 copy run too.
  anomaly_map = get_gaussian_kernel(kernel_size=5, sigma=4).to(anomaly_map.device,
                                                                anomaly_map.dtype)(anomaly_map)
  flat = anomaly_map.flatten(1)
  if max_ratio == 0:
    score = torch.max(flat, dim=1)[0]
  else:
    score = torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * max_ratio)]
    score = score.mean(dim=1)
  return anomaly_map, score


@contextlib.contextmanager
def _encoder_bf16(model: INP_Former, enabled: bool):
  prev = model.encoder_bf16
  model.encoder_bf16 = enabled
  try:
    yield
  finally:
    model.encoder_bf16 = prev


@torch.no_grad()
def infer(model: INP_Former, images: torch.Tensor, *, bf16: bool = False,
          max_ratio: float = 0.01, resize_mask: int = 256) -> dict[str, torch.Tensor]:
  """evaluation_batch minus the metrics: {"map": (B,1,r,r) smoothed, "score": (B,)}.
  bf16=True runs the encoder under CPU autocast(bfloat16)."""
  model.eval()
  with _encoder_bf16(model, bf16):
    en, de, _ = model(images)
  anomaly_map, _ = cal_anomaly_maps(en, de, images.shape[-1])
  smoothed, score = _smooth_and_score(anomaly_map, resize_mask, max_ratio)
  return {"map": smoothed, "score": score}


@torch.no_grad()
def infer_zero_shot(model: INP_Former, images: torch.Tensor, *, max_ratio: float = 0.01,
                    resize_mask: int = 256) -> dict[str, torch.Tensor]:
  """evaluation_batch_vis_ZS: map from model.distance (min 1-cos to the INPs)."""
  model.eval()
  model(images)
  dist = model.distance
  side = int(dist.shape[1] ** 0.5)
  anomaly_map = dist.reshape([dist.shape[0], side, side]).contiguous().unsqueeze(1)
  anomaly_map = F.interpolate(anomaly_map, size=images.shape[-1], mode="bilinear",
                              align_corners=True)
  smoothed, score = _smooth_and_score(anomaly_map, resize_mask, max_ratio)
  return {"map": smoothed, "score": score}


# ---------------------------------------------------------------------------------------
# Optimiser and schedule (optimizers/StableAdamW.py, utils.py::WarmCosineScheduler).
# ---------------------------------------------------------------------------------------


class StableAdamW(torch.optim.Optimizer):
  """AdamW with decoupled decay applied BEFORE the update (with the current lr), optional
  AMSGrad, and per-tensor update clipping: the step is divided by max(1, RMS(g / denom) /
  clip_threshold), the RMS taken over the RAW current gradient (not the first moment)."""

  def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
               amsgrad=False, clip_threshold: float = 1.0):
    if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
      raise ValueError(f"invalid StableAdamW hyper-parameters lr={lr} eps={eps} betas={betas}")
    defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    clip_threshold=clip_threshold)
    super().__init__(params, defaults)

  @staticmethod
  def _rms(tensor):
    return tensor.norm(2) / (tensor.numel() ** 0.5)

  @torch.no_grad()
  def step(self, closure=None):
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group in self.param_groups:
      beta1, beta2 = group["betas"]
      for p in group["params"]:
        if p.grad is None:
          continue
        p.mul_(1 - group["lr"] * group["weight_decay"])
        grad = p.grad
        if grad.is_sparse:
          raise RuntimeError("StableAdamW does not support sparse gradients")
        state = self.state[p]
        if len(state) == 0:
          state["step"] = 0
          state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
          state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
          if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
          max_exp_avg_sq = state["max_exp_avg_sq"]
          torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
          denom = (max_exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        else:
          denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        step_size = group["lr"] / bias_correction1
        # As in the official code, lr_scale stays a 0-dim float32 tensor when it exceeds 1, so
        # -step_size / lr_scale is rounded to float32 before addcdiv_ (matters at the ulp level).
        lr_scale = max(1.0, self._rms(grad / denom) / group["clip_threshold"])
        p.addcdiv_(exp_avg, denom, value=-step_size / lr_scale)
    return loss


class WarmCosineScheduler(torch.optim.lr_scheduler.LRScheduler):
  """linspace(start, base, warmup) then cosine base -> final over total - warmup iterations;
  final_value from total_iters on. The constructor's implicit step makes iteration 0 use
  schedule[0] (= 0 with the default start)."""

  def __init__(self, optimizer, base_value, final_value, total_iters, warmup_iters=0,
               start_warmup_value=0):
    self.final_value = final_value
    self.total_iters = total_iters
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters)))
    self.schedule = np.concatenate((warmup_schedule, schedule))
    super().__init__(optimizer)

  def get_lr(self):
    if self.last_epoch >= self.total_iters:
      return [self.final_value for _ in self.base_lrs]
    return [self.schedule[self.last_epoch] for _ in self.base_lrs]


def build_optimizer(model: INP_Former, total_iters: int, *, lr: float = 1e-3,
                    final_lr: float = 1e-4, warmup_iters: int = 100):
  """(StableAdamW, WarmCosineScheduler) with the scripts' settings over the trainable part."""
  trainable = trainable_modules(model)
  optimizer = StableAdamW([{"params": trainable.parameters()}], lr=lr, betas=(0.9, 0.999),
                          weight_decay=1e-4, amsgrad=True, eps=1e-10)
  scheduler = WarmCosineScheduler(optimizer, base_value=lr, final_value=final_lr,
                                  total_iters=total_iters, warmup_iters=warmup_iters)
  return optimizer, scheduler


def training_loss(model: INP_Former, images: torch.Tensor | None = None, *,
                  features: tuple[Sequence[torch.Tensor], int] | None = None,
                  factors_out: list | None = None):
  """Forward + official objective: global_cosine_hm_adaptive(en, de, 3) + 0.2 * g_loss.
  `features=(en_list, side)` skips the (frozen, deterministic) encoder."""
  if features is not None:
    en, de, g_loss = model.forward_features(*features)
  else:
    en, de, g_loss = model(images)
  loss = global_cosine_hm_adaptive(en, de, y=LOSS_Y, factors_out=factors_out)
  return loss + GATHER_WEIGHT * g_loss


def train_step(model: INP_Former, optimizer: torch.optim.Optimizer, scheduler,
               images: torch.Tensor | None = None, *,
               features: tuple[Sequence[torch.Tensor], int] | None = None) -> dict[str, float]:
  """One official iteration: forward -> loss -> zero_grad -> backward -> clip_grad_norm(0.1)
  -> optimizer.step() -> scheduler.step(). Returns {"loss", "grad_norm" (pre-clip)}."""
  model.train()
  loss = training_loss(model, images, features=features)
  optimizer.zero_grad()
  loss.backward()
  params = [p for g in optimizer.param_groups for p in g["params"]]
  grad_norm = nn.utils.clip_grad_norm_(params, max_norm=CLIP_NORM)
  optimizer.step()
  if scheduler is not None:
    scheduler.step()
  return {"loss": loss.item(), "grad_norm": float(grad_norm)}
