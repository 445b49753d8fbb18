r"""Writes calibration.json (decision thresholds) beside a checkpoint.

  # held-out NORMAL images, 1% false-positive rate (image and pixel level):
  python -m inpformer_jax.deploy.calibrate --checkpoint demo_workdir --normal good/ --fpr 0.01
  # labelled validation images in MVTec layout (a class folder or a dataset root), F1-optimal:
  python -m inpformer_jax.deploy.calibrate --checkpoint demo_workdir --val demo_data/brick

--normal is repeatable (a folder, an image or a quoted glob); the arguments after the flags
are more --normal images, so an unquoted `--normal good/*.png` works too.

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
from typing import Sequence

from inpformer_jax import allocator

if __name__ == "__main__":
  allocator.use_tcmalloc()  # re-executes this command under tcmalloc, before JAX is imported

from absl import flags as absl_flags
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


def calibrate(loaded: Loaded, *, normal: str | Sequence[str] | None = None,
              val: str | None = None,
              fpr: float = 0.01, pixel_fpr: float | None = None, gt_threshold: float = 0.5,
              batch_size: int = 8, output: str | None = None, progress: bool = True
              ) -> tuple[dict, list]:
  """Runs the model on the calibration images and writes calibration.json. -> (cal, failed).

  normal: a folder, file or glob, or several.
  """
  normals = [normal] if isinstance(normal, str) else list(normal or [])
  if bool(normals) == (val is not None):
    raise flags.FlagError("pass exactly one of --normal DIR and --val DIR")
  if normals:
    files, unmatched = expand_inputs(normals)
    if unmatched or not files:
      raise flags.FlagError(no_images_message(unmatched or normals, "--normal"))
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
      "source": (os.path.abspath(val) if val is not None else os.path.abspath(normals[0])
                 if len(normals) == 1 else [os.path.abspath(n) for n in normals]),
      "n_images": len(ok), "n_failed": len(failed),
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
                          batch_size=a.batch_size, output=a.output, progress=a.progress)
  pix = cal.get("pixel", {}).get("threshold")
  print(f"{cal['method']} on {cal['n_images']} images: image threshold "
        f"{cal['image']['threshold']:.6g}" + (f", pixel threshold {pix:.6g}" if pix else "")
        + f" -> {cal['written_to']}")
  for path, err in failed:
    print(f"ERROR: {path}: {err}", file=sys.stderr)
  return 2 if failed else 0


def _define(fv: absl_flags.FlagValues) -> None:
  absl_flags.DEFINE_multi_string(
      "normal", None, "held-out normal images (folder, file or glob); or --val",
      flag_values=fv)
  absl_flags.DEFINE_string("val", None, "labelled validation images, MVTec layout; or --normal",
                           flag_values=fv)
  absl_flags.DEFINE_float("fpr", 0.01, "target image false-positive rate", flag_values=fv)
  absl_flags.DEFINE_float("pixel_fpr", None, "target pixel false-positive rate (default: --fpr)",
                          flag_values=fv)
  absl_flags.DEFINE_float("gt_threshold", 0.5, "mask > this is a defect (--val)", flag_values=fv)
  absl_flags.DEFINE_string("output", None, "calibration.json to write (default: beside the "
                           "checkpoint)", flag_values=fv)


def main(argv=None) -> int:
  return flags.run(_main, _define, argv, prog="inpformer_jax.deploy.calibrate", doc=__doc__,
                   rest="normal")


if __name__ == "__main__":
  sys.exit(main())
