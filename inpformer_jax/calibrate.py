r"""Writes calibration.json (decision thresholds) beside a checkpoint.

  # held-out NORMAL images, 1% false-positive rate (image and pixel level):
  python -m inpformer_jax.calibrate --checkpoint demo_workdir --normal held_out_good/ --fpr 0.01
  # labelled validation images in MVTec layout (a class folder or a dataset root), F1-optimal:
  python -m inpformer_jax.calibrate --checkpoint demo_workdir --val demo_data/brick

The definitions (strict "score > threshold", the exact quantile, the F1 candidates) are in
inpformer_jax/calibration.py. `python -m inpformer_jax.predict --threshold auto` (the default)
then reads the file. Exit status 2 when some images could not be read (they are skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

from inpformer_jax import calibration
from inpformer_jax import predict as predict_lib


def run_model(model, params, info, files, *, batch_size: int = 8, progress: bool = True):
  """-> (scores (N,), maps (N, 256, 256), kept indices, failed [(path, error)])."""
  import tqdm  # pylint: disable=g-import-not-at-top
  pred = predict_lib.Predictor(model, params, image_size=info["image_size"],
                               batch_size=batch_size, map_kind=info["map_kind"],
                               top_ratio=info["top_ratio"])
  scores, maps, kept, failed = [], [], [], []
  bar = tqdm.tqdm(total=len(files), desc="calibrate", unit="img", disable=not progress)
  for batch in predict_lib.load_batches(files, batch_size, info["resize"], info["image_size"]):
    ok = [(i, im) for i, im, err in batch if im is not None]
    failed += [(files[i], err) for i, _, err in batch if err is not None]
    if ok:
      m, s = pred(np.stack([im for _, im in ok]))
      maps.append(m)
      scores.append(s)
      kept += [i for i, _ in ok]
    bar.update(len(batch))
  bar.close()
  if not kept:
    raise ValueError("none of the calibration images could be read")
  return np.concatenate(scores), np.concatenate(maps), kept, failed


def _val_samples(root: str):
  from inpformer_jax.data import readers  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(root)
  if os.path.isdir(os.path.join(root, "test")):  # one class folder
    return readers.read_folder(os.path.dirname(root), [os.path.basename(root)], "test")
  return readers.read_folder(root, None, "test")


def calibrate(checkpoint: str, *, normal: str | None = None, val: str | None = None,
              fpr: float = 0.01, pixel_fpr: float | None = None, gt_threshold: float = 0.5,
              batch_size: int = 8, image_size: int | None = None, resize: int | None = None,
              zero_shot: bool = False, output: str | None = None,
              progress: bool = True) -> tuple[dict, list]:
  """Runs the model on the calibration images and writes calibration.json. -> (cal, failed)."""
  if (normal is None) == (val is None):
    raise ValueError("pass exactly one of --normal DIR and --val DIR")
  model, params, info = predict_lib.load_for_inference(checkpoint, image_size=image_size,
                                                       resize=resize)
  if zero_shot:
    info["map_kind"] = "inp_distance"
  if normal is not None:
    files, unmatched = predict_lib.expand_inputs([normal])
    if unmatched or not files:
      raise ValueError(f"--normal {normal}: no images found")
    scores, maps, _, failed = run_model(model, params, info, files, batch_size=batch_size,
                                        progress=progress)
    cal = calibration.calibrate_normal(scores, maps, fpr, pixel_fpr=pixel_fpr)
    source = os.path.abspath(normal)
  else:
    from inpformer_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    from inpformer_jax.evaluate import nearest_resize_masks  # pylint: disable=g-import-not-at-top
    samples = _val_samples(val)
    files = [s.image_path for s in samples]
    scores, maps, kept, failed = run_model(model, params, info, files, batch_size=batch_size,
                                           progress=progress)
    kept_samples = [samples[i] for i in kept]
    labels = np.array([s.label for s in kept_samples], np.int32)
    masks = None
    if all(s.has_mask for s in kept_samples):
      masks = nearest_resize_masks(np.stack([
          preprocess.load_mask(s.mask_path, info["resize"], info["image_size"])
          for s in kept_samples]))
    cal = calibration.calibrate_labelled(scores, labels, maps, masks, gt_threshold=gt_threshold)
    source = os.path.abspath(val)
  cal.update({
      "source": source, "n_images": int(len(scores)), "n_failed": len(failed),
      "checkpoint": info["path"], "checkpoint_id": info["checkpoint_id"], "step": info["step"],
      "image_size": info["image_size"], "resize": info["resize"], "map_kind": info["map_kind"],
      "top_ratio": info["top_ratio"], "decision_rule": "anomalous if score > threshold",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  })
  path = Path(output) if output else Path(info["calibration_path"])
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(cal, indent=2))
  tmp.replace(path)
  cal["written_to"] = str(path)
  return cal, failed


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m inpformer_jax.calibrate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True)
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--normal", help="folder of held-out normal images")
  g.add_argument("--val", help="labelled validation images, MVTec layout")
  ap.add_argument("--fpr", type=float, default=0.01, help="target image false-positive rate")
  ap.add_argument("--pixel-fpr", type=float, default=None, help="default: --fpr")
  ap.add_argument("--gt-threshold", type=float, default=0.5, help="mask > this is a defect")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--image-size", type=int, default=None)
  ap.add_argument("--resize", type=int, default=None)
  ap.add_argument("--zero-shot", action="store_true")
  ap.add_argument("--output", default=None, help="default: beside the checkpoint")
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  try:
    cal, failed = calibrate(a.checkpoint, normal=a.normal, val=a.val, fpr=a.fpr,
                            pixel_fpr=a.pixel_fpr, gt_threshold=a.gt_threshold,
                            batch_size=a.batch_size, image_size=a.image_size, resize=a.resize,
                            zero_shot=a.zero_shot, output=a.output,
                            progress=not a.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  pix = cal.get("pixel", {}).get("threshold")
  print(f"{cal['method']} on {cal['n_images']} images: image threshold "
        f"{cal['image']['threshold']:.6g}" + (f", pixel threshold {pix:.6g}" if pix else "")
        + f" -> {cal['written_to']}")
  for path, err in failed:
    print(f"ERROR: {path}: {err}", file=sys.stderr)
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
