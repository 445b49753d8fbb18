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
import ml_collections
import numpy as np
import pytest

from inpformer_jax.conversion import dinov2 as dinov2_conversion
from inpformer_jax.models import factory, vit
from inpformer_jax.settings import ConfigError
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


def _hf_interpolate_pos_encoding(pos_embed, grid, *, registers, dtype=torch.float32):
  """transformers' Dinov2Embeddings.interpolate_pos_encoding (registers=False) and
  Dinov2WithRegistersEmbeddings' (registers=True, which adds antialias=True), square input.
  They compute in float32 (`dtype`); float64 shows the interpolation without float32's
  rounding of torch's own cubic weights."""
  class_pos_embed, patch_pos_embed = pos_embed[:, :1], pos_embed[:, 1:]
  dim, side = pos_embed.shape[-1], int((pos_embed.shape[1] - 1) ** 0.5)
  patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
  target_dtype = patch_pos_embed.dtype
  patch_pos_embed = torch.nn.functional.interpolate(
      patch_pos_embed.to(dtype), size=(grid, grid), mode="bicubic",
      align_corners=False, **({"antialias": True} if registers else {})).to(dtype=target_dtype)
  patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
  return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


_TINY = {"encoder": "custom", "width": 32, "depth": 1, "num_heads": 2, "num_registers": 0}


def _encoder_for_preset(preset, **model):
  return factory.build_encoder(ml_collections.ConfigDict(
      {**_TINY, "pos_embed_preset": preset, **model}))


@pytest.mark.parametrize("preset,registers", [("hf_dinov2", False),
                                              ("hf_dinov2_registers", True)])
def test_hf_presets_match_transformers_interpolation(preset, registers):
  pos = np.random.default_rng(11).standard_normal((1, 1 + 37 * 37, 32)).astype(np.float32)
  enc, official = _encoder_for_preset(preset), _encoder_for_preset(None)
  # 224, 392 and 546 px; at 39, scale_factor=39/37 would give floor(37 * 39/37) = 38: size= only.
  for grid in (16, 28, 39):
    exact = _hf_interpolate_pos_encoding(torch.from_numpy(pos).double(), grid,
                                         registers=registers, dtype=torch.float64).numpy()
    want = _hf_interpolate_pos_encoding(torch.from_numpy(pos), grid, registers=registers).numpy()
    got = vit.interpolate_pos_embed(jnp.asarray(pos), grid, offset=enc.interpolate_offset,
                                    antialias=enc.interpolate_antialias)
    np.testing.assert_allclose(np.asarray(got), exact, atol=1e-6, rtol=0)
    # torch's float32 cubic weights alone put its result 1.3e-5 from its float64 one (37 -> 28).
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
    inp = vit.interpolate_pos_embed(jnp.asarray(pos), grid, offset=official.interpolate_offset,
                                    antialias=official.interpolate_antialias)
    assert np.abs(np.asarray(inp) - want).max() > 1e-2  # the presets are told apart here


def test_pos_embed_preset_config_errors():
  with pytest.raises(ConfigError, match="pos_embed_preset.*hf_dinov2"):
    _encoder_for_preset("hf")
  with pytest.raises(ConfigError, match="interpolate_offset.*keep one"):
    _encoder_for_preset("timm", interpolate_offset=0.1)
  old = _encoder_for_preset(None, interpolate_offset=0.0, interpolate_antialias=True)
  assert (old.interpolate_offset, old.interpolate_antialias) == (0.0, True)  # older configs
