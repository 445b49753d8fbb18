"""The conversion dialect: a mapping table, named hooks and one strict check.

  MAPPING[flax_path] = (torch_key, hook)            one tensor, transformed by HOOKS[hook]
                     = ((key_q, key_k, key_v), hook) several tensors into one leaf
                     = (None, "zeros")               a leaf the source does not store

`convert` applies a table to a state dict and checks the result against the model's own
parameter shapes (`params.shapes` of `jax.eval_shape(model.init, ...)`): every torch key must
be used, every model parameter filled, every shape right; all problems are reported at once.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from inpformer_jax import params as params_lib
from inpformer_jax.conversion import ConversionError

Key = str | tuple[str, ...] | None
Table = dict[str, tuple[Key, str]]


def _copy(x):
  return np.asarray(x, np.float32)


def _linear(w):
  return np.ascontiguousarray(_copy(w).T)  # torch (out, in) -> flax (in, out)


def _conv(w):
  # torch (O, I/groups, kh, kw) -> flax (kh, kw, I/groups, O); depthwise (C,1,k,k) -> (k,k,1,C)
  return np.ascontiguousarray(_copy(w).transpose(2, 3, 1, 0))


def _concat_linear(*ws):
  return _linear(np.concatenate(ws, axis=0))  # fused rows are [q | k | v]


def _concat(*bs):
  return _copy(np.concatenate(bs, axis=0))


def _prepend_zero_position(p):
  # timm's no_embed_class layout stores no cls position; zeros compute the same tokens.
  p = _copy(p)
  return np.concatenate([np.zeros_like(p[:, :1]), p], axis=1)


HOOKS: dict[str, Callable[..., np.ndarray]] = {
    "copy": _copy,                # tokens, biases, LayerNorm weight -> scale, LayerScale
    "linear": _linear,
    "conv": _conv,
    "concat_linear": _concat_linear,
    "concat": _concat,
    "prepend_zero_position": _prepend_zero_position,
}


def torch_keys(table: Table) -> list[str]:
  """Every torch key a table reads."""
  out = []
  for key, _ in table.values():
    out.extend([key] if isinstance(key, str) else list(key or ()))
  return out


def prefixed(table: Table, flax_prefix: str, torch_prefix: str) -> Table:
  """A table moved under `flax_prefix/` and `torch_prefix` (e.g. 'encoder', 'encoder.')."""
  def move(key):
    if key is None or isinstance(key, str):
      return key and torch_prefix + key
    return tuple(torch_prefix + k for k in key)
  return {f"{flax_prefix}/{path}": (move(key), hook) for path, (key, hook) in table.items()}


def convert(state_dict: Mapping[str, np.ndarray], table: Table,
            expected: Mapping[str, tuple[int, ...]], *, what: str, hint: str = "",
            ignored: Sequence[str] = ()) -> dict:
  """state dict -> nested Flax params (float32 numpy), strictly.

  expected: {flax path: shape} of the model the table targets. ignored: torch key suffixes
  that carry no parameter (e.g. BatchNorm's `num_batches_tracked`).
  """
  if set(table) != set(expected):  # the table and the model disagree: a bug here, not input
    raise AssertionError(f"conversion table vs model: {sorted(set(table) ^ set(expected))[:10]}")
  sd = {k: v for k, v in state_dict.items() if not k.endswith(tuple(ignored))}
  used = set(torch_keys(table))
  missing = sorted(k for k in used if k not in sd)
  unexpected = sorted(k for k in sd if k not in used)
  found = [params_lib.listing(label, keys) for label, keys in
           (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
  flat, names = {}, {}
  for path, (key, hook) in table.items():
    keys = [key] if isinstance(key, str) else list(key or ())
    if any(k not in sd for k in keys):
      continue
    names[path] = " + ".join(f"{k} {tuple(np.shape(sd[k]))}" for k in keys) + f" -> {path}"
    flat[path] = (HOOKS[hook](*(sd[k] for k in keys)) if keys
                  else np.zeros(expected[path], np.float32))
  wrong = params_lib.problems(expected, {k: np.shape(v) for k, v in flat.items()},
                              allow_extra=True, names=names)
  found += [p for p in wrong if p.startswith("wrong shape")]
  if found:
    raise ConversionError(f"cannot convert {what}:\n  " + "\n  ".join(found) + hint)
  return params_lib.unflatten(flat)
