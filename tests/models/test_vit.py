"""Parity of the Flax DINOv2 ViT with a PyTorch reference and with the official-code golden.

The torch reference is the DINOv2 of tests/torch_reference/inpformer.py (which reproduces the
official golden fixture), built with facebookresearch's defaults by
tests/torch_reference/dinov2.py; weights go through our converter
(inpformer_jax/conversion/dinov2.py), so these tests check the conversion table and the model
together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inpformer_jax.conversion import dinov2 as dinov2_conversion
from inpformer_jax.models import vit
from tests import helpers

torch = pytest.importorskip("torch")
from tests.torch_reference import dinov2 as ref  # noqa: E402  pylint: disable=wrong-import-position


def _pair(width, depth, heads, regs, *, offset=0.1, antialias=False, seed=0, img_size=518):
  """(torch model, flax module, converted params) with the same random weights."""
  torch.manual_seed(seed)
  tm = ref.DinoVisionTransformer(img_size=img_size, embed_dim=width, depth=depth,
                                 num_heads=heads, num_register_tokens=regs,
                                 interpolate_offset=offset, interpolate_antialias=antialias)
  ref.randomize_(tm, seed).eval()
  params, arch = dinov2_conversion.convert(ref.state_dict_numpy(tm), num_heads=heads)
  fm = vit.DinoViT(**arch, interpolate_offset=offset, interpolate_antialias=antialias)
  return tm, fm, params


def _images(b, size, seed=1):
  return np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype(np.float32)


def _run_both(tm, fm, params, x, layers):
  with torch.no_grad():
    want = [t.numpy() for t in tm(torch.from_numpy(x), layers)]
  apply = jax.jit(lambda p, im: fm.apply({"params": p}, im, layers=layers))
  got = [np.asarray(a) for a in apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))]
  return want, got


def _assert_layers_close(want, got, atol=1e-5):
  assert len(want) == len(got)
  for i, (w, g) in enumerate(zip(want, got)):
    assert w.shape == g.shape, (i, w.shape, g.shape)
    err = np.abs(w - g).max()
    assert err <= atol, (f"returned layer {i}: max|diff| {err:.3g} > {atol} "
                         f"(max|x| {np.abs(w).max():.3g})")


@pytest.mark.parametrize("size", [112, 224])
def test_vit_s_shaped_no_registers_matches_torch(size):
  tm, fm, params = _pair(384, 4, 6, 0)
  layers = (0, 1, 2, 3)
  want, got = _run_both(tm, fm, params, _images(2, size), layers)
  _assert_layers_close(want, got)


@pytest.mark.parametrize("size,attention", [(112, None), (224, None), (112, "explicit")])
def test_vit_b_shaped_with_registers_matches_torch(size, attention):
  tm, fm, params = _pair(768, 3, 12, 4, seed=3)
  fm = fm.clone(attention_impl=attention)
  layers = (2, 0, 1)  # any order; blocks past max(layers) are not run
  want, got = _run_both(tm, fm, params, _images(1, size, seed=2), layers)
  _assert_layers_close(want, got)


def test_pretrain_size_skips_interpolation():
  # 518 = 37 * 14: pos_embed is used as stored (no resize), a separate code path.
  tm, fm, params = _pair(64, 2, 2, 4, seed=5)
  want, got = _run_both(tm, fm, params, _images(1, 518, seed=3), (0, 1))
  _assert_layers_close(want, got)


@pytest.mark.parametrize("size", [112, 168])
def test_hub_interpolation_antialias_offset0_matches_torch(size):
  tm, fm, params = _pair(64, 1, 2, 4, offset=0.0, antialias=True, seed=7)
  want, got = _run_both(tm, fm, params, _images(1, size, seed=4), (0,))
  _assert_layers_close(want, got)
  with torch.no_grad():
    x = torch.from_numpy(_images(1, size))
    want_pos = tm.interpolate_pos_encoding(tm.patch_embed(x), size, size).numpy()
  got_pos = fm.apply({"params": params}, size // 14, method=vit.DinoViT.interpolated_pos_embed)
  np.testing.assert_allclose(np.asarray(got_pos), want_pos, atol=1e-6, rtol=0)


def test_bfloat16_compute_is_close():
  tm, fm, params = _pair(128, 2, 2, 4, seed=9)
  x = _images(2, 112, seed=5)
  want, _ = _run_both(tm, fm, params, x, (0, 1))
  fm16 = fm.clone(dtype=jnp.bfloat16)
  got = jax.jit(lambda p, im: fm16.apply({"params": p}, im, layers=(0, 1)))(
      params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for w, g in zip(want, got):
    assert g.dtype == jnp.bfloat16
    g = np.asarray(g.astype(jnp.float32))
    rel = np.abs(w - g).max() / np.abs(w).max()
    assert rel < 5e-2, rel
    assert np.corrcoef(w.ravel(), g.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("shape", [(1, 100, 100, 3), (1, 112, 126, 3)])
def test_bad_input_sizes_raise(shape):
  m = vit.DinoViT(width=32, depth=1, num_heads=1, num_register_tokens=0)
  variables = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3))))
  with pytest.raises(ValueError, match="multiple of 14"):
    jax.eval_shape(lambda v: m.apply(v, jnp.zeros(shape), layers=(0,)), variables)


def test_golden_official_encoder(golden, golden_state_dict):
  z, _ = golden
  params, arch = dinov2_conversion.convert(golden_state_dict, prefix="encoder.", num_heads=3)
  assert arch == dict(width=96, depth=12, num_heads=3, num_register_tokens=4, patch_size=14,
                      pretrain_grid=37, mlp_ratio=4.0)
  images = jnp.asarray(helpers.nhwc(z["input/images"]))
  helpers.check_golden_encoder(vit.DinoViT(**arch), params, images, z)
