"""Frozen encoders as INP-Former sees them: raw feature layers on ONE token grid.

The contract an encoder module fulfils (the DINOv2 ViT does it natively):
  encoder(images (B, S, S, 3), layers=(...)) -> list of (B, P + N, C_i) per requested layer,
    where P = `encoder.num_prefix_tokens` leading tokens (cls/registers) are dropped by
    INP-Former and N = grid * grid patch tokens in row-major order;
  encoder.feature_dims(layers) -> [C_i];  encoder.grid_size(image_size) -> grid side.
How layers are grouped and fused is INP-Former's (config: fuse_groups, fusion), not the
encoder's.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from inpformer_jax.models import efficientnet_lite as effnet

Array = jax.Array


def resample_to_grid(x: Array, grid: int) -> Array:
  """(B, h, w, C) -> (B, grid, grid, C): average pooling by an integer factor when
  shrinking (no aliasing), bilinear (half-pixel centres, as torch align_corners=False) when
  growing."""
  b, h, w, c = x.shape
  if (h, w) == (grid, grid):
    return x
  if h >= grid and w >= grid:
    if h % grid or w % grid:
      raise ValueError(f"cannot pool a {h}x{w} map onto a {grid}x{grid} grid; use an input "
                       "size that is a multiple of the encoder's largest stride")
    fh, fw = h // grid, w // grid
    return x.reshape(b, grid, fh, grid, fw, c).mean(axis=(2, 4))
  return jax.image.resize(x, (b, grid, grid, c), method="linear", antialias=False)


class CNNFeatureEncoder(nn.Module):
  """A CNN backbone's block outputs brought to one token grid (stride `grid_stride`).

  Each requested map is resampled to the grid and, with `normalize_layers`, L2-normalised
  per token so every layer weighs the same in the concatenated groups (raw BatchNorm'd
  channels of different stages differ in scale by ~10x; cosine distances over a
  concatenation would otherwise be dominated by one stage).
  """
  backbone: nn.Module
  grid_stride: int = 16
  normalize_layers: bool = True
  num_prefix_tokens: int = 0

  def grid_size(self, image_size: int) -> int:
    if image_size % self.grid_stride:
      raise ValueError(f"image size {image_size} is not a multiple of the feature grid "
                       f"stride {self.grid_stride}")
    return image_size // self.grid_stride

  def feature_dims(self, layers: Sequence) -> list[int]:
    v = self.backbone.variant
    channels = {effnet.feature_position(r["name"], v): int(r["channels"])
                for r in effnet.feature_table(v)}
    return [channels[effnet.feature_position(name, v)] for name in layers]

  def __call__(self, images: Array, layers: Sequence) -> list[Array]:
    grid = self.grid_size(images.shape[1])
    maps = self.backbone(images, return_blocks=tuple(layers))
    out = []
    for m in maps:
      m = resample_to_grid(m.astype(jnp.float32), grid)
      if self.normalize_layers:
        m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-6)
      out.append(m.reshape(m.shape[0], grid * grid, m.shape[-1]))
    return out
