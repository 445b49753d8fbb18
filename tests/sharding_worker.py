"""Subprocess body of tests/test_sharding.py (needs its own process: the device count is
fixed when JAX creates its CPU backend).

  python tests/sharding_worker.py steps OUT.npz   # train steps on 1 device, data x8, fsdp
  python tests/sharding_worker.py errors          # the two user errors, printed
  python tests/sharding_worker.py hlo             # all-reduce bytes of a data-parallel step
"""

import functools
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ml_collections  # noqa: E402

from configs import demo  # noqa: E402
from inpformer_jax import loading, optim, sharding, train  # noqa: E402
from inpformer_jax import params as params_lib  # noqa: E402
from inpformer_jax.models import factory  # noqa: E402

# Five steps, every one with lr > 0 (no warm-up), so that each moves the params.
NUM_STEPS = 5
BATCH = 8
# (name, mesh config, rules, min_size): one device, pure data parallelism over 8, and
# FSDP 4 x data 2 with the default 'auto' rule (the tiny model's kernels are ~1e3-1e4
# elements: a low threshold so that they really are sharded) plus one explicit rule.
MESHES = (("one", dict(data=1, fsdp=1), (), None),
          ("data8", dict(data=-1, fsdp=1), (), None),
          ("fsdp4", dict(data=2, fsdp=4),
           ((r"decoder_0/attn/q/kernel", (None, "fsdp")), (r".*", "auto")), 1024))


def _float64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def run_steps(out_path):
  # float64, before any array exists: the three runs then differ by reduction order at
  # ~1e-16, and Adam's first steps cannot turn float32 noise in ~0 gradients into +-lr steps.
  jax.config.update("jax_enable_x64", True)
  config = demo.get_config("runlocal=True")
  config.optim.warmup_steps = 0
  config.model.dtype = "float64"  # compute, casts and loss in float64
  images = np.random.default_rng(0).normal(size=(NUM_STEPS, BATCH, 28, 28, 3))
  model = factory.build_model(config.model)
  encoder, _ = loading.encoder_params(config, model)
  trainable = factory.init_trainable(model, jax.random.PRNGKey(config.seed), config.data.crop)
  # Params (initialised in float32) and their optimiser state in float64 too.
  encoder, trainable = _float64(encoder), _float64(trainable)
  tx = optim.make_optimizer(config.optim, 10)
  schedule = optim.warm_cosine_schedule(config.optim.lr, config.optim.final_lr, 10,
                                        config.optim.warmup_steps)
  abstract = jax.eval_shape(functools.partial(train.make_state, tx=tx, seed=config.seed),
                            trainable)
  results = {}
  for name, mesh_cfg, rules, min_size in MESHES:
    mesh_cfg = ml_collections.ConfigDict(mesh_cfg)
    devices = jax.devices()[:1] if name == "one" else jax.devices()
    mesh = sharding.make_mesh(mesh_cfg, devices)
    kw = {} if min_size is None else {"min_size": min_size}
    state_sh = sharding.param_shardings(abstract, mesh, rules, **kw)
    encoder_sh = sharding.param_shardings(encoder, mesh, rules, **kw)
    sharded = sharding.describe(state_sh)
    print(name, dict(mesh.shape), f"{len(sharded)} sharded state leaves", flush=True)
    with jax.set_mesh(mesh):
      step = train.make_train_step(model, tx, schedule, config.loss, state_sh=state_sh,
                                   encoder_sh=encoder_sh, mesh=mesh, cached=False)
      init = jax.jit(functools.partial(train.make_state, tx=tx, seed=config.seed),
                     out_shardings=state_sh)
      state = init(trainable)
      enc = jax.device_put(encoder, encoder_sh)
      losses, lrs = [], []
      for i in range(NUM_STEPS):
        sharding.check_batch_size(BATCH, mesh)
        batch = sharding.global_batch({"image": images[i]}, mesh)
        state, metrics = step(state, enc, batch)
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
      # after the last step: params and optimiser state ('opt_state/1/mu/...', count, ...)
      flat = params_lib.flatten(jax.device_get({"param": state["params"],
                                                "opt": state["opt_state"]}))
      # where the first sharded kernel actually lives: its shard shape
      shard_shape = None
      for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        if params_lib.key_str(p) in sharded or ("params/" + params_lib.key_str(p)) in sharded:
          shard_shape = (params_lib.key_str(p), x.shape, x.addressable_shards[0].data.shape)
          break
    results[name] = dict(losses=np.array(losses), state=flat, n_sharded=len(sharded),
                         shard_shape=shard_shape, lrs=np.array(lrs))
  np.savez(out_path, **{f"{n}/loss": r["losses"] for n, r in results.items()},
           **{f"{n}/lr": r["lrs"] for n, r in results.items()},
           **{f"initial/param/{k}": v for k, v in params_lib.flatten(trainable).items()},
           **{f"{n}/n_sharded": r["n_sharded"] for n, r in results.items()},
           **{f"{n}/{k}": v for n, r in results.items() for k, v in r["state"].items()})
  for n, r in results.items():
    print(n, "losses", r["losses"].tolist(), "shard", r["shard_shape"], flush=True)


def errors():
  bad_mesh = ml_collections.ConfigDict(dict(data=3, fsdp=1))
  for label, fn in (("mesh", lambda: sharding.make_mesh(bad_mesh)),
                    ("batch", lambda: sharding.check_batch_size(
                        12, sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1,
                                                                             fsdp=1)))))):
    try:
      fn()
      print(f"{label}: NO ERROR")
    except ValueError as e:
      print(f"{label}: {e}")


def hlo():
  """Bytes all-reduced by a data-parallel least-squares gradient step (w: 8x4, b: 4)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def grad(params, x, y):
    return jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)

  params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
  step = jax.jit(grad, in_shardings=(rep, bat, bat), out_shardings=rep)
  text = step.lower(params, jnp.zeros((16, 8)), jnp.zeros((16, 4))).compile().as_text()
  c = sharding.collective_bytes(text)
  print("all-reduce-bytes", c["all-reduce"]["bytes"], c)


if __name__ == "__main__":
  {"steps": lambda: run_steps(sys.argv[2]), "errors": errors, "hlo": hlo}[sys.argv[1]]()
