"""Plan before compute: each run's config, steps, images read, and time on these devices.

The time estimate comes from a MEASURED step rate: a few real train steps of the run's model
(its encoder with random weights: the speed does not depend on the weights), batch and image
size on the current devices, once per distinct (model, size, batch, devices), cached in
WORKDIR/step_rates.json (a second dry run is instant) or read from a --rates file of that
shape. Evaluation is not measured: it is estimated as half a train step per test batch
(a forward pass, no backward), which leaves out the metrics' own CPU time.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from inpformer_jax import errors
from inpformer_jax import sharding
from inpformer_jax import train
from inpformer_jax.data import datasets
from inpformer_jax.data import fewshot
from inpformer_jax.reproduce.tables import Run

RATES_FILE = "step_rates.json"
MEASURED_STEPS = 3  # timed steps after one compile step
EVAL_STEP_FRACTION = 0.5  # a test batch's forward, relative to a train step (not measured)

# The datasets' image counts when their roots are not on this machine (with the data present
# the plan counts the files). MVTec AD: Bergmann et al., CVPR 2019 (3,629 train / 1,725
# test); VisA: Zou et al., ECCV 2022, the spot-diff `1cls` split (8,659 / 2,162); per class,
# as the readers list them. Real-IAD: Wang et al., CVPR 2024, realiad_jsons (36,465 train /
# 114,585 test of its 151,050 images, as quoted by MambaAD/Dinomaly; not checked here against
# the files), split evenly over its 30 classes for single-class steps (marked approximate).
MVTEC_TRAIN = dict(bottle=209, cable=224, capsule=219, carpet=280, grid=264, hazelnut=391,
                   leather=245, metal_nut=220, pill=267, screw=320, tile=230, toothbrush=60,
                   transistor=213, wood=247, zipper=240)
MVTEC_TEST = dict(bottle=83, cable=150, capsule=132, carpet=117, grid=78, hazelnut=110,
                  leather=124, metal_nut=115, pill=167, screw=160, tile=117, toothbrush=42,
                  transistor=100, wood=79, zipper=151)
VISA_TRAIN = dict(candle=900, capsules=542, cashew=450, chewinggum=453, fryum=450,
                  macaroni1=900, macaroni2=900, pcb1=904, pcb2=901, pcb3=905, pcb4=904,
                  pipe_fryum=450)
VISA_TEST = dict(candle=200, capsules=160, cashew=150, chewinggum=150, fryum=150, macaroni1=200,
                 macaroni2=200, pcb1=200, pcb2=200, pcb3=201, pcb4=201, pipe_fryum=150)
REALIAD_TRAIN, REALIAD_TEST, REALIAD_CLASSES = 36465, 114585, 30
# The authors' figure: the MVTec multi-class recipe (45,200 steps, batch 16, ViT-B/14 at
# 392 px) takes about 3.5 h on one RTX 4090. Scaled by steps, tokens and encoder size.
PAPER_SECONDS_PER_STEP = 3.5 * 3600 / 45200
_VIT_PARAMS_M = {"small": 22.1, "base": 86.6, "large": 304.4}


class PlanError(errors.UserError, ValueError):
  """An override or rates file the plan cannot use; names the flag or file and the fix."""


@dataclasses.dataclass
class Planned:
  run: Run
  config: ml_collections.ConfigDict
  steps: int
  train_images: int
  test_images: int
  counted: str  # 'files' (counted under the roots) or 'known sizes' (the constants above)
  rate_key: str
  seconds: float | None = None  # estimated on these devices (None: no rate)


def run_config(run: Run, overrides=(), *, runlocal: bool = False) -> ml_collections.ConfigDict:
  """The run's config: configs/<file>.py:get_config(setting=...), the run's encoder and image
  size (kept tiny with runlocal), then the overrides ('field=value'), locked."""
  file = "super_multi_class" if run.setting == "super_multi_class" else run.datasets[0]
  arg = [] if run.setting == "super_multi_class" else [f"setting={run.setting}"]
  if run.shots:
    arg.append(f"shots={run.shots}")
  if run.source:
    arg.append(f"source={run.source}")
  if runlocal:
    arg.append("runlocal")
  config = importlib.import_module(f"configs.{file}").get_config(",".join(arg))
  if not runlocal:
    config.model.encoder = run.encoder
    config.data.resize, config.data.crop = run.resize, run.crop
  for item in overrides:
    _override(config, item)
  config.lock()
  return config


def _override(config, item: str) -> None:
  field, sep, text = item.partition("=")
  if not sep:
    raise PlanError(f"--config_overrides {item!r}: expected FIELD=VALUE, e.g. "
                    "data.roots.mvtec=/data/mvtec_anomaly_detection")
  *path, last = field.strip().split(".")
  node = config
  for part in path:
    if part not in node:
      raise PlanError(f"--config_overrides {field}: no field {part!r}")
    node = node[part]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(node.get(last), str) or path[-2:] == ["data", "roots"]:
    value = text
  try:
    node[last] = value
  except (TypeError, KeyError, AttributeError) as e:
    raise PlanError(f"--config_overrides {item!r}: {e}") from None


def counts(config) -> tuple[dict, dict, str]:
  """({(dataset, class): train images}, {(dataset, class): test images}, how counted)."""
  names = {n.strip() for w in ("train", "test") for n in config.data[w].split(",")}
  if all(os.path.isdir(config.data.roots[n]) for n in names):
    per = []
    for which in ("train", "test"):
      samples = datasets.read_split(config.data, which).samples
      c = {}
      for s in samples:
        c[(s.dataset, s.category)] = c.get((s.dataset, s.category), 0) + 1
      per.append(c)
    return per[0], per[1], "files"
  known = {"mvtec": (MVTEC_TRAIN, MVTEC_TEST), "visa": (VISA_TRAIN, VISA_TEST),
           "realiad": tuple({f"class{i}": n / REALIAD_CLASSES for i in range(REALIAD_CLASSES)}
                            for n in (REALIAD_TRAIN, REALIAD_TEST))}
  out = []
  for which in ("train", "test"):
    c = {}
    for n in config.data[which].split(","):
      n = n.strip()
      if n not in known:
        raise PlanError(f"dataset {n!r}: its root {config.data.roots[n]} is not here and its "
                        f"size is not known; pass --config_overrides data.roots.{n}=PATH")
      c.update({(n, k): v for k, v in known[n][which == "test"].items()})
    out.append(c)
  return out[0], out[1], "known sizes"


def steps_of(config, train_counts: dict) -> tuple[int, int]:
  """(optimizer steps, training images) of a run, as the trainer counts them."""
  tc, bs = config.train, config.train.batch_size
  if config.setting == "zero_shot":
    return 0, 0
  if config.setting == "single_class":
    per = [int(n) for n in train_counts.values()]
    return sum(tc.total_steps or tc.epochs * (n // bs) for n in per), sum(per)
  n = int(sum(train_counts.values()))
  if config.setting == "few_shot":
    n = config.few_shot.shots * len(train_counts) * (
        fewshot.NUM_AUGMENTED if config.few_shot.augment else 1)
  return tc.total_steps or tc.epochs * (n // bs), n


def rate_key(config) -> str:
  m = config.model
  shape = f"{m.width}x{m.depth}" if m.encoder == "custom" else ""
  devices = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
  return (f"{m.encoder}{shape} {m.dtype} crop {config.data.crop} batch "
          f"{config.train.batch_size} on {devices}")


def plan(runs: list[Run], overrides=(), *, runlocal: bool = False) -> list[Planned]:
  out = []
  for run in runs:
    config = run_config(run, overrides, runlocal=runlocal)
    train_counts, test_counts, how = counts(config)
    steps, n_train = steps_of(config, train_counts)
    out.append(Planned(run, config, steps, round(n_train), round(sum(test_counts.values())),
                       how, rate_key(config)))
  return out


def read_rates(path: str | Path) -> dict:
  path = Path(path)
  if not path.exists():
    return {}
  try:
    rates = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PlanError(f"{path}: not a rates file ({e}); delete it or fix it") from None
  if not all(isinstance(v, dict) and "steps_per_sec" in v for v in rates.values()):
    raise PlanError(f"{path}: each entry needs steps_per_sec (the layout {RATES_FILE} has)")
  return rates


def measure_rate(config, steps: int = MEASURED_STEPS, *, total_steps: int = 0,
                 recipes: train.Recipes | None = None) -> dict:
  """Steps per second of the run's uncached train step: one compile step, then `steps`.

  total_steps: the run's (its schedule; the speed does not depend on it); recipes: compiled
  steps to reuse, as `run.execute`'s (a harness measuring in the process that trained)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.encoder_weights = "random"
  r = (recipes or train.Recipes()).get(
      config, max(total_steps, steps + 1, config.optim.warmup_steps + 1))
  bs, crop = config.train.batch_size, config.data.crop
  with jax.set_mesh(r.mesh):
    encoder = jax.device_put(r.encoder, r.encoder_sh)
    state = r.init_state(r.trainable, config.seed)
    step = r.train_step(config.loss, cached=False)
    images = np.random.default_rng(0).normal(size=(bs, crop, crop, 3)).astype(np.float32)
    batch = sharding.global_batch({"image": images}, r.mesh)
    t0 = time.perf_counter()
    state, m = step(state, encoder, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, encoder, batch)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
  return {"steps_per_sec": steps / dt, "measured_steps": steps, "first_step_s": compile_s,
          "what": f"{steps} train steps of random data after one compile step"}


def estimate(planned: list[Planned], workdir: str | Path, *, rates_file: str | None = None,
             measure_steps: int = MEASURED_STEPS, recipes: train.Recipes | None = None,
             log=print) -> dict:
  """Fills each run's seconds from its rate; rates measured here are added to the cache as
  each is measured (an interrupted dry run keeps them). measure_steps=0: no measuring, the
  cached or given rates only. The cheapest models are measured first."""
  cache = Path(workdir) / RATES_FILE
  rates = read_rates(rates_file) if rates_file else read_rates(cache)
  for p in sorted(planned, key=_cost):
    if p.rate_key not in rates and not rates_file and measure_steps > 0:
      log(f"measuring: {p.rate_key} ...")
      rates[p.rate_key] = measure_rate(p.config, measure_steps, total_steps=p.steps,
                                       recipes=recipes)
      cache.parent.mkdir(parents=True, exist_ok=True)
      cache.write_text(json.dumps(rates, indent=1))
    rate = rates.get(p.rate_key, {}).get("steps_per_sec")
    if rate:
      eval_batches = -(-p.test_images // p.config.eval.batch_size)
      p.seconds = (p.steps + EVAL_STEP_FRACTION * eval_batches) / rate
  return rates


def _cost(p: Planned) -> float:
  """A train step's relative cost (tokens x encoder size): the order of measuring."""
  size = p.run.encoder.split("_vit_")[-1].split("_")[0]
  return p.run.crop ** 2 * _VIT_PARAMS_M.get(size, _VIT_PARAMS_M["base"])


def paper_gpu_hours(p: Planned) -> float:
  """The authors' RTX 4090 figure scaled to this run (steps x tokens x encoder size)."""
  size = p.run.encoder.split("_vit_")[-1].split("_")[0]
  scale = (p.run.crop / 392) ** 2 * _VIT_PARAMS_M.get(size, _VIT_PARAMS_M["base"]) / 86.6
  return p.steps * PAPER_SECONDS_PER_STEP * scale * p.config.train.batch_size / 16 / 3600


def describe(planned: list[Planned], rates: dict, tables: list[str]) -> str:
  """The dry run's text: one line per run, what was measured, and the total."""
  lines = [f"{'run':56s} {'steps':>8s} {'train img':>9s} {'test img':>8s} "
           f"{'here':>8s} {'4090*':>7s}"]
  for p in planned:
    here = "?" if p.seconds is None else _hours(p.seconds)
    lines.append(f"{p.run.key:56s} {p.steps:8d} {p.train_images:9d} {p.test_images:8d} "
                 f"{here:>8s} {paper_gpu_hours(p):6.1f}h")
  known = [p.seconds for p in planned if p.seconds is not None]
  lines.append("")
  for key in sorted({p.rate_key for p in planned}):
    r = rates.get(key)
    what = (f"{r['steps_per_sec']:.3g} steps/s ({r.get('what', 'from file')})" if r
            else "none (not measured, not in --rates)")
    lines.append(f"rate {key}: {what}")
  how = sorted({p.counted for p in planned})
  lines.append(f"images: from {' and '.join(how)}; eval estimated as {EVAL_STEP_FRACTION} train "
               "step per test batch; 4090* = the authors' 3.5 h for 45,200 MVTec steps, scaled")
  total = _hours(sum(known)) if known else "?"
  missing = ("" if len(known) == len(planned)
             else f" ({len(planned) - len(known)} runs without a rate)")
  which = f"{tables[0]}-{tables[-1]}" if len(tables) > 3 else ",".join(tables)
  lines.append(f"all of {which} on this machine: {total}{missing}, "
               f"{len(planned)} runs; on one RTX 4090 about "
               f"{sum(paper_gpu_hours(p) for p in planned):.0f} h")
  return "\n".join(lines)


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.1f}h" if seconds >= 360 else f"{seconds:.0f}s"
