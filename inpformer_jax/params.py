"""Parameter trees: the encoder / trainable split, 'a/b/kernel' paths and the one strict check.

params = {"encoder": <frozen encoder params>, <trainable entries>...}; only the trainable part
is differentiated and given to the optimiser. Every place that receives parameters from
outside (a conversion table, a params directory, a training checkpoint, `config.init_from`)
compares them with the model's own tree through `check`, which lists every missing,
unexpected and mis-shaped entry at once.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

ENCODER = "encoder"
SEP = "/"


def split(params: Mapping[str, Any]) -> tuple[Any, dict]:
  """params -> (encoder params, trainable params)."""
  return params[ENCODER], {k: v for k, v in params.items() if k != ENCODER}


def merge(encoder: Any, trainable: Mapping[str, Any]) -> dict:
  return {ENCODER: encoder, **trainable}


def key_str(path) -> str:
  """'encoder/blocks_0/attn/qkv/kernel' from a jax tree path."""
  return SEP.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return {key_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(SEP)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a tree of arrays or ShapeDtypeStructs."""
  return {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}


def problems(expected: Mapping[str, tuple], got: Mapping[str, tuple], *,
             allow_extra: bool = False, names: Mapping[str, str] | None = None) -> list[str]:
  """What keeps `got` ({path: shape}) from being `expected`; [] when it fits.

  names: how to call a path in the message (e.g. the torch key it came from).
  """
  name = (lambda k: names.get(k, k)) if names else (lambda k: k)
  missing = sorted(name(k) for k in expected if k not in got)
  extra = [] if allow_extra else sorted(name(k) for k in got if k not in expected)
  wrong = sorted(f"{name(k)}: {tuple(got[k])}, expected {tuple(expected[k])}"
                 for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
  return [listing(label, items) for label, items in
          (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if items]


def listing(label: str, items: list[str], most: int = 12) -> str:
  """'missing (3): [...]', at most `most` items shown."""
  more = f" and {len(items) - most} more" if len(items) > most else ""
  return f"{label} ({len(items)}): {items[:most]}{more}"


def check(expected: Any, got: Any, what: str, fix: str, *, allow_extra: bool = False,
          error: type[Exception] = ValueError) -> Any:
  """`got` restricted to the entries of `expected`, as numpy of their dtypes, or `error`.

  allow_extra drops entries the model does not have (the official checkpoints carry encoder
  blocks 10-11 and the final norm, which INP-Former never runs).
  """
  want, have = flatten(expected), flatten(got)
  found = problems(shapes(expected), shapes(got), allow_extra=allow_extra)
  if found:
    raise error(f"{what} does not fit the model: " + "; ".join(found) + f". {fix}")
  return unflatten({k: np.asarray(have[k], v.dtype) for k, v in want.items()})
