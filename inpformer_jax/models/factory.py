"""Builds INP-Former from `config.model` (or an official checkpoint's architecture) and
initialises its trainable part. Where encoder weights come from is `inpformer_jax.loading`'s.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from inpformer_jax import params as params_lib
from inpformer_jax.settings import ConfigError
from inpformer_jax.models import efficientnet_lite, encoders, vit
from inpformer_jax.models.inp_former import INPFormer

_NAME_RE = re.compile(r"^dinov2(reg)?_vit_(small|base|large)_14$")


def parse_encoder_name(name: str) -> dict:
  """'dinov2reg_vit_base_14' -> {"variant": "base", "num_register_tokens": 4}."""
  m = _NAME_RE.match(name)
  if not m:
    raise ValueError(
        f"unknown encoder {name!r}: expected dinov2reg_vit_{{small,base,large}}_14, "
        f"dinov2_vit_{{small,base,large}}_14 or 'custom' (with width/depth/num_heads)")
  return {"variant": m.group(2), "num_register_tokens": 4 if m.group(1) else 0}


def default_target_layers(depth: int) -> tuple[int, ...]:
  """Official choice: blocks 2..9 of 12-block ViTs, 4,6,..,18 of ViT-L (24 blocks)."""
  if depth >= 24:
    return tuple(range(4, 19, 2))
  return tuple(range(2, 10))


def _dtype(name: str):
  """config.model.dtype -> the compute dtype; float64 (reference runs) needs jax_enable_x64."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
  if name not in dtypes:
    raise ConfigError(f"config.model.dtype={name!r}; choose one of {', '.join(dtypes)}")
  if name == "float64" and not jax.config.jax_enable_x64:
    raise ConfigError("config.model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1")
  return dtypes[name]


def attention_impl(name: str | None) -> str | None:
  """config.model.attention_impl -> DinoViT's. None: 'explicit' (DINOv2's own formulation) on
  the CPU, where jax.nn.dot_product_attention's XLA path took 880 ms against its 482 ms for
  ViT-B/392 (docs/encoder.md); elsewhere JAX's choice (cuDNN on GPUs)."""
  if name is None and jax.default_backend() == "cpu":
    return "explicit"
  return name


def is_cnn_encoder(name: str) -> bool:
  return name.startswith("efficientnet_lite")


def pos_embed_interpolation(model_config: ml_collections.ConfigDict) -> dict:
  """DinoViT's interpolate_offset / interpolate_antialias from config.model.pos_embed_preset
  (None = 'inpformer', the official code's), or from the loose interpolate_offset /
  interpolate_antialias fields, which older configs set; not both."""
  preset = model_config.get("pos_embed_preset")
  loose = {k: model_config.get(k) for k in ("interpolate_offset", "interpolate_antialias")
           if model_config.get(k) is not None}
  if preset is not None and loose:
    raise ConfigError(
        f"config.model.pos_embed_preset={preset!r} and config.model."
        f"{'/'.join(loose)} both set the position-embedding interpolation; keep one")
  try:
    out = vit.pos_embed_preset(vit.DEFAULT_POS_EMBED_PRESET if preset is None else preset)
  except ValueError as e:
    raise ConfigError(f"config.model.pos_embed_preset: {e}") from None
  out.update(loose)
  return out


def build_encoder(model_config: ml_collections.ConfigDict):
  """The frozen encoder described by `model_config` (DINOv2 ViT or EfficientNet-Lite)."""
  dtype = _dtype(model_config.get("dtype", "float32"))
  if is_cnn_encoder(model_config.encoder):
    variant = model_config.encoder[len("efficientnet_"):]
    if variant not in efficientnet_lite.VARIANTS:
      raise ValueError(f"unknown encoder {model_config.encoder!r}: EfficientNet variants are "
                       f"{['efficientnet_' + v for v in sorted(efficientnet_lite.VARIANTS)]}")
    return encoders.CNNFeatureEncoder(
        backbone=efficientnet_lite.EfficientNetLite(variant=variant, dtype=dtype),
        grid_stride=model_config.get("grid_stride", 16),
        normalize_layers=model_config.get("normalize_layers", True))
  common = dict(
      **pos_embed_interpolation(model_config),
      dtype=dtype,
      attention_impl=attention_impl(model_config.get("attention_impl", None)),
  )
  if model_config.encoder == "custom":
    return vit.DinoViT(width=model_config.width, depth=model_config.depth,
                       num_heads=model_config.num_heads,
                       num_register_tokens=model_config.num_registers,
                       pretrain_grid=model_config.get("pretrain_grid", vit.PRETRAIN_GRID),
                       **common)
  arch = parse_encoder_name(model_config.encoder)
  return vit.vit_from_variant(arch["variant"], num_register_tokens=arch["num_register_tokens"],
                              **common)


def build_model(model_config: ml_collections.ConfigDict) -> INPFormer:
  """INPFormer from config.model (see configs/common.py for the fields)."""
  encoder = build_encoder(model_config)
  cnn = is_cnn_encoder(model_config.encoder)
  layers = model_config.get("target_layers", None)
  if not layers:
    if cnn:
      raise ValueError("config.model.target_layers must name the EfficientNet blocks to use")
    layers = default_target_layers(encoder.depth)
  groups = model_config.get("fuse_groups", None) or ((0, 1, 2, 3), (4, 5, 6, 7))
  de_groups = model_config.get("decoder_groups", None) or groups
  n_used, n_blocks = len(layers), model_config.get("num_decoder_blocks", 8)
  for g in groups:
    if any(i >= n_used for i in g):
      raise ValueError(f"fuse group {g} indexes past the {n_used} target layers {layers}")
  for g in de_groups:
    if any(i >= n_blocks for i in g):
      raise ValueError(f"decoder group {g} indexes past the {n_blocks} decoder blocks")
  if len(groups) != len(de_groups):
    raise ValueError(f"{len(groups)} encoder groups but {len(de_groups)} decoder groups")
  fusion = model_config.get("fusion", None) or ("concat" if cnn else "mean")
  heads = model_config.get("decoder_heads", None) or getattr(encoder, "num_heads", None)
  if heads is None:
    raise ValueError("config.model.decoder_heads is required for a CNN encoder")
  return INPFormer(
      encoder=encoder,
      target_layers=tuple(layers),
      fuse_groups=tuple(tuple(int(i) for i in g) for g in groups),
      decoder_groups=tuple(tuple(int(i) for i in g) for g in de_groups),
      fusion=fusion,
      num_inps=model_config.get("num_inps", 6),
      num_decoder_blocks=model_config.get("num_decoder_blocks", 8),
      num_heads=heads,
      dtype=_dtype(model_config.get("dtype", "float32")),
  )


def model_from_arch(arch: dict, *, dtype: str = "float32") -> INPFormer:
  """The INP-Former an official checkpoint describes (`conversion.inpformer.infer_arch`)."""
  enc = arch["encoder"]
  return build_model(ml_collections.ConfigDict({
      "encoder": "custom", "width": enc["width"], "depth": enc["depth"],
      "num_heads": enc["num_heads"], "num_registers": enc["num_register_tokens"],
      "pretrain_grid": enc.get("pretrain_grid", vit.PRETRAIN_GRID), "num_inps": arch["num_inps"],
      "num_decoder_blocks": arch["num_decoder_blocks"], "decoder_heads": arch["num_heads"],
      "dtype": dtype}))


def init_trainable(model: INPFormer, rng: jax.Array, image_size: int) -> dict:
  """Trainable params only (official trunc-normal init), through `decode`: the encoder is
  not touched."""
  n = model.encoder.grid_size(image_size) ** 2
  dims = model.group_dims()
  en = [jnp.zeros((1, n, c), jnp.float32) for c in dims]
  fused = jnp.zeros((1, n, model.embed_dim), jnp.float32)
  params = dict(jax.jit(lambda r: model.init(r, en, fused, method=INPFormer.decode))(rng)["params"])
  # decode touches the encoder's attributes, which runs its setup and creates the params it
  # declares there (cls_token, pos_embed, ...) under "encoder": not trainable, and they would
  # shadow the real encoder params in params.merge.
  params.pop(params_lib.ENCODER, None)
  return params


def _encoder_init(model: INPFormer, rng: jax.Array, image_size: int) -> dict:
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.encoder.init(rng, dummy, layers=tuple(model.target_layers))["params"]


def abstract_encoder(model: INPFormer, image_size: int) -> Any:
  """The encoder's parameter tree as ShapeDtypeStructs: what loaded weights must match."""
  return jax.eval_shape(lambda: _encoder_init(model, jax.random.PRNGKey(0), image_size))


def random_encoder(model: INPFormer, seed: int, image_size: int) -> dict:
  """A seeded random encoder (config.model.encoder_weights='random'). A random DINOv2 has
  LayerScale 1e-5: its blocks are near identities, so nothing meaningful is detected."""
  logging.warning("Encoder has RANDOM weights: anomaly scores will be near chance.")
  init = jax.jit(functools.partial(_encoder_init, model, image_size=image_size))
  return init(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
