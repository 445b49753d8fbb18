"""inpformer-jax: INP-Former (CVPR 2025) universal visual anomaly detection in JAX/Flax."""

from __future__ import annotations

import os

__version__ = "0.1.0"


def load_official_checkpoint(path: str | os.PathLike, image_size: int = 392):
  """An official INP-Former checkpoint -> (model, params) ready for `model.apply`.

  Args:
    path: the official `model.pth` (needs the `torch` extra) or a directory written by
      `weights_conversion/convert_inpformer.py`.
    image_size: the input side the model will be used at (must be a multiple of 14);
      checked here so a wrong size fails early rather than inside jit.

  Returns:
    (INPFormer module, params) with `model.apply({"params": params}, images)` where images
    are float32 (B, image_size, image_size, 3), ImageNet-normalised.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from inpformer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from inpformer_jax.models import factory  # pylint: disable=g-import-not-at-top

  if image_size % 14:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size 14")
  path = os.fspath(path)
  if os.path.isdir(path):
    params, meta = checkpoint.load_params(path)
    if meta.get("kind") != "inpformer":
      raise ValueError(f"{path} holds {meta.get('kind')!r} params, not an INP-Former model; "
                       "convert a model.pth with weights_conversion/convert_inpformer.py")
    arch = meta["arch"]
  else:
    try:
      from weights_conversion import dinov2_mapping, inpformer_mapping  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # pragma: no cover - depends on the install
      raise ImportError("reading a .pth needs the torch extra (pip install "
                        "'inpformer-jax[torch]'), or convert it first with "
                        "weights_conversion/convert_inpformer.py") from e
    params, arch = inpformer_mapping.convert_inpformer_state_dict(
        dinov2_mapping.load_torch_file(path))
  enc = arch["encoder"]
  cfg = ml_collections.ConfigDict({
      "encoder": "custom", "width": enc["width"], "depth": enc["depth"],
      "num_heads": enc["num_heads"], "num_registers": enc["num_register_tokens"],
      "pretrain_grid": enc.get("pretrain_grid", 37),
      "num_inps": arch["num_inps"], "num_decoder_blocks": arch["num_decoder_blocks"],
      "decoder_heads": arch["num_heads"],
  })
  if enc["depth"] >= 24:
    cfg.target_layers = tuple(range(4, 19, 2))
  model = factory.build_model(cfg)
  return model, params
