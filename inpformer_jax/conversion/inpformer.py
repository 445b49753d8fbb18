"""The official INP-Former `model.pth` (SPEC §8.2) -> `INPFormer` params, as one table.

The encoder part (`encoder.*`) is the fb-format DINOv2 table under `encoder/`; the trainable
part follows the official names (`decoder.{j}.attn.q` <-> `decoder_{j}/attn/q`). The
architecture is read from shapes: D and M from `prototype_token` (M, D), heads from
`decoder.0.attn.learn_scale` (H, 1, 1), registers from `encoder.register_tokens`, decoder
depth from the `decoder.{j}` keys.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import numpy as np

from inpformer_jax import checkpoint
from inpformer_jax import params as params_lib
from inpformer_jax.conversion import ConversionError
from inpformer_jax.conversion import dinov2
from inpformer_jax.conversion import mapping
from inpformer_jax.conversion import torch_files
from inpformer_jax.models import factory

ENCODER_PREFIX = "encoder."
META_KIND = "inpformer"


def _linear(flax: str, torch: str) -> mapping.Table:
  return {f"{flax}/kernel": (f"{torch}.weight", "linear"),
          f"{flax}/bias": (f"{torch}.bias", "copy")}


def _norm(flax: str, torch: str) -> mapping.Table:
  return {f"{flax}/scale": (f"{torch}.weight", "copy"), f"{flax}/bias": (f"{torch}.bias", "copy")}


def _block(flax: str, torch: str, extra: mapping.Table) -> mapping.Table:
  """norm1, norm2, attention q/kv/proj and the MLP of one extractor or decoder block."""
  t = {**_norm(f"{flax}/norm1", f"{torch}.norm1"), **_norm(f"{flax}/norm2", f"{torch}.norm2"),
       **extra}
  for name in ("attn/q", "attn/kv", "attn/proj", "mlp/fc1", "mlp/fc2"):
    t.update(_linear(f"{flax}/{name}", f"{torch}.{name.replace('/', '.')}"))
  return t


def trainable_table(num_decoder_blocks: int = 8) -> mapping.Table:
  """flax path ('decoder_0/attn/q/kernel') -> (torch key, hook) of the trainable part."""
  t = {"prototype_token": ("prototype_token", "copy"),
       **_linear("bottleneck_0/fc1", "bottleneck.0.fc1"),
       **_linear("bottleneck_0/fc2", "bottleneck.0.fc2"),
       **_block("aggregation_0", "aggregation.0", {})}
  for j in range(num_decoder_blocks):
    t.update(_block(f"decoder_{j}", f"decoder.{j}",
                    {f"decoder_{j}/attn/learn_scale": (f"decoder.{j}.attn.learn_scale", "copy")}))
  return t


def infer_arch(sd: Mapping) -> dict:
  """Architecture of an official INP-Former state dict, from shapes alone."""
  if "prototype_token" not in sd:
    raise ConversionError(
        "no 'prototype_token' key: this is not an INP-Former model.pth (for a bare DINOv2 "
        "checkpoint use weights_conversion/convert_dinov2.py)")
  m, dim = np.shape(sd["prototype_token"])
  if "decoder.0.attn.learn_scale" not in sd:
    raise ConversionError("missing key 'decoder.0.attn.learn_scale' (needed for the head count)")
  heads = int(np.shape(sd["decoder.0.attn.learn_scale"])[0])
  # Counted by one key every block has, so a stray `decoder.9.x` is reported as unexpected.
  blocks = {int(mm.group(1)) for k in sd
            if (mm := re.fullmatch(r"decoder\.(\d+)\.attn\.learn_scale", k))}
  enc, _ = dinov2.infer_arch(dinov2.strip_prefix(sd, ENCODER_PREFIX), "fb", heads)
  if enc["width"] != dim:
    raise ConversionError(f"encoder width {enc['width']} != prototype width {dim}")
  return {"width": int(dim), "num_heads": heads, "num_inps": int(m),
          "num_decoder_blocks": max(blocks) + 1 if blocks else 0, "encoder": enc}


def convert(state_dict: Mapping) -> tuple[dict, dict]:
  """Official INP-Former state dict -> (params {"encoder": ..., trainable...}, arch).

  arch: {"encoder": DinoViT kwargs, "width", "num_heads", "num_inps", "num_decoder_blocks"}
  (what `factory.model_from_arch` builds the model from).
  """
  arch = infer_arch(state_dict)
  enc = arch["encoder"]
  t = {**mapping.prefixed(dinov2.table("fb", enc["depth"], enc["num_register_tokens"]),
                          params_lib.ENCODER, ENCODER_PREFIX),
       **trainable_table(arch["num_decoder_blocks"])}
  model = factory.model_from_arch(arch)
  trainable = jax.eval_shape(lambda: factory.init_trainable(model, jax.random.PRNGKey(0),
                                                             model.encoder.patch_size))
  expected = {**{f"{params_lib.ENCODER}/{k}": v for k, v in dinov2.model_shapes(enc).items()},
              **params_lib.shapes(trainable)}
  what = (f"this INP-Former state dict (inferred D={arch['width']}, heads={arch['num_heads']}, "
          f"M={arch['num_inps']}, {arch['num_decoder_blocks']} decoder blocks)")
  return mapping.convert(state_dict, t, expected, what=what), arch


def convert_file(input_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
  """An official model.pth -> a params directory (`checkpoint.save_params`); -> its meta."""
  params, arch = convert(torch_files.load_state_dict(input_path))
  meta = {"kind": META_KIND, "arch": arch, "source": os.path.abspath(os.fspath(input_path)),
          "source_format": "official_inpformer_pth"}
  checkpoint.save_params(output_dir, params, meta)
  return meta

