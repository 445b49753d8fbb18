"""Anomaly maps and image scores (SPEC §7.1, §7.3), and the one forward that makes them.

`maps_and_scores` is the computation evaluation, predict, calibrate and export all run:
image batch -> encoder/decoder groups -> anomaly map -> image score; `jit_maps_and_scores`
is its only jit.

Every stage after the per-token cosine distance is linear, so the pipeline
  bilinear (align_corners=True) h -> S,  bilinear (align_corners=False) S -> 256,
  5x5 sigma-4 Gaussian with zero padding
is one (256 x h) matrix K applied on both sides: map = K @ d @ K^T. K is built once per
(h, S) in float64 numpy from the same index/weight formulas as torch's kernels.
`map_stages` runs the stages one by one (for checks against the official intermediates).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from inpformer_jax.models.inp_former import cosine_distance

Array = jax.Array
MAP_SIZE = 256  # official: every map is compared at 256 x 256, whatever the input size
# 'reconstruction': 1 - cos(en, de) (SPEC §7.1); 'inp_distance': the distance of each token to
# its nearest INP, the zero-shot map (SPEC §7.3).
MAP_KINDS = ("reconstruction", "inp_distance")
_HI = jax.lax.Precision.HIGHEST


def bilinear_matrix(in_size: int, out_size: int, *, align_corners: bool) -> np.ndarray:
  """(out, in) matrix equal to torch F.interpolate(mode='bilinear', size=out) on one axis
  (no antialias)."""
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if align_corners:
      src = i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
      src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(math.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    mat[i, i0] += 1.0 - lam
    mat[i, i1] += lam
  return mat


def gaussian_kernel_1d(kernel_size: int = 5, sigma: float = 4.0) -> np.ndarray:
  """Normalised 1-D factor of the official 2-D kernel (which is its outer product)."""
  x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2.0
  g = np.exp(-x**2 / (2.0 * sigma**2))
  return g / g.sum()


def gaussian_kernel_2d(kernel_size: int = 5, sigma: float = 4.0) -> np.ndarray:
  g = gaussian_kernel_1d(kernel_size, sigma)
  return np.outer(g, g)


def gaussian_matrix(size: int, kernel_size: int = 5, sigma: float = 4.0) -> np.ndarray:
  """(size, size) banded matrix: 1-D Gaussian filtering with ZERO padding."""
  g = gaussian_kernel_1d(kernel_size, sigma)
  r = kernel_size // 2
  mat = np.zeros((size, size), np.float64)
  for i in range(size):
    for k in range(-r, r + 1):
      if 0 <= i + k < size:
        mat[i, i + k] = g[k + r]
  return mat


@functools.lru_cache(maxsize=64)
def _stage_matrices(grid: int, image_size: int, out_size: int, kernel_size: int,
                    sigma: float):
  up = bilinear_matrix(grid, image_size, align_corners=True)
  down = bilinear_matrix(image_size, out_size, align_corners=False)
  gauss = gaussian_matrix(out_size, kernel_size, sigma)
  return up, down, gauss


@functools.lru_cache(maxsize=64)
def map_matrix(grid: int, image_size: int, out_size: int = MAP_SIZE, kernel_size: int = 5,
               sigma: float = 4.0) -> np.ndarray:
  """K (out_size, grid) float32 with smoothed_map = K @ token_map @ K^T."""
  up, down, gauss = _stage_matrices(grid, image_size, out_size, kernel_size, sigma)
  return (gauss @ down @ up).astype(np.float32)


def _apply(mat: np.ndarray, x: Array) -> Array:
  """x (B, h, w) -> mat @ x @ mat^T, (B, out, out)."""
  m = jnp.asarray(mat, jnp.float32)
  x = jnp.einsum("ij,bjk->bik", m, x, precision=_HI)
  return jnp.einsum("bik,lk->bil", x, m, precision=_HI)


def token_distance_maps(en, de) -> Array:
  """Mean over groups of 1 - cos(en[g], de[g]) per token. -> (B, h, w) float32."""
  maps = [cosine_distance(e.astype(jnp.float32), d.astype(jnp.float32), axis=-1)
          for e, d in zip(en, de)]
  return jnp.mean(jnp.stack(maps, axis=0), axis=0)


@functools.partial(jax.jit, static_argnames=("image_size", "out_size", "sigma"))
def anomaly_map(en, de, image_size: int, out_size: int = MAP_SIZE, sigma: float = 4.0) -> Array:
  """en, de: lists of (B, h, w, D) -> smoothed anomaly maps (B, out_size, out_size)."""
  d = token_distance_maps(en, de)
  return _apply(map_matrix(d.shape[1], image_size, out_size, 5, sigma), d)


@functools.partial(jax.jit, static_argnames=("image_size", "out_size", "sigma"))
def zero_shot_map(distance: Array, image_size: int, out_size: int = MAP_SIZE,
                  sigma: float = 4.0) -> Array:
  """distance (B, h*w) to the nearest INP -> smoothed map (B, out_size, out_size)."""
  b, n = distance.shape
  side = int(round(math.sqrt(n)))
  d = distance.astype(jnp.float32).reshape(b, side, side)
  return _apply(map_matrix(side, image_size, out_size, 5, sigma), d)


@functools.partial(jax.jit, static_argnames=("top_ratio",))
def image_score(amap: Array, top_ratio: float = 0.01) -> Array:
  """(B, H, W) -> (B,): mean of the top `int(H*W*top_ratio)` pixels; top_ratio=0: the max."""
  flat = amap.reshape(amap.shape[0], -1)
  k = int(flat.shape[1] * top_ratio)
  if top_ratio == 0 or k == 0:
    return jnp.max(flat, axis=1)
  return jnp.mean(jax.lax.top_k(flat, k)[0], axis=1)


def map_stages(en, de, image_size: int, out_size: int = MAP_SIZE, sigma: float = 4.0) -> dict:
  """The official intermediates one by one (not fused); for checks and visualisation.

  -> {"group_full": [(B, S, S)], "full", "resized", "smoothed"}.
  """
  up, down, gauss = _stage_matrices(en[0].shape[1], image_size, out_size, 5, sigma)
  groups = [_apply(up, cosine_distance(e, d, axis=-1)) for e, d in zip(en, de)]
  full = jnp.mean(jnp.stack(groups, axis=0), axis=0)
  resized = _apply(down, full)
  return {"group_full": groups, "full": full, "resized": resized,
          "smoothed": _apply(gauss, resized)}


def resize_masks_to_map(masks: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
  """(B, S, S) -> (B, size, size) with torch 'nearest' (source index floor(dst * S / size)),
  as the official `F.interpolate(gt, 256, mode='nearest')`."""
  s = masks.shape[-1]
  idx = np.floor(np.arange(size) * (s / size)).astype(np.int64)
  return masks[:, idx][:, :, idx]


def maps_and_scores(model, params, images: Array, *, image_size: int,
                    map_kind: str = "reconstruction", top_ratio: float = 0.01) -> dict:
  """Pure: images (B, S, S, 3) normalised ->
  {"anomaly_map": (B, 256, 256) float32, "score": (B,) float32}."""
  if map_kind not in MAP_KINDS:
    raise ValueError(f"map_kind={map_kind!r}: use one of {MAP_KINDS}")
  out = model.apply({"params": params}, images)
  if map_kind == "inp_distance":
    amap = zero_shot_map(out["distance"], image_size)
  else:
    amap = anomaly_map(out["en"], out["de"], image_size)
  return {"anomaly_map": amap, "score": image_score(amap, top_ratio)}


def jit_maps_and_scores(model, *, image_size: int, map_kind: str = "reconstruction",
                        top_ratio: float = 0.01, out_sharding=None):
  """The jitted `maps_and_scores`: (params, images) -> outputs. out_sharding: where the
  outputs go (evaluation: split over the batch axes of its mesh); None: XLA decides."""
  fn = functools.partial(maps_and_scores, model, image_size=image_size, map_kind=map_kind,
                         top_ratio=top_ratio)
  return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)

