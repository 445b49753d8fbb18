"""Official INP-Former `model.pth` (SPEC §8.2) -> `INPFormer` params, as a table.

The encoder part (`encoder.*`) goes through `dinov2_mapping.convert_state_dict`; the
trainable part is the flat table `trainable_mapping()`: flax path -> (torch key, transform).
The architecture is inferred from shapes: D and M from `prototype_token` (M, D), heads from
`decoder.0.attn.learn_scale` (H, 1, 1), registers from `encoder.register_tokens`, decoder
depth from the `decoder.{j}` keys. Strict: every problem is reported at once.
"""

from __future__ import annotations

import re

import numpy as np

from weights_conversion import dinov2_mapping
from weights_conversion.dinov2_mapping import ConversionError

ENCODER_PREFIX = "encoder."


def _linear(prefix_flax: str, prefix_torch: str) -> dict:
  return {f"{prefix_flax}/kernel": (f"{prefix_torch}.weight", "linear"),
          f"{prefix_flax}/bias": (f"{prefix_torch}.bias", "copy")}


def _norm(prefix_flax: str, prefix_torch: str) -> dict:
  return {f"{prefix_flax}/scale": (f"{prefix_torch}.weight", "copy"),
          f"{prefix_flax}/bias": (f"{prefix_torch}.bias", "copy")}


def _mlp(prefix_flax: str, prefix_torch: str) -> dict:
  return {**_linear(f"{prefix_flax}/fc1", f"{prefix_torch}.fc1"),
          **_linear(f"{prefix_flax}/fc2", f"{prefix_torch}.fc2")}


def trainable_mapping(num_decoder_blocks: int = 8) -> dict[str, tuple[str, str]]:
  """flax path ('decoder_0/attn/q/kernel') -> (torch key, 'linear' | 'copy')."""
  table = {"prototype_token": ("prototype_token", "copy")}
  table.update(_mlp("bottleneck_0", "bottleneck.0"))
  a, ta = "aggregation_0", "aggregation.0"
  table.update(_norm(f"{a}/norm1", f"{ta}.norm1"))
  table.update(_norm(f"{a}/norm2", f"{ta}.norm2"))
  for name in ("q", "kv", "proj"):
    table.update(_linear(f"{a}/attn/{name}", f"{ta}.attn.{name}"))
  table.update(_mlp(f"{a}/mlp", f"{ta}.mlp"))
  for j in range(num_decoder_blocks):
    d, td = f"decoder_{j}", f"decoder.{j}"
    table.update(_norm(f"{d}/norm1", f"{td}.norm1"))
    table.update(_norm(f"{d}/norm2", f"{td}.norm2"))
    table[f"{d}/attn/learn_scale"] = (f"{td}.attn.learn_scale", "copy")
    for name in ("q", "kv", "proj"):
      table.update(_linear(f"{d}/attn/{name}", f"{td}.attn.{name}"))
    table.update(_mlp(f"{d}/mlp", f"{td}.mlp"))
  return table


TRANSFORMS = {
    "copy": lambda x: np.asarray(x, np.float32),
    "linear": lambda w: np.ascontiguousarray(np.asarray(w, np.float32).T),
}


def infer_arch(sd: dict) -> dict:
  """Architecture of an official INP-Former state dict, from shapes alone."""
  if "prototype_token" not in sd:
    raise ConversionError(
        "no 'prototype_token' key: this is not an INP-Former model.pth (for a bare DINOv2 "
        "checkpoint use weights_conversion/convert_dinov2.py)")
  m, dim = np.shape(sd["prototype_token"])
  if "decoder.0.attn.learn_scale" not in sd:
    raise ConversionError("missing key 'decoder.0.attn.learn_scale' (needed for the head count)")
  heads = int(np.shape(sd["decoder.0.attn.learn_scale"])[0])
  blocks = {int(mm.group(1)) for k in sd if (mm := re.match(r"decoder\.(\d+)\.", k))}
  return {"width": int(dim), "num_heads": heads, "num_inps": int(m),
          "num_decoder_blocks": max(blocks) + 1 if blocks else 0}


def convert_inpformer_state_dict(state_dict: dict) -> tuple[dict, dict]:
  """Official INP-Former state dict -> (params {"encoder": ..., trainable...}, arch).

  arch: {"encoder": DinoViT kwargs, "width", "num_heads", "num_inps", "num_decoder_blocks"}.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  arch = infer_arch(sd)
  enc_params, enc_arch = dinov2_mapping.convert_state_dict(
      sd, prefix=ENCODER_PREFIX, fmt="fb", num_heads=arch["num_heads"])
  table = trainable_mapping(arch["num_decoder_blocks"])
  dim, hidden, heads = arch["width"], 4 * arch["width"], arch["num_heads"]
  expected = _expected_shapes(table, dim, hidden, heads, arch["num_inps"])
  rest = {k: v for k, v in sd.items() if not k.startswith(ENCODER_PREFIX)}
  missing = sorted(k for k in expected if k not in rest)
  unexpected = sorted(k for k in rest if k not in expected)
  misshaped = sorted(f"{k}: {tuple(rest[k].shape)} != expected {expected[k]}"
                     for k in expected if k in rest and tuple(rest[k].shape) != expected[k])
  if missing or unexpected or misshaped:
    raise ConversionError(
        "cannot convert this INP-Former state dict (inferred "
        f"D={dim}, heads={heads}, M={arch['num_inps']}, "
        f"{arch['num_decoder_blocks']} decoder blocks):\n"
        f"  missing keys ({len(missing)}): {missing}\n"
        f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
        f"  wrong shapes ({len(misshaped)}): {misshaped}")
  if enc_arch["width"] != dim:
    raise ConversionError(f"encoder width {enc_arch['width']} != prototype width {dim}")
  params: dict = {"encoder": enc_params}
  for path, (key, kind) in table.items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = TRANSFORMS[kind](rest[key])
  return params, {**arch, "encoder": enc_arch}


def _expected_shapes(table: dict, dim: int, hidden: int, heads: int, m: int) -> dict:
  shapes = {}
  for key, _ in table.values():
    if key == "prototype_token":
      shape = (m, dim)
    elif key.endswith("learn_scale"):
      shape = (heads, 1, 1)
    elif ".kv." in key:
      shape = (2 * dim, dim) if key.endswith("weight") else (2 * dim,)
    elif ".fc1." in key:
      shape = (hidden, dim) if key.endswith("weight") else (hidden,)
    elif ".fc2." in key:
      shape = (dim, hidden) if key.endswith("weight") else (dim,)
    else:  # q, proj, norms
      is_linear = any(f".{n}." in key for n in ("q", "proj"))
      shape = (dim, dim) if (is_linear and key.endswith("weight")) else (dim,)
    shapes[key] = shape
  return shapes
