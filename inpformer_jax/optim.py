"""Optimiser of the official recipe (SPEC §5): global-norm clip 0.1, then StableAdamW with the
warm-cosine learning-rate schedule. Weight decay applies to every trainable parameter."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def warm_cosine_schedule(base_value: float = 1e-3, final_value: float = 1e-4,
                         total_iters: int = 1000, warmup_iters: int = 100):
  """Official WarmCosineScheduler as an optax schedule: lr at 0-based iteration t.

  linspace(0, base, warmup) then base->final cosine over total-warmup iterations; iteration 0
  runs with lr 0 (the torch scheduler's constructor already took step 0); final_value from
  `total_iters` on.
  """
  warm = np.linspace(0.0, base_value, warmup_iters) if warmup_iters > 0 else np.zeros(0)
  iters = np.arange(total_iters - warmup_iters)
  cos = final_value + 0.5 * (base_value - final_value) * (
      1 + np.cos(np.pi * iters / max(len(iters), 1)))
  table = np.concatenate([warm, cos]).astype(np.float64)

  def schedule(count):
    count = jnp.asarray(count)
    if table.size == 0:
      return jnp.full(count.shape, final_value, jnp.float32)
    idx = jnp.clip(count, 0, table.size - 1)
    lr = jnp.asarray(table, jnp.float32)[idx]
    return jnp.where(count >= total_iters, jnp.float32(final_value), lr)

  schedule.table = table  # for tests and logging
  return schedule


class ClipState(NamedTuple):
  pass


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6))."""

  def init_fn(params):
    del params
    return ClipState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


class StableAdamWState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


def stable_adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-10,
                 weight_decay: float = 1e-4, amsgrad: bool = True,
                 clip_threshold: float = 1.0) -> optax.GradientTransformation:
  """StableAdamW as the official optimiser computes it, per parameter tensor p, step t>=1:

    p <- p * (1 - lr*wd)                                  (decoupled, before the update)
    m, v updated; v_max = max(v_max, v)                   (amsgrad)
    denom = sqrt(v_max) / sqrt(1 - b2^t) + eps
    scale = max(1, rms(g / denom) / clip_threshold)       (per-tensor update-RMS clipping)
    p <- p - lr / (1 - b1^t) / scale * m / denom

  `learning_rate` is a float or a schedule of the 0-based step count. Needs `params`.
  """
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return StableAdamWState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

  def update_fn(grads, state, params):
    if params is None:
      raise ValueError("stable_adamw needs params (decoupled weight decay)")
    lr = jnp.asarray(lr_fn(state.count), jnp.float32)
    t = (state.count + 1).astype(jnp.float32)
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, grads)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else nu

    def leaf_update(p, g, m, v):
      denom = jnp.sqrt(v) / jnp.sqrt(bc2) + eps
      rms = jnp.sqrt(jnp.mean(jnp.square(g / denom)))
      scale = jnp.maximum(1.0, rms / clip_threshold)
      decayed = p * (1.0 - lr * weight_decay)
      new_p = decayed - (lr / bc1 / scale) * (m / denom)
      return (new_p - p).astype(p.dtype)

    updates = jax.tree.map(leaf_update, params, grads, mu, nu_max)
    return updates, StableAdamWState(state.count + 1, mu, nu, nu_max if amsgrad else state.nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """clip_grad_norm(clip_norm) -> StableAdamW(warm-cosine lr). For the trainable params only.

  optim_config fields: lr, final_lr, warmup_steps, weight_decay, b1, b2, eps, amsgrad,
  clip_norm, update_clip_threshold.
  """
  schedule = warm_cosine_schedule(optim_config.lr, optim_config.final_lr, total_steps,
                                  optim_config.warmup_steps)
  return optax.chain(
      clip_by_global_norm_torch(optim_config.clip_norm),
      stable_adamw(schedule, optim_config.b1, optim_config.b2, optim_config.eps,
                   optim_config.weight_decay, optim_config.amsgrad,
                   optim_config.get("update_clip_threshold", 1.0)),
  )
