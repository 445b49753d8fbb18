"""The optimiser (inpformer_jax/optim.py) against the official code's own outputs (the golden
fixture): two clip + StableAdamW steps and the warm-up cosine lr schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inpformer_jax import optim
from inpformer_jax import params as params_lib
from tests import helpers
from tests.helpers import FWD_RTOL, GRAD_RTOL, LOSS_ATOL, close_abs, close_rel


def test_two_optimizer_steps(golden, golden_model, golden_forward):
  """Two clip(0.1) + StableAdamW steps from sd/*, each with a fresh forward/backward.

  Adam's first steps are sign-like (m / sqrt(v) ~ sign(g)), so an element whose true gradient
  is zero up to float32 noise (below 1e-4 of the tensor's largest) (e.g. the key bias of a
  softmax attention, which is shift invariant, or directions removed by the decoder's q/k
  normalisation) moves by +-lr in either direction in both implementations. Those elements
  are compared against that bound; every element with a gradient above the noise floor must
  match to 1e-5.
  """
  z, meta = golden
  model, params, _ = golden_model
  x, _, _ = golden_forward
  enc, trainable = params_lib.split(params)
  c = meta["constants"]["optimizer"]
  tx = optax.chain(
      optim.clip_by_global_norm_torch(meta["constants"]["clip_norm"]),
      optim.stable_adamw(c["lr"], c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"],
                         c["amsgrad"]))
  loss_grad = jax.jit(jax.value_and_grad(helpers.loss_fn(model, enc, x)))
  state = tx.init(trainable)
  conditioned = {}
  for step in (1, 2):
    loss, grads = loss_grad(trainable)
    # Step 2 is evaluated at parameters whose noise-floor elements moved +-lr in an
    # implementation-dependent direction (see above); measured effect on the loss ~4e-6 and
    # on the gradient norm ~2e-4, hence the looser step-2 bounds.
    close_abs(loss, z[f"opt/step{step}_loss"], LOSS_ATOL if step == 1 else 1e-5,
              f"step{step} loss")
    close_rel(optax.global_norm(grads), z[f"opt/step{step}_preclip_norm"],
              GRAD_RTOL if step == 1 else 1e-3, f"step{step} pre-clip norm")
    updates, state = tx.update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    names = [k[len(f"opt/step{step}/"):] for k in z.files if k.startswith(f"opt/step{step}/")]
    assert len(names) >= 7
    for name in names:
      g = np.abs(helpers.official_param(grads, name))
      ok = g > 1e-4 * g.max()
      conditioned[name] = conditioned.get(name, True) & ok
      mask = conditioned[name]
      assert mask.mean() >= 0.5, name
      ours, ref = helpers.official_param(trainable, name), z[f"opt/step{step}/{name}"]
      # The bound is 1e-5 of max|param| or a fraction of one step (lr), whichever is larger:
      # 1% at step 1. Step 2's gradients are taken where step 1 moved the noise-floor elements
      # +-lr in a rounding-dependent direction, which moves a well-conditioned element's
      # gradient by a few percent: measured at decoder.0.attn.q.weight[1, 46] (|g2| = 0.5% of
      # the tensor's max), 4.3e-6 off the official value with autodiff's backward, 2.2e-5 with
      # the hand-written Linear/MLP backward (models/inp_former.py) and up to 9.8e-6 in a
      # float64 run: 5% of lr at step 2.
      tol = max(FWD_RTOL * np.abs(ref).max(), (1e-2 if step == 1 else 5e-2) * c["lr"])
      d = np.abs(ours - ref)[mask].max()
      assert d <= tol, f"step{step} param {name}: max diff {d:.3e} > {tol:.3e}"
      # noise-floor elements: bounded by the per-step learning rate
      assert np.abs(ours - ref)[~mask].max(initial=0.0) <= 2 * step * c["lr"] * 1.01


def test_lr_schedule(golden):
  z, _ = golden
  sched = optim.warm_cosine_schedule(1e-3, 1e-4, 250, 100)
  lrs = np.asarray(jax.vmap(sched)(jnp.arange(260)))
  close_abs(lrs, z["sched/lr"], 1e-9, "lr schedule")
  assert lrs[0] == 0.0
