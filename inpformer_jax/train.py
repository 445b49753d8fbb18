"""The trainer of every setting: `train_and_evaluate(config, workdir)`.

The five official scripts become one loop (SPEC §6); the settings differ only in config
(`inpformer_jax.settings`). One step (`make_train_step`): forward, soft-mining + coherence
loss, gradients of the TRAINABLE params only (the frozen encoder's params are a separate,
non-donated argument under stop_gradient), clip 0.1 + StableAdamW, all in one jit with
declared shardings and the state donated. With `config.train.cache_features` the encoder's
feature groups and fused input of every training image are computed once and the step
starts after the encoder (`feature_cache`).

Run state: {"params": trainable, "opt_state", "step", "rng"}; checkpointed with the grain
iterator position, so a resumed run continues with the same batches and reproduces the
uninterrupted run's `train_metrics.jsonl`. Each checkpoint is sealed with the run's
fingerprint (`run_fingerprint`), checked on resume. Nothing bad is saved: the loss and the
state are checked finite before each save, and a non-finite loss sets aside the checkpoints
whose state led to it. SIGTERM (preemption, a scheduler's time limit) saves at the next step
boundary and ends the run; running the command again resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from inpformer_jax import checkpoint
from inpformer_jax import evaluate as eval_lib
from inpformer_jax import feature_cache
from inpformer_jax import guards
from inpformer_jax import loading
from inpformer_jax import optim
from inpformer_jax import params as params_lib
from inpformer_jax import reports
from inpformer_jax import settings
from inpformer_jax import sharding
from inpformer_jax.data import datasets
from inpformer_jax.data import pipeline
from inpformer_jax.data import readers
from inpformer_jax.data import validate
from inpformer_jax.losses import inpformer_loss
from inpformer_jax.models import factory
from inpformer_jax.models.inp_former import INPFormer

# ---------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------


def make_state(trainable, tx, seed: int) -> dict:
  return {"params": trainable, "opt_state": tx.init(trainable),
          "step": jnp.zeros([], jnp.int32), "rng": jax.random.PRNGKey(seed)}


def make_train_step(model, tx, schedule, loss_config, *, state_sh, encoder_sh, mesh,
                    cached: bool):
  """-> jitted step(state, encoder_params, batch) -> (state, metrics).

  batch: {"image" (B,S,S,3)} or, cached, the encoder features (`feature_cache.keys`).
  """
  data_sh = sharding.batch_sharding(mesh)

  def loss_fn(trainable, encoder_params, batch, rng):
    variables = {"params": params_lib.merge(jax.lax.stop_gradient(encoder_params), trainable)}
    rngs = {"dropout": rng}  # no dropout in INP-Former; explicit for any that is added.
    if cached:
      out = model.apply(variables, *feature_cache.decode_inputs(batch), rngs=rngs,
                        method=INPFormer.decode)
    else:
      out = model.apply(variables, batch["image"], rngs=rngs)
    return inpformer_loss(out, loss_config.coherence_weight, loss_config.mining_exponent)

  def step(state, encoder_params, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], encoder_params, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"])}
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return jax.jit(step, donate_argnums=(0,), in_shardings=(state_sh, encoder_sh, data_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)))


@dataclasses.dataclass
class Recipe:
  """Everything fixed by (model, encoder, optimiser, seed, image size, steps, mesh), built
  once and handed on explicitly, so that single-class runs (one model per class) trace and
  compile their steps once. `jitted` holds the compiled functions made so far."""
  model: Any
  encoder: Any          # host arrays
  encoder_weights: str  # where they came from (loading.encoder_params)
  trainable: Any        # host arrays, initial
  tx: Any
  schedule: Any
  mesh: Any
  abstract: Any         # abstract run state, with its shardings
  state_sh: Any
  encoder_sh: Any
  jitted: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, config, total_steps: int) -> Recipe:
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple((r, s if isinstance(s, str) else tuple(s)) for r, s in config.mesh.param_rules)
    model = factory.build_model(config.model)
    encoder, weights = loading.encoder_params(config, model)
    trainable = factory.init_trainable(model, jax.random.PRNGKey(config.seed), config.data.crop)
    tx = optim.make_optimizer(config.optim, total_steps)
    schedule = optim.warm_cosine_schedule(config.optim.lr, config.optim.final_lr, total_steps,
                                          config.optim.warmup_steps)
    abstract = jax.eval_shape(functools.partial(make_state, tx=tx, seed=config.seed), trainable)
    state_sh = sharding.param_shardings(abstract, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sh)
    return cls(model, encoder, weights, trainable, tx, schedule, mesh, abstract, state_sh,
               sharding.param_shardings(encoder, mesh, rules))

  def _memo(self, key, make):
    if key not in self.jitted:
      self.jitted[key] = make()
    return self.jitted[key]

  def train_step(self, loss_config, cached: bool):
    return self._memo(("train", loss_config.to_json(), cached), lambda: make_train_step(
        self.model, self.tx, self.schedule, loss_config, state_sh=self.state_sh,
        encoder_sh=self.encoder_sh, mesh=self.mesh, cached=cached))

  def forward(self, config):
    ec = config.eval
    return self._memo(("eval", config.data.crop, settings.map_kind(config), ec.top_ratio),
                      lambda: eval_lib.make_forward(self.model, config, self.mesh))

  def init_state(self, trainable, seed: int):
    init = self._memo(("init", seed), lambda: jax.jit(
        functools.partial(make_state, tx=self.tx, seed=seed), out_shardings=self.state_sh))
    return init(trainable)


class Recipes:
  """The last recipe built, reused while the config fields it depends on stay the same."""

  def __init__(self):
    self._key, self._recipe = None, None

  def get(self, config, total_steps: int) -> Recipe:
    key = (config.model.to_json(), config.optim.to_json(), config.seed, config.data.crop,
           total_steps, config.mesh.to_json(), config.init_from)
    if key != self._key:
      self._key, self._recipe = None, None  # drop the old one first: its encoder is large
      self._recipe, self._key = Recipe.create(config, total_steps), key
    return self._recipe


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train_and_eval", *, recipes: Recipes | None = None
                       ) -> dict | None:
  """Trains (unless mode='eval' or zero-shot), then evaluates (unless mode='train').

  recipes: compiled steps to reuse (tests and sweeps running many configs in one process).
  Returns the report written to WORKDIR/results.json (None when not evaluated, or when
  SIGTERM stopped the training after saving a checkpoint).
  """
  settings.check_config(config, mode)
  recipes = recipes or Recipes()
  workdir = str(Path(workdir).absolute())
  Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (Path(workdir) / checkpoint.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  mode = "eval" if config.setting == "zero_shot" else mode
  # Every data fault of the run, found before any training (all of them in one error).
  splits = validate.validate_run(config, mode)
  try:
    if config.setting == "single_class":
      return _single_class(config, workdir, mode, recipes)
    results, info = _run(config, workdir, mode, recipes, splits)
  except guards.Preempted as stop:
    loading.warn(str(stop))
    return None
  if results is None or jax.process_index() != 0:
    return None
  return _report(results, workdir, info)


def _report(results, workdir, info) -> dict:
  report = reports.write_reports(results, workdir, info)
  print(reports.markdown_table(report), flush=True)
  print(f"reports: {workdir}/results.{{md,json,csv}}, {workdir}/report.html", flush=True)
  return report


def _single_class(config, workdir, mode, recipes):
  """Official Single_Class script: one model per class, seeded anew for each class."""
  results, info = {}, {}
  for spec in datasets.specs(config.data, "train"):
    one = copy.deepcopy(config)
    with one.unlocked():
      one.data.train = one.data.test = spec["name"]
    cats = spec["categories"] or readers.classes_of(datasets.read_split(one.data, "train").samples)
    for cat in cats:
      sub = copy.deepcopy(one)
      with sub.unlocked():
        sub.data.categories[spec["name"]] = cat
      print(f"=== single-class {spec['name']}/{cat} ===", flush=True)
      r, info = _run(sub, os.path.join(workdir, spec["name"], cat), mode, recipes)
      for d, per in (r or {}).items():
        results.setdefault(d, {}).update(per)
  if mode == "train" or jax.process_index() != 0:
    return None
  return _report(results, workdir, dict(info, step="per class (see WORKDIR/<dataset>/<class>/)"))


def _run(config, workdir, mode, recipes, splits=None):
  """Trains and/or evaluates one model. -> (results | None, info).

  splits: the run's data as `validate.validate_run` checked it (None: read here, e.g. one
  class of a single-class run whose whole data was checked).
  """
  if splits is None:
    splits = {w: datasets.read_split(config.data, w) for w in ("train", "test")
              if (w == "train" and mode != "eval") or (w == "test" and mode != "train")}
  test = splits.get("test")
  total_steps, source = config.train.total_steps or 1, None
  # Before the model is built: a batch the devices cannot split is known from the config.
  mesh = sharding.make_mesh(config.mesh)
  if mode != "eval":
    sharding.check_batch_size(config.train.batch_size, mesh)
  if mode != "train":
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  if mode != "eval":
    source = datasets.training_source(config, splits["train"])
    spe = pipeline.steps_per_epoch(len(source), config.train.batch_size)
    total_steps = config.train.total_steps or config.train.epochs * spe
  r = recipes.get(config, total_steps)
  info = {"setting": config.setting, "protocol": config.eval.protocol,
          "gt_threshold": config.eval.gt_threshold, "map": settings.map_kind(config),
          "encoder": config.model.encoder, "encoder_weights": r.encoder_weights,
          "image_size": f"{config.data.resize}->{config.data.crop}"}
  if config.init_from:
    info["init_from"] = str(config.init_from)
  if source is not None:
    info["train_images"] = len(source)
  if r.encoder_weights == loading.RANDOM:
    loading.warn("NOTE: the encoder has RANDOM weights (config.model.encoder_weights="
                 "'random'); the metrics show the pipeline works, not what INP-Former achieves.")
    loading.keep_random_encoder(workdir, r.encoder, config)
  with jax.set_mesh(r.mesh):
    encoder = jax.device_put(r.encoder, r.encoder_sh)
    if mode == "eval":
      trained, info["step"] = _trained_for_eval(config, workdir, r)
    else:
      state = _train(config, workdir, r, encoder, source, total_steps)
      trained, info["step"] = state["params"], int(jax.device_get(state["step"]))
    if mode == "train":
      return None, info
    results = eval_lib.evaluate(r.model, params_lib.merge(encoder, trained), test.samples,
                                config, r.mesh, workdir=workdir, forward=r.forward(config),
                                source=test.source)
  return results, info


def _trained_for_eval(config, workdir, r: Recipe):
  """--mode eval: the workdir's newest step, else config.init_from's params."""
  state, step = loading.trained_state(workdir, r.abstract, required=False)
  if state is not None:
    return state["params"], int(step)
  if not config.init_from:
    raise settings.ConfigError(f"--mode=eval: {workdir} has no checkpoint; train first or pass "
                               "--config.init_from=WORKDIR_OR_PARAMS_DIR")
  trainable, step = loading.init_trainable_from(config.init_from, r.trainable, r.abstract)
  return trainable, step or 0


def _train(config, workdir, r: Recipe, encoder, source, total_steps):
  mesh, tc = r.mesh, config.train
  bs = tc.batch_size

  # Data: images through grain, or (cache) this process's shards' rows (`feature_cache`).
  cache, cache_on_device = None, False
  if tc.cache_features:
    cache, cache_on_device = feature_cache.build_feature_cache(
        r.model, params_lib.merge(encoder, r.trainable), source, config, mesh, workdir)
    data = feature_cache.index_stream(len(source), bs, config.seed,
                                      feature_cache.num_shards(config))
  else:
    data = pipeline.train_dataset(source=source, resize=config.data.resize,
                                  crop=config.data.crop, global_batch_size=bs, seed=config.seed,
                                  num_workers=config.data.num_workers)
  data_iter = iter(data)

  # State: restored (own workdir, then config.resume), else initialised (config.init_from).
  fingerprint = guards.run_fingerprint(config, source, total_steps, r.encoder_weights)
  ck = checkpoint.TrainCheckpointer(workdir, max_to_keep=tc.max_to_keep,
                                    save_interval_steps=tc.checkpoint_every_steps,
                                    fingerprint=fingerprint)
  check = guards.resume_check(fingerprint, tc.allow_resume_changes, loading.warn)
  try:
    state, start = ck.restore(r.abstract, data_iter, log=loading.warn, set_aside=True,
                              check=check)
    resumed_from = ck if state is not None else None
    if state is None and config.resume:
      other = checkpoint.TrainCheckpointer(config.resume)
      try:
        state, start = other.restore(r.abstract, data_iter, log=loading.warn, check=check)
      finally:
        other.close()
      if state is None:
        raise settings.ConfigError(f"config.resume={config.resume}: no readable checkpoint there")
      resumed_from = other
    if state is None:
      if list(ck.directory.glob(f"*{checkpoint.DIVERGED}")):
        loading.warn(f"NOTE: {ck.directory} holds only checkpoints set aside after a divergence;"
                     " starting from step 0.")
      trainable = r.trainable
      if config.init_from:
        trainable, _ = loading.init_trainable_from(config.init_from, trainable, r.abstract)
      state, start = r.init_state(trainable, config.seed), 0
    else:
      print(f"resumed from {resumed_from.directory.parent} at step {start}", flush=True)
    return _loop(config, workdir, r, encoder, state, int(start), total_steps, ck, data_iter,
                 cache, cache_on_device)
  finally:
    ck.close()


def _loop(config, workdir, r, encoder, state, start, total_steps, ck, data_iter, cache,
          cache_on_device):
  mesh, tc = r.mesh, config.train
  pi = jax.process_index()
  log = reports.TrainLog(workdir, resume_step=start if start else None)
  step_fn = r.train_step(config.loss, cached=cache is not None)
  if cache_on_device:  # rows of the device-resident cache -> a batch-sharded feature batch
    gather = jax.jit(lambda c, i: {k: jnp.take(v, i, axis=0) for k, v in c.items()},
                     out_shardings=sharding.batch_sharding(mesh))
  pending: list[dict] = []
  t_last, n_last = time.time(), 0
  bar = tqdm.tqdm(total=total_steps, initial=start, desc="train", unit="step",
                  disable=pi != 0, dynamic_ncols=True)
  step = start
  with guards.Preemption() as preemption:
    try:
      while step < total_steps:
        # Between logging points nothing waits for the device: the step is dispatched and
        # the next batch is read, copied and dispatched while the device still computes this
        # one (one step of device prefetch; the grain iterator's position is then exactly the
        # steps taken, what a checkpoint saves). An implicit device->host read here would be
        # a hidden sync, so it is an error (on accelerators: JAX's guard does not see reads of
        # CPU arrays, which are host memory already).
        with jax.transfer_guard_device_to_host("disallow"):
          local = next(data_iter)
          if cache is None:
            batch = sharding.global_batch({"image": local["image"]}, mesh)
          else:
            row = np.asarray(local["row"])  # this process's rows of the global batch
            if cache_on_device:
              batch = gather(cache, sharding.global_batch({"row": row}, mesh)["row"])
            else:
              batch = sharding.global_batch({k: np.asarray(v[row]) for k, v in cache.items()},
                                            mesh)
          # Everything the step gets is already on device; an implicit host->device copy
          # here would be a hidden per-step transfer, so it is an error.
          with jax.transfer_guard_host_to_device("disallow"):
            state, metrics = step_fn(state, encoder, batch)
          pending.append(metrics)
          step += 1
          n_last += tc.batch_size
          bar.update(1)
          preempted = preemption.reached(step)
        is_ckpt = step % tc.checkpoint_every_steps == 0 or step == total_steps or preempted
        if step % tc.log_every_steps == 0 or is_ckpt:
          rows = jax.device_get(pending)
          pending = []
          losses, bad = guards.finite_rows(rows)
          if bad is not None:
            first = step - len(rows) + bad + 1
            raise guards.diverged(ck, first, "non-finite loss", bad_state=first - 1)
          dt = time.time() - t_last
          row = {"step": step, **{k: float(np.mean([m[k] for m in rows]))
                                  for k in ("loss", "reconstruction", "coherence", "grad_norm")},
                 "lr": float(rows[-1]["lr"]), "images_per_sec": n_last / max(dt, 1e-9)}
          log.write(row)
          bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_sec']:.1f}")
          t_last, n_last = time.time(), 0
        if is_ckpt:
          if not bool(guards.all_finite(state)):
            raise guards.diverged(ck, step, "non-finite parameters or optimiser state",
                                  bad_state=step)
          ck.save(step, state, data_iter, force=step == total_steps or preempted,
                  metrics={"loss": float(losses[-1])})
        if preempted:
          ck.wait_until_finished()
          raise guards.Preempted(step, ck.directory)
    finally:
      bar.close()
  ck.wait_until_finished()
  return state
