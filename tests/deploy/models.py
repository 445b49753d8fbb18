"""Tiny models and data shared by tests/deploy/ and tests/test_loading.py.

  params_dir(d)        a converted-params dir (meta.json + params/) of a tiny random INP-Former
  fill(abstract)       random numpy params of any abstract tree (no init to compile)
  demo_class(d)        the demo dataset's 'brick' class at 64 px (4 train, 2 good + 3 defects)
  direct(loaded, fs)   the reference forward: jit of model.apply + anomaly_map + image_score,
                       one image at a time (one compiled shape for every call)
and the module fixtures the test files import by name (pytest finds a fixture imported into
a test module): `tiny` (a params dir), `demo_data` (the brick class folder), `loaded`
(`loading.load(tiny, image_size=CROP)`). The compilation cache is conftest's.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from inpformer_jax import anomaly_map as am
from inpformer_jax import checkpoint
from inpformer_jax import loading
from inpformer_jax import params as params_lib
from inpformer_jax.conversion import inpformer as inpformer_conversion
from inpformer_jax.data import demo
from inpformer_jax.models import factory

CROP, RESIZE = 56, 64  # 4 x 4 patches
# What conversion.inpformer.infer_arch reads from an official state dict of this model.
ARCH = {"encoder": {"width": 32, "depth": 10, "num_heads": 2, "num_register_tokens": 0,
                    "patch_size": 14, "pretrain_grid": 37, "mlp_ratio": 4.0},
        "width": 32, "num_inps": 4, "num_decoder_blocks": 8, "num_heads": 2}


def tiny_model():
  return factory.model_from_arch(ARCH)


def _fill(path, leaf, rng):
  name = path.rsplit("/", 1)[-1]
  x = rng.standard_normal(leaf.shape)
  if name in ("scale", "learn_scale"):
    x = 1 + 0.1 * x
  elif name == "kernel":
    x = x / np.sqrt(leaf.shape[0])
  else:  # biases, LayerScale gammas, tokens, position embeddings
    x = 0.1 * x
  return x.astype(leaf.dtype)


def fill(abstract, seed: int = 0) -> dict:
  """Random numpy arrays of the shapes of `abstract` (a tree of ShapeDtypeStructs), drawn by
  numpy (no init to compile) at a working scale: LayerNorm scales near 1, kernels ~
  1/sqrt(fan_in), the rest small."""
  rng = np.random.default_rng(seed)
  return params_lib.unflatten({k: _fill(k, v, rng)
                               for k, v in params_lib.flatten(abstract).items()})


def full_abstract(model, image_size: int = CROP) -> dict:
  """The abstract full params (encoder + trainable) of `model`."""
  return params_lib.merge(factory.abstract_encoder(model, image_size),
                          loading.abstract_trainable(model, image_size))


def tiny_params(seed: int = 0) -> dict:
  """Random full params (encoder + trainable) of `tiny_model()`, as numpy."""
  return fill(full_abstract(tiny_model()), seed)


def params_dir(directory, params: dict | None = None) -> str:
  """A params dir as weights_conversion/convert_inpformer.py writes it (kind 'inpformer')."""
  checkpoint.save_params(directory, tiny_params() if params is None else params,
                         {"kind": inpformer_conversion.META_KIND, "arch": ARCH})
  return str(directory)


def demo_class(out) -> str:
  """The demo dataset's brick class, small: returns OUT/brick."""
  demo.make_demo_dataset(str(out), seed=0, classes=("brick",), size=64, n_train=4, n_good=2,
                         n_per_defect=1)
  return os.path.join(str(out), "brick")


def image_files(folder) -> list[str]:
  """The image files under `folder`, sorted, absolute."""
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.abspath(folder))
                for f in fs if f.endswith(".png"))


def direct(loaded, files):
  """Reference: the loader's preprocessing, then model.apply + anomaly_map + image_score, one
  image at a time. -> (maps (n, 256, 256), scores (n,))."""
  model, crop = loaded.model, loaded.preprocessing.crop

  @jax.jit
  def fn(params, x):
    out = model.apply({"params": params}, x)
    if loaded.map_kind == "inp_distance":
      maps = am.zero_shot_map(out["distance"], crop)
    else:
      maps = am.anomaly_map(out["en"], out["de"], crop)
    return maps, am.image_score(maps, loaded.top_ratio)

  res = [fn(loaded.params, loaded.preprocessing.image(f)[None]) for f in files]
  return (np.concatenate([np.asarray(m) for m, _ in res]),
          np.concatenate([np.asarray(s) for _, s in res]))


# ---------------------------------------------------------------------------------------
# Module fixtures (import them by name into a test module).
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A params dir of the tiny random INP-Former (not to be written into: copy it first)."""
  return params_dir(tmp_path_factory.mktemp("tiny") / "params")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  return demo_class(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def loaded(tiny):
  return loading.load(tiny, image_size=CROP)
