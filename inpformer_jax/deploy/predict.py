r"""Anomaly scores, maps, overlays and pass/fail decisions for new images.

  python -m inpformer_jax.deploy.predict --checkpoint demo_workdir \
      --input demo_data/brick/test --output predictions/

--input is repeatable and takes an image file, a folder or a quoted glob ("dir/*.png"); the
arguments after the flags are more inputs, so an unquoted `--input dir/*.png` works too.

--checkpoint is a training workdir of ours (its latest checkpoint + config.json), a converted
params dir (`weights_conversion/convert_inpformer.py`) or an official `model.pth`. Images go
through exactly the evaluation preprocessing and forward (`deploy.inferencer`). Per image
OUTPUT gets:
  maps/<relative path>.npy          float32 (256, 256) smoothed anomaly map, or
  maps/<relative path>.png          16-bit PNG: map = png * map_scale / 65535 (map_scale in the CSV)
  overlays/<relative path>.png      the map (jet) over the centre-cropped input image, every
                                    map on one scale: calibration.json's pixel range, else
                                    the range of all this run's maps
plus predictions.csv and predictions.jsonl (path, score, decision, map file, map_scale, ...)
and report.html (the images by score, the most and least anomalous, the score histogram).
The decision is "anomalous" when score > threshold; the threshold is --threshold FLOAT, or
(--threshold auto, the default) the image threshold of the checkpoint's calibration.json
(`python -m inpformer_jax.deploy.calibrate`); without one no decision is written.

Exit status: 0 all images processed; 2 some inputs could not be read (each is named on stderr
and in predictions.jsonl with an "error"; the others are processed), or a user mistake that
stops the run: one `error: ...` line (a flag, the checkpoint, inputs without any image;
`--verbose` adds the traceback).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from inpformer_jax import allocator

if __name__ == "__main__":
  allocator.use_tcmalloc()  # re-executes this command under tcmalloc, before JAX is imported

from absl import flags as absl_flags
import numpy as np
from PIL import Image

from inpformer_jax import report_page
from inpformer_jax import visuals
from inpformer_jax.data import preprocess
from inpformer_jax.deploy import calibration as calib_lib
from inpformer_jax.deploy import flags
from inpformer_jax.deploy.inferencer import (Inferencer, expand_inputs, no_images_message,
                                             relative_names)
from inpformer_jax.loading import Loaded, warn

MAP_FORMATS = ("npy", "png16")
OVERLAY_WORKERS = 4  # threads drawing overlays (PIL releases the GIL)


def save_map(amap: np.ndarray, path_stem: Path, fmt: str) -> tuple[str, float | None]:
  """-> (file written, map_scale) ; png16: map = png * map_scale / 65535."""
  path_stem.parent.mkdir(parents=True, exist_ok=True)
  if fmt == "npy":
    path = path_stem.with_name(path_stem.name + ".npy")  # a.v1 -> a.v1.npy, not a.npy
    np.save(path, amap.astype(np.float32))
    return str(path), None
  scale = float(max(amap.max(), 0.0)) or 1.0
  q = np.round(np.clip(amap / scale, 0, 1) * 65535).astype(np.uint16)
  path = path_stem.with_name(path_stem.name + ".png")
  Image.fromarray(q).save(path)  # uint16 -> mode I;16
  return str(path), scale


def read_png16_map(path: str | os.PathLike, map_scale: float) -> np.ndarray:
  """Inverse of the png16 format: float32 map (quantisation error <= map_scale / 131070)."""
  return np.asarray(Image.open(path), np.float32) * np.float32(map_scale / 65535)


def unmatched_reason(pattern: str) -> str:
  if os.path.isdir(pattern):
    return f"a folder without images ({', '.join(preprocess.IMAGE_EXTENSIONS)})"
  return "no such file, folder or matching glob"


def predict(loaded: Loaded, inputs: Sequence[str], output: str, *, batch_size: int = 8,
            threshold: str | float = "auto", map_format: str = "npy", overlays: bool = True,
            progress: bool = True) -> dict:
  """Scores `inputs` and writes OUTPUT; -> {"rows", "failed": [(path, error)], "info",
  "threshold", "compilations"}."""
  if map_format not in MAP_FORMATS:
    raise flags.FlagError(f"--map_format {map_format!r}: one of {MAP_FORMATS}")
  files, unmatched = expand_inputs(inputs)
  if not files:
    raise flags.FlagError(no_images_message(unmatched, "--input"))
  failed = [(u, unmatched_reason(u)) for u in unmatched]
  thr = _resolve_threshold(threshold, loaded)
  out = Path(output)
  out.mkdir(parents=True, exist_ok=True)
  names = dict(zip(files, relative_names(files)))
  # maps/<name without extension>.npy, but x.png and x.jpg of one folder keep theirs apart.
  stems = collections.Counter(str(Path(n).with_suffix("")) for n in names.values())
  out_stem = {f: Path(n) if stems[str(Path(n).with_suffix(""))] > 1 else Path(n).with_suffix("")
              for f, n in names.items()}
  inferencer = Inferencer(loaded, batch_size=batch_size)
  cal = loaded.calibration or {}
  pix = cal.get("pixel") or {}
  rows, low = [], math.inf
  for r in inferencer.run(files, progress=progress):
    if r.error is not None:
      failed.append((r.path, r.error))
      print(f"ERROR: {r.path}: {r.error}", file=sys.stderr)
      continue
    stem = out_stem[r.path]
    map_file, scale = save_map(r.anomaly_map, out / "maps" / stem, map_format)
    row = {"path": r.path, "name": names[r.path], "score": r.score,
           "map_file": os.path.relpath(map_file, out), "map_scale": scale,
           "map_max": float(r.anomaly_map.max())}
    if cal.get("normalization"):
      row["score_normalized"] = float(calib_lib.normalize(r.score, cal["normalization"]))
    if thr is not None:
      row["threshold"] = thr
      row["decision"] = "anomalous" if r.score > thr else "normal"
    if pix.get("threshold") is not None:
      row["anomalous_pixel_fraction"] = float(np.mean(r.anomaly_map > pix["threshold"]))
    low = min(low, float(r.anomaly_map.min()))
    rows.append(row)
  scale, scale_source = _overlay_scale(cal, low, max((r["map_max"] for r in rows), default=0.0))
  if overlays and rows:
    _write_overlays(loaded, out, rows, {r["path"]: out_stem[r["path"]] for r in rows}, scale)
  info = loaded.describe()
  _write_tables(out, rows, failed, info, thr)
  report_page.write_predict_page(
      out, rows, info, thr, _threshold_source(threshold, thr),
      scale if overlays and rows else None, scale_source)
  return {"rows": rows, "failed": failed, "info": info, "threshold": thr,
          "compilations": inferencer.compilations(), "scale": scale}


def _overlay_scale(cal: dict, low: float, high: float) -> tuple[tuple[float, float], str]:
  """One colour scale for every overlay of the run: the calibration's pixel range, else the
  range of all the run's maps (never each map's own)."""
  fixed = calib_lib.pixel_range(cal)
  if fixed is not None:
    return fixed, "calibration.json's pixel range"
  return (low, high), "the range of this run's maps; calibrate for a fixed one"


def _write_overlays(loaded: Loaded, out: Path, rows, stems, scale) -> None:
  """overlays/<name>.png on `scale`, once every map is known: the input is read again (the
  same preprocessing) and the map from the file just written."""
  prep = loaded.preprocessing

  def draw(row):
    amap = (np.load(out / row["map_file"]) if row["map_scale"] is None
            else read_png16_map(out / row["map_file"], row["map_scale"]))
    stem = stems[row["path"]]
    ov = out / "overlays" / stem.with_name(stem.name + ".png")
    ov.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(visuals.overlay(prep.image(row["path"]), amap, *scale)).save(ov)
    return os.path.relpath(ov, out)

  with concurrent.futures.ThreadPoolExecutor(OVERLAY_WORKERS) as pool:
    for row, file in zip(rows, pool.map(draw, rows)):
      row["overlay_file"] = file


def _threshold_source(asked, thr) -> str:
  if thr is None:
    return "no calibration.json: calibrate, or pass --threshold" if asked == "auto" else "none"
  return "calibration.json" if asked == "auto" else "--threshold"


def _resolve_threshold(threshold, loaded: Loaded) -> float | None:
  if threshold in (None, "none"):
    return None
  if threshold == "auto":
    if loaded.calibration is None:
      warn(f"NOTE: no {loaded.source['calibration_path']}: scores only, no decisions "
           "(calibrate with python -m inpformer_jax.deploy.calibrate, or pass --threshold FLOAT)")
      return None
    return float(loaded.calibration["image"]["threshold"])
  try:
    return float(threshold)
  except ValueError as e:
    raise flags.FlagError(f"--threshold {threshold!r}: 'auto', 'none' or a number") from e


def _write_tables(out: Path, rows, failed, info, thr) -> None:
  cols = ["name", "score", "score_normalized", "decision", "threshold",
          "anomalous_pixel_fraction", "map_file", "map_scale", "map_max", "overlay_file", "path"]
  cols = [c for c in cols if any(c in r for r in rows)] or ["name", "score", "path"]
  errors = [{"path": path, "error": err} for path, err in failed]
  with open(out / "predictions.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols + ["error"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows + errors)
  with open(out / "predictions.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows + errors)
  meta = {k: info[k] for k in ("kind", "path", "checkpoint_id", "step", "resize", "image_size",
                               "map_kind", "top_ratio")}
  meta.update(threshold=thr, n_images=len(rows), n_failed=len(failed))
  (out / "run_info.json").write_text(json.dumps(meta, indent=2))


def _main(a) -> int:
  if not a.input:
    raise flags.FlagError("--input is required: pass --input=FILE, FOLDER or GLOB (repeatable)")
  res = predict(flags.load(a), a.input, a.output, batch_size=a.batch_size,
                threshold=a.threshold, map_format=a.map_format, overlays=a.overlays,
                progress=a.progress)
  n_dec = sum(r.get("decision") == "anomalous" for r in res["rows"])
  print(f"{len(res['rows'])} images -> {a.output}/predictions.csv, {a.output}/report.html"
        + (f"; {n_dec} anomalous at threshold {res['threshold']:.6g}"
           if res["threshold"] is not None else ""))
  if res["failed"]:
    print(f"{len(res['failed'])} input(s) failed:", file=sys.stderr)
    for path, err in res["failed"]:
      print(f"  {path}: {err}", file=sys.stderr)
    return 2
  return 0


def _define(fv: absl_flags.FlagValues) -> None:
  absl_flags.DEFINE_multi_string(
      "input", None, "image file, folder or glob; the arguments after the flags are more "
      "inputs", flag_values=fv)
  absl_flags.DEFINE_string("output", None, "output folder", flag_values=fv)
  absl_flags.mark_flag_as_required("output", flag_values=fv)
  absl_flags.DEFINE_string("threshold", "auto",
                           "'auto' (calibration.json if any), 'none' or a number", flag_values=fv)
  absl_flags.DEFINE_enum("map_format", "npy", MAP_FORMATS, "anomaly map files", flag_values=fv)
  absl_flags.DEFINE_bool("overlays", True, "overlay PNGs (--nooverlays: none)", flag_values=fv)


def main(argv=None) -> int:
  return flags.run(_main, _define, argv, prog="inpformer_jax.deploy.predict", doc=__doc__,
                   rest="input")


if __name__ == "__main__":
  sys.exit(main())
