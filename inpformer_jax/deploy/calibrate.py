r"""Writes calibration.json (decision thresholds) beside a checkpoint.

  # held-out NORMAL images, 1% false-positive rate (image and pixel level):
  python -m inpformer_jax.deploy.calibrate --checkpoint demo_workdir --normal good/ --fpr 0.01
  # labelled validation images in MVTec layout (a class folder or a dataset root), F1-optimal:
  python -m inpformer_jax.deploy.calibrate --checkpoint demo_workdir --val demo_data/brick

The definitions (strict "score > threshold", the exact quantile, the F1 candidates) are in
`deploy/calibration.py`. `python -m inpformer_jax.deploy.predict --threshold auto` (the
default) then reads the file. Exit status 2 when some images could not be read (they are
skipped), or for a user mistake: one `error: ...` line (`--verbose` adds the traceback).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

from inpformer_jax import anomaly_map
from inpformer_jax.data import readers
from inpformer_jax.deploy import calibration
from inpformer_jax.deploy import flags
from inpformer_jax.deploy.inferencer import Inferencer, expand_inputs, no_images_message
from inpformer_jax.loading import Loaded


def _val_samples(root: str):
  root = os.path.abspath(root)
  if os.path.isdir(os.path.join(root, "test")):  # one class folder
    return readers.read_folder(os.path.dirname(root), [os.path.basename(root)], "test")
  return readers.read_folder(root, None, "test")


def calibrate(loaded: Loaded, *, normal: str | None = None, val: str | None = None,
              fpr: float = 0.01, pixel_fpr: float | None = None, gt_threshold: float = 0.5,
              batch_size: int = 8, output: str | None = None, progress: bool = True
              ) -> tuple[dict, list]:
  """Runs the model on the calibration images and writes calibration.json. -> (cal, failed)."""
  if (normal is None) == (val is None):
    raise flags.FlagError("pass exactly one of --normal DIR and --val DIR")
  if normal is not None:
    files, unmatched = expand_inputs([normal])
    if unmatched or not files:
      raise flags.FlagError(no_images_message([normal], "--normal"))
    samples = None
  else:
    samples = _val_samples(val)
    files = [s.image_path for s in samples]
  # Only maps and scores are kept: the decoded images would hold ~1.8 MB each at 392 px.
  results = [dataclasses.replace(r, image=None) for r in Inferencer(
      loaded, batch_size=batch_size).run(files, progress=progress, desc="calibrate")]
  ok = [r for r in results if r.error is None]
  failed = [(r.path, r.error) for r in results if r.error is not None]
  if not ok:
    first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
    raise calibration.CalibrationError(
        f"none of the {len(results)} calibration images could be read{first}")
  scores = np.array([r.score for r in ok], np.float32)
  maps = np.stack([r.anomaly_map for r in ok])
  if samples is None:
    cal = calibration.calibrate_normal(scores, maps, fpr, pixel_fpr=pixel_fpr)
  else:
    kept = [samples[r.index] for r in ok]
    labels = np.array([s.label for s in kept], np.int32)
    masks = None
    if all(s.has_mask for s in kept):
      masks = anomaly_map.resize_masks_to_map(
          np.stack([loaded.preprocessing.mask(s.mask_path) for s in kept]))
    cal = calibration.calibrate_labelled(scores, labels, maps, masks, gt_threshold=gt_threshold)
  info = loaded.describe()
  cal.update({
      "source": os.path.abspath(normal or val), "n_images": len(ok), "n_failed": len(failed),
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


def _main(a) -> int:
  cal, failed = calibrate(flags.load(a), normal=a.normal, val=a.val, fpr=a.fpr,
                          pixel_fpr=a.pixel_fpr, gt_threshold=a.gt_threshold,
                          batch_size=a.batch_size, output=a.output, progress=not a.no_progress)
  pix = cal.get("pixel", {}).get("threshold")
  print(f"{cal['method']} on {cal['n_images']} images: image threshold "
        f"{cal['image']['threshold']:.6g}" + (f", pixel threshold {pix:.6g}" if pix else "")
        + f" -> {cal['written_to']}")
  for path, err in failed:
    print(f"ERROR: {path}: {err}", file=sys.stderr)
  return 2 if failed else 0


def main(argv=None) -> int:
  ap = flags.parser("inpformer_jax.deploy.calibrate", __doc__)
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--normal", help="folder of held-out normal images")
  g.add_argument("--val", help="labelled validation images, MVTec layout")
  ap.add_argument("--fpr", type=float, default=0.01, help="target image false-positive rate")
  ap.add_argument("--pixel-fpr", type=float, default=None, help="default: --fpr")
  ap.add_argument("--gt-threshold", type=float, default=0.5, help="mask > this is a defect")
  ap.add_argument("--output", default=None, help="default: beside the checkpoint")
  return flags.run(_main, ap, argv)


if __name__ == "__main__":
  sys.exit(main())
