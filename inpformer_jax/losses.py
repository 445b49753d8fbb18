"""INP-Former training objective: soft-mining global cosine loss + 0.2 x INP coherence loss.

SPEC §4. The soft-mining re-weighting changes the GRADIENT w.r.t. the decoder output, per
pixel, by ((1 - cos) / mean)^3, and leaves the loss VALUE untouched: it is an identity with a
custom VJP (the official code registers a backward hook), not a stop_gradient blend, which
would change the forward value by rounding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from inpformer_jax.models.inp_former import cosine_distance

Array = jax.Array


@jax.custom_vjp
def scale_gradient(x: Array, factor: Array) -> Array:
  """Identity on x; multiplies the incoming cotangent by `factor` (broadcast)."""
  del factor
  return x


def _scale_gradient_fwd(x, factor):
  return x, factor


def _scale_gradient_bwd(factor, g):
  return (g * factor).astype(g.dtype), jnp.zeros_like(factor)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def soft_mining_factor(en: Array, de: Array, exponent: float = 3.0) -> Array:
  """(B, h, w, 1) gradient weights ((1 - cos)/mean(1 - cos))^exponent; no gradient."""
  en, de = jax.lax.stop_gradient(en), jax.lax.stop_gradient(de)
  point_dist = cosine_distance(en, de, axis=-1)[..., None]
  return (point_dist / jnp.mean(point_dist)) ** exponent


def global_cosine_loss(en: Array, de: Array) -> Array:
  """Batch mean of 1 - cos(en_b, de_b) over each image's whole flattened (h*w*D) map."""
  b = en.shape[0]
  return jnp.mean(cosine_distance(en.reshape(b, -1), de.reshape(b, -1), axis=-1))


def soft_mining_cosine_loss(en: Sequence[Array], de: Sequence[Array],
                            exponent: float = 3.0) -> Array:
  """Official `global_cosine_hm_adaptive(en, de, y=exponent)`: mean over groups.

  en[g], de[g]: (B, h, w, D). Encoder features get no gradient.
  """
  total = 0.0
  for e, d in zip(en, de):
    e = jax.lax.stop_gradient(e)
    d = scale_gradient(d, soft_mining_factor(e, d, exponent))
    total = total + global_cosine_loss(e, d)
  return total / len(en)


def inpformer_loss(outputs: dict, coherence_weight: float = 0.2,
                   mining_exponent: float = 3.0) -> tuple[Array, dict]:
  """outputs of INPFormer -> (total, {"reconstruction", "coherence"}).

  total = soft-mining cosine loss + coherence_weight * INP coherence loss.
  """
  rec = soft_mining_cosine_loss(outputs["en"], outputs["de"], mining_exponent)
  coh = outputs["coherence_loss"]
  return rec + coherence_weight * coh, {"reconstruction": rec, "coherence": coh}
