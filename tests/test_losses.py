"""The training loss (inpformer_jax/losses.py) against the official code's own outputs (the
golden fixture): loss terms, soft-mining factors, gradients of every checked parameter, the
coherence-only gradients."""

import jax
import jax.numpy as jnp
import optax

from inpformer_jax import losses
from inpformer_jax import params as params_lib
from tests import helpers
from tests.helpers import FWD_RTOL, GRAD_RTOL, LOSS_ATOL, close_abs, close_rel, nhwc


def test_losses_and_factors(golden, golden_forward):
  z, _ = golden
  _, out, _ = golden_forward
  total, parts = losses.inpformer_loss(out)
  close_abs(total, z["train/loss_total"], LOSS_ATOL, "loss total")
  close_abs(parts["reconstruction"], z["train/loss_rec"], LOSS_ATOL, "loss rec")
  close_abs(parts["coherence"], z["train/loss_gather"], LOSS_ATOL, "loss gather")
  for g in range(2):
    f = losses.soft_mining_factor(out["en"][g], out["de"][g], 3.0)
    close_rel(f, nhwc(z[f"train/hm_factor{g}"]), FWD_RTOL, f"hm factor {g}")


def test_gradients(golden, golden_model, golden_forward):
  z, _ = golden
  model, params, _ = golden_model
  x, _, _ = golden_forward
  # One backward through all parameters: the trainable part is checked against the
  # official gradients, the encoder part must be zero.
  full = jax.jit(jax.grad(lambda p: losses.inpformer_loss(model.apply({"params": p}, x))[0]))(
      params)
  encoder_grads, grads = params_lib.split(full)
  names = [k[5:] for k in z.files if k.startswith("grad/") and k != "grad/global_norm"]
  assert len(names) >= 15
  for name in names:
    close_rel(helpers.official_param(grads, name), z[f"grad/{name}"], GRAD_RTOL, f"grad {name}")
  close_rel(optax.global_norm(grads), z["grad/global_norm"], GRAD_RTOL, "grad global norm")
  # the encoder gets no gradient at all
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(encoder_grads))


def test_coherence_only_gradients(golden, golden_model, golden_forward):
  z, _ = golden
  model, params, _ = golden_model
  x, _, _ = golden_forward
  enc, trainable = params_lib.split(params)
  grads = jax.jit(jax.grad(helpers.loss_fn(model, enc, x, "coherence")))(trainable)
  names = [k[len("grad_gather_only/"):] for k in z.files if k.startswith("grad_gather_only/")]
  assert names
  for name in names:
    close_rel(helpers.official_param(grads, name), z[f"grad_gather_only/{name}"], GRAD_RTOL,
              f"coherence grad {name}")
  # the coherence loss reaches only the extractor and the INP parameter
  for key in ("bottleneck_0", "decoder_0"):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[key]))
