r"""Anomaly scores, maps, overlays and pass/fail decisions for new images.

  python -m inpformer_jax.predict --checkpoint demo_workdir \
      --input demo_data/brick/test --output predictions/

--checkpoint is a training workdir of ours (its latest checkpoint + config.json), a converted
params dir (`weights_conversion/convert_inpformer.py`) or an official `model.pth`.
Images go through exactly the evaluation preprocessing (PIL resize -> centre crop -> ImageNet
normalisation, sizes from the checkpoint's config), in fixed-shape batches (the last one is
padded, so there is one compilation). Per image OUTPUT gets:
  maps/<relative path>.npy          float32 (256, 256) smoothed anomaly map, or
  maps/<relative path>.png          16-bit PNG: map = png * map_scale / 65535 (map_scale in the CSV)
  overlays/<relative path>.png      the map (jet) over the centre-cropped input image
plus predictions.csv and predictions.jsonl (path, score, decision, map file, map_scale, ...).
The decision is "anomalous" when score > threshold; the threshold is --threshold FLOAT, or
(--threshold auto, the default) the image threshold of the checkpoint's calibration.json
(`python -m inpformer_jax.calibrate`); without one no decision is written.

Exit status: 0 all images processed; 2 some inputs could not be read (each is named on stderr
and in predictions.jsonl with an "error"; the others are processed); 1 a usage error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import functools
import glob
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inpformer_jax import calibration as calib_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CALIBRATION_FILE = "calibration.json"
# Official sizes (SPEC §6.1) for checkpoints that carry no config.
OFFICIAL_RESIZE, OFFICIAL_CROP = 448, 392


class CheckpointError(ValueError):
  """A --checkpoint that cannot be used (the message names the path and the fix)."""


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------


def load_for_inference(path: str | os.PathLike, *, image_size: int | None = None,
                       resize: int | None = None):
  """A checkpoint -> (model, params, info).

  path: (a) a training workdir (WORKDIR/config.json + WORKDIR/ckpt/<step>/): the trainable
  params of the newest step, the frozen encoder rebuilt as the trainer builds it (from
  config.model.encoder_weights, or config.init_from's params dir, or -- weights 'random' --
  the seeded init); (b) a converted params dir; (c) an official model.pth.
  image_size / resize override the crop / resize sizes (default: the config's, or the
  official 448 -> 392 for (b) and (c)).

  info: {"kind", "path", "checkpoint_id", "step", "resize", "image_size", "map_kind",
  "top_ratio", "calibration_path"}.
  """
  p = Path(path).absolute()
  if not p.exists():
    raise CheckpointError(f"--checkpoint {p} does not exist")
  if p.is_dir() and (p / "config.json").is_file() and (p / "ckpt").is_dir():
    return _load_workdir(p, image_size=image_size, resize=resize)
  if p.is_dir() and (p / "ckpt").is_dir():
    raise CheckpointError(f"{p} has ckpt/ but no config.json; it is not a complete training "
                          "workdir (config.json is written when training starts)")
  if p.is_dir() and not (p / "meta.json").is_file():
    subs = sorted(q.parent.relative_to(p) for q in p.glob("*/*/config.json"))
    hint = (f" (single-class runs keep one workdir per class, e.g. {p / subs[0]})"
            if subs else "")
    raise CheckpointError(f"{p} is neither a training workdir (config.json + ckpt/) nor a "
                          f"converted params dir (meta.json + params/){hint}")
  import inpformer_jax  # pylint: disable=g-import-not-at-top
  crop = image_size or OFFICIAL_CROP
  model, params = inpformer_jax.load_official_checkpoint(p, image_size=crop)
  stat = p.stat() if p.is_file() else (p / "meta.json").stat()
  info = {
      "kind": "params_dir" if p.is_dir() else "pth", "path": str(p), "step": None,
      "checkpoint_id": _short_hash(f"{p}|{stat.st_size}|{stat.st_mtime_ns}"),
      "resize": resize or (OFFICIAL_RESIZE if crop == OFFICIAL_CROP else _resize_for(crop)),
      "image_size": crop, "map_kind": "reconstruction", "top_ratio": 0.01,
      "calibration_path": str(calibration_path(p)),
  }
  return model, params, info


def _resize_for(crop: int) -> int:
  # The official ratio 448 / 392 = 8 / 7, for a --image-size without --resize.
  return int(round(crop * OFFICIAL_RESIZE / OFFICIAL_CROP))


def _short_hash(s: str) -> str:
  return hashlib.sha1(s.encode()).hexdigest()[:12]


def _load_workdir(p: Path, *, image_size, resize):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from inpformer_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from inpformer_jax.models import factory  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(json.loads((p / "config.json").read_text()))
  if image_size and image_size != config.data.crop:
    raise CheckpointError(f"--image-size {image_size}: the model in {p} was trained at "
                          f"{config.data.crop}; drop --image-size for a training workdir")
  model = factory.build_model(config.model)
  crop = config.data.crop
  abstract_trainable = jax.eval_shape(
      lambda: factory.init_trainable(model, jax.random.PRNGKey(0), crop))
  init_from = config.get("init_from", None)
  mngr = ocp.CheckpointManager(p / ckpt_lib.CKPT_SUBDIR)
  step = None
  try:
    for s in sorted(mngr.all_steps(), reverse=True):
      try:
        # No target: restored as saved (params, opt_state, step, rng); only params are used.
        restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except Exception as e:  # pylint: disable=broad-except
        print(f"WARNING: checkpoint {p}/ckpt/{s} does not read back ({type(e).__name__}: "
              f"{str(e)[:200]}); trying the previous one", file=sys.stderr)
        continue
      trainable, step = jax.device_get(restored["state"]["params"]), s
      break
  finally:
    mngr.close()
  if step is None:
    if config.setting == "zero_shot" and init_from:
      return load_for_inference(init_from, image_size=config.data.crop,
                                resize=config.data.resize)
    raise CheckpointError(f"{p}/ckpt holds no readable checkpoint; train first "
                          "(python -m inpformer_jax.main --workdir ...)")
  factory.check_same_structure(abstract_trainable, trainable, "trainable")
  encoder = _workdir_encoder(p, config, model)
  info = {
      "kind": "workdir", "path": str(p), "step": int(step),
      "checkpoint_id": _short_hash(f"{p}|step={step}"),
      "resize": resize or config.data.resize, "image_size": config.data.crop,
      "map_kind": config.eval.map, "top_ratio": config.eval.top_ratio,
      "calibration_path": str(calibration_path(p)),
  }
  return model, factory.merge_params(encoder, trainable), info


def _workdir_encoder(p: Path, config, model):
  """The frozen encoder of a run (the checkpoint holds only the trainable params).

  Resolved as the trainer resolves it: WORKDIR/encoder/ (a params dir, if the trainer saved
  one), config.init_from's params dir when it carries an encoder, config.model.encoder_weights
  (a name / file / params dir), and for 'random' the seeded init of factory.init_params --
  reproducible only with the code version and seed that trained the run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from inpformer_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from inpformer_jax.models import factory  # pylint: disable=g-import-not-at-top
  crop = config.data.crop
  expected = jax.eval_shape(lambda: model.encoder.init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, crop, crop, 3)),
      layers=tuple(model.target_layers)))["params"]
  init_from = config.get("init_from", None)
  if (p / "encoder" / ckpt_lib.META_FILE).is_file():
    loaded, _ = ckpt_lib.load_params(p / "encoder")
    encoder = loaded.get("encoder", loaded)
  elif (init_from and ckpt_lib.find_params(init_from) == "params_dir"
        and "encoder" in ckpt_lib.load_params(init_from)[0]):
    encoder = ckpt_lib.load_params(init_from)[0]["encoder"]
  elif config.model.get("encoder_weights", None) == "random":
    print(f"NOTE: {p} was trained with a RANDOM encoder; it is rebuilt from seed "
          f"{config.seed} (valid for the code version that trained it)", file=sys.stderr)
    params = factory.init_params(model, config.model, jax.random.PRNGKey(config.seed), crop)
    return factory.split_params(params)[0]
  else:
    encoder = factory.load_encoder_params(config.model)
  # Unused entries (official checkpoints carry blocks the model never runs) are dropped.
  encoder = _take_like(expected, encoder)
  factory.check_same_structure(expected, encoder, "encoder")
  return encoder


def _take_like(expected, got):
  if isinstance(expected, dict):
    return {k: _take_like(v, got[k]) for k, v in expected.items() if k in got}
  return np.asarray(got, expected.dtype)


def calibration_path(checkpoint: str | os.PathLike) -> Path:
  """Where calibration.json lives: inside a workdir / params dir; beside a .pth file
  (<file>.calibration.json)."""
  p = Path(checkpoint).absolute()
  return p / CALIBRATION_FILE if p.is_dir() else p.with_name(p.name + "." + CALIBRATION_FILE)


def read_calibration(info: dict, path: str | os.PathLike | None = None) -> dict | None:
  """The checkpoint's calibration (None if there is none); warns if made for another model."""
  p = Path(path or info["calibration_path"])
  if not p.is_file():
    return None
  cal = json.loads(p.read_text())
  if cal.get("checkpoint_id") != info["checkpoint_id"]:
    print(f"WARNING: {p} was made for checkpoint {cal.get('checkpoint_id')}, this is "
          f"{info['checkpoint_id']} (retrained?); re-run python -m inpformer_jax.calibrate",
          file=sys.stderr)
  for key in ("image_size", "map_kind", "top_ratio"):
    if key in cal and cal[key] != info[key]:
      print(f"WARNING: {p} was made with {key}={cal[key]}, predicting with {info[key]}",
            file=sys.stderr)
  return cal


# ---------------------------------------------------------------------------------------
# The jitted forward: images -> (maps, scores).
# ---------------------------------------------------------------------------------------


def forward(model, params, images, *, image_size: int, map_kind: str = "reconstruction",
            top_ratio: float = 0.01):
  """Pure: images (B, S, S, 3) normalised -> (maps (B, 256, 256), scores (B,)); the same
  computation as evaluation (`evaluate.maps_and_scores`); export.py serialises it."""
  from inpformer_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.maps_and_scores(model, params, images, image_size=image_size,
                                  map_kind=map_kind, top_ratio=top_ratio)


@functools.lru_cache(maxsize=8)
def jitted_forward(model, image_size: int, map_kind: str, top_ratio: float):
  """One jitted `forward` per (model, settings): equal models (flax modules compare by their
  fields) share it, so calibrate + predict in one process compile once per batch shape."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(functools.partial(forward, model, image_size=image_size, map_kind=map_kind,
                                   top_ratio=top_ratio))


class Predictor:
  """Fixed-batch jitted inference: `predictor(images (n <= batch, S, S, 3))` -> (maps, scores).

  A short batch is zero-padded to `batch_size` so every call reuses one compiled program.
  """

  def __init__(self, model, params, *, image_size: int, batch_size: int = 8,
               map_kind: str = "reconstruction", top_ratio: float = 0.01):
    import jax  # pylint: disable=g-import-not-at-top
    self.batch_size, self.image_size = batch_size, image_size
    self.params = jax.device_put(params)
    self._fn = jitted_forward(model, image_size, map_kind, top_ratio)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(images)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"got {n} images for a batch of {self.batch_size}")
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad])
    maps, scores = self._fn(self.params, images)
    return np.asarray(maps)[:n], np.asarray(scores)[:n]

  def compilations(self) -> int:
    """How many programs the (shared) jitted forward holds: one per batch shape used."""
    return self._fn._cache_size()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------
# Inputs and outputs.
# ---------------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
  """Files, folders (recursively, image extensions only) and globs -> (files, unmatched).

  Explicit file arguments are kept whatever their extension (a bad one is reported later).
  """
  files, unmatched = [], []
  for pat in patterns:
    if os.path.isdir(pat):
      found = sorted(str(q) for q in Path(pat).rglob("*")
                     if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
    elif os.path.isfile(pat):
      found = [pat]
    else:
      found = sorted(q for q in glob.glob(pat, recursive=True) if os.path.isfile(q))
    if not found:
      unmatched.append(pat)
    files.extend(found)
  return list(dict.fromkeys(os.path.abspath(f) for f in files)), unmatched


def relative_names(files: Sequence[str]) -> list[str]:
  """Paths relative to their common folder (keeps test/good/000 and test/crack/000 apart)."""
  if not files:
    return []
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return [os.path.relpath(f, root) for f in files]


def jet(x: np.ndarray) -> np.ndarray:
  """x in [0, 1] (H, W) -> uint8 RGB (H, W, 3), matplotlib's 'jet' (piecewise linear)."""
  x = np.clip(x, 0.0, 1.0)
  r = np.clip(np.minimum(4 * x - 1.5, -4 * x + 4.5), 0, 1)
  g = np.clip(np.minimum(4 * x - 0.5, -4 * x + 3.5), 0, 1)
  b = np.clip(np.minimum(4 * x + 0.5, -4 * x + 2.5), 0, 1)
  return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5) -> np.ndarray:
  """Normalised input (S, S, 3) + map (256, 256) -> uint8 RGB (S, S, 3): the map resized
  (PIL bilinear) onto the centre-cropped input and blended with jet colours."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from inpformer_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD  # pylint: disable=g-import-not-at-top
  s = image.shape[0]
  rgb = np.clip(image * IMAGENET_STD + IMAGENET_MEAN, 0, 1) * 255
  m = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
      (s, s), Image.Resampling.BILINEAR))
  colours = jet((m - vmin) / max(vmax - vmin, 1e-12)).astype(np.float32)
  return (rgb * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def save_map(amap: np.ndarray, path_stem: Path, fmt: str) -> tuple[str, float | None]:
  """-> (file written, map_scale) ; png16: map = png * map_scale / 65535."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path_stem.parent.mkdir(parents=True, exist_ok=True)
  if fmt == "npy":
    path = path_stem.with_suffix(".npy")
    np.save(path, amap.astype(np.float32))
    return str(path), None
  scale = float(max(amap.max(), 0.0)) or 1.0
  q = np.round(np.clip(amap / scale, 0, 1) * 65535).astype(np.uint16)
  path = path_stem.with_suffix(".png")
  Image.fromarray(q).save(path)  # uint16 -> mode I;16
  return str(path), scale


def read_png16_map(path: str | os.PathLike, map_scale: float) -> np.ndarray:
  """Inverse of the png16 format: float32 map (quantisation error <= map_scale / 131070)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(path), np.float32) * np.float32(map_scale / 65535)


def _load(path: str, resize: int, crop: int):
  from inpformer_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  try:
    return preprocess.load_image(path, resize, crop), None
  except (preprocess.ImageReadError, OSError, ValueError) as e:
    return None, str(e)


def load_batches(files: Sequence[str], size: int, resize: int, crop: int, workers: int = 4
             ) -> Iterable[list[tuple[int, Any, str | None]]]:
  """Decoded in a thread pool (PIL releases the GIL), one batch ahead of the device."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(_load, f, resize, crop) for f in files]
    batch = []
    for i, fut in enumerate(futures):
      img, err = fut.result()
      batch.append((i, img, err))
      if sum(1 for _, im, _ in batch if im is not None) == size:
        yield batch
        batch = []
    if batch:
      yield batch


def predict(checkpoint: str, inputs: Sequence[str], output: str, *, batch_size: int = 8,
            image_size: int | None = None, resize: int | None = None,
            threshold: str | float = "auto", map_format: str = "npy",
            zero_shot: bool = False, overlays: bool = True, calibration: str | None = None,
            progress: bool = True) -> dict:
  """Runs the CLI's work; -> {"rows": [...], "failed": [(path, error)], "info": ...}."""
  import tqdm  # pylint: disable=g-import-not-at-top

  if map_format not in ("npy", "png16"):
    raise ValueError(f"--map-format {map_format!r}: npy or png16")
  files, unmatched = expand_inputs(inputs)
  failed = [(u, "no such file, folder or matching glob") for u in unmatched]
  model, params, info = load_for_inference(checkpoint, image_size=image_size, resize=resize)
  if zero_shot:
    info["map_kind"] = "inp_distance"
  cal = read_calibration(info, calibration)
  thr = _resolve_threshold(threshold, cal, info)
  out = Path(output)
  out.mkdir(parents=True, exist_ok=True)
  names = dict(zip(files, relative_names(files)))
  crop = info["image_size"]
  predictor = Predictor(model, params, image_size=crop, batch_size=batch_size,
                        map_kind=info["map_kind"], top_ratio=info["top_ratio"])
  norm = (cal or {}).get("normalization")
  pix = (cal or {}).get("pixel") or {}
  rows = []
  bar = tqdm.tqdm(total=len(files), desc="predict", unit="img", disable=not progress,
                  dynamic_ncols=True)
  for batch in load_batches(files, batch_size, info["resize"], crop):
    ok = [(i, im) for i, im, err in batch if im is not None]
    for i, _, err in batch:
      if err is not None:
        failed.append((files[i], err))
        print(f"ERROR: {files[i]}: {err}", file=sys.stderr)
    if ok:
      images = np.stack([im for _, im in ok])
      maps, scores = predictor(images)
      for (i, im), amap, score in zip(ok, maps, scores):
        stem = Path(names[files[i]]).with_suffix("")
        map_file, scale = save_map(amap, out / "maps" / stem, map_format)
        row = {"path": files[i], "name": names[files[i]], "score": float(score),
               "map_file": os.path.relpath(map_file, out), "map_scale": scale,
               "map_max": float(amap.max())}
        if norm:
          row["score_normalized"] = float(calib_lib.normalize(float(score), norm))
        if thr is not None:
          row["threshold"] = thr
          row["decision"] = "anomalous" if score > thr else "normal"
        if pix.get("threshold") is not None:
          row["anomalous_pixel_fraction"] = float(np.mean(amap > pix["threshold"]))
        if overlays:
          lo, hi = ((pix["min"], pix["max"]) if "min" in pix and "max" in pix
                    else (float(amap.min()), float(amap.max())))
          ov = out / "overlays" / stem.with_suffix(".png")
          ov.parent.mkdir(parents=True, exist_ok=True)
          from PIL import Image  # pylint: disable=g-import-not-at-top
          Image.fromarray(overlay(im, amap, lo, hi)).save(ov)
          row["overlay_file"] = os.path.relpath(ov, out)
        rows.append(row)
    bar.update(len(batch))
  bar.close()
  _write_tables(out, rows, failed, info, thr)
  return {"rows": rows, "failed": failed, "info": info, "threshold": thr,
          "compilations": predictor.compilations()}


def _resolve_threshold(threshold, cal, info) -> float | None:
  if threshold in (None, "none"):
    return None
  if threshold == "auto":
    if cal is None:
      print(f"NOTE: no {info['calibration_path']}: scores only, no decisions (calibrate with "
            "python -m inpformer_jax.calibrate, or pass --threshold FLOAT)", file=sys.stderr)
      return None
    return float(cal["image"]["threshold"])
  try:
    return float(threshold)
  except ValueError as e:
    raise ValueError(f"--threshold {threshold!r}: 'auto', 'none' or a number") from e


def _write_tables(out: Path, rows, failed, info, thr) -> None:
  cols = ["name", "score", "score_normalized", "decision", "threshold",
          "anomalous_pixel_fraction", "map_file", "map_scale", "map_max", "overlay_file", "path"]
  cols = [c for c in cols if any(c in r for r in rows)] or ["name", "score", "path"]
  with open(out / "predictions.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols + ["error"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow(r)
    for path, err in failed:
      w.writerow({"path": path, "error": err})
  with open(out / "predictions.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for path, err in failed:
      f.write(json.dumps({"path": path, "error": err}) + "\n")
  meta = {k: info[k] for k in ("kind", "path", "checkpoint_id", "step", "resize", "image_size",
                               "map_kind", "top_ratio")}
  meta.update(threshold=thr, n_images=len(rows), n_failed=len(failed))
  (out / "run_info.json").write_text(json.dumps(meta, indent=2))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m inpformer_jax.predict", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True,
                  help="training workdir, converted params dir or official model.pth")
  ap.add_argument("--input", required=True, nargs="+", help="image files, folders or globs")
  ap.add_argument("--output", required=True, help="output folder")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--image-size", type=int, default=None,
                  help="crop side (default: the checkpoint's config, or 392)")
  ap.add_argument("--resize", type=int, default=None,
                  help="resize side before the crop (default: config, or 448)")
  ap.add_argument("--threshold", default="auto",
                  help="'auto' (calibration.json if any), 'none' or a number")
  ap.add_argument("--calibration", default=None, help="a calibration.json elsewhere")
  ap.add_argument("--map-format", choices=("npy", "png16"), default="npy")
  ap.add_argument("--zero-shot", action="store_true",
                  help="map = distance to the nearest INP (the zero-shot setting)")
  ap.add_argument("--no-overlays", action="store_true")
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  try:
    res = predict(a.checkpoint, a.input, a.output, batch_size=a.batch_size,
                  image_size=a.image_size, resize=a.resize, threshold=a.threshold,
                  map_format=a.map_format, zero_shot=a.zero_shot,
                  overlays=not a.no_overlays, calibration=a.calibration,
                  progress=not a.no_progress)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n_dec = sum(r.get("decision") == "anomalous" for r in res["rows"])
  print(f"{len(res['rows'])} images -> {a.output}/predictions.csv"
        + (f"; {n_dec} anomalous at threshold {res['threshold']:.6g}"
           if res["threshold"] is not None else ""))
  if res["failed"]:
    print(f"{len(res['failed'])} input(s) failed:", file=sys.stderr)
    for path, err in res["failed"]:
      print(f"  {path}: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
