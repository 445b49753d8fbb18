r"""Serve an exported INP-Former with nothing but jax, numpy and PIL (no inpformer_jax import).

  python -m inpformer_jax.deploy.export --checkpoint demo_workdir --output exported/
  python examples/serve_exported.py exported/ demo_data/brick/test/scratch/000.png ...

Prints one line per image: score, decision (if the export carries a calibration), and the
location of the map's maximum. The preprocessing is spelled out from contract.json. The
files (model.jaxexport, params.npz, contract.json) are those of inpformer_jax/deploy/export.py,
whose `load_exported` is this `load`.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image


def load(directory):
  d = Path(directory)
  contract = json.loads((d / "contract.json").read_text())
  exported = jax.export.deserialize(bytearray((d / "model.jaxexport").read_bytes()))
  with np.load(d / "params.npz") as z:
    leaves = [z[f"leaf_{i:05d}"] for i in range(len(z.files))]
  # exported.in_tree describes ((params, images), {}): rebuild params from their leaves.
  (params, _), _ = jax.tree.unflatten(exported.in_tree, leaves + [None])
  return exported, jax.device_put(params), contract


def preprocess(path, contract):
  """PIL RGB -> resize (R, R) bilinear -> centre crop (S, S) -> (x / 255 - mean) / std."""
  spec = contract["inputs"]["images"]
  r, s = spec["preprocessing"]["resize"], spec["preprocessing"]["crop"]
  img = Image.open(path).convert("RGB").resize((r, r), Image.Resampling.BILINEAR)
  x = np.asarray(img, np.float32)
  top, left = int(round((r - s) / 2.0)), int(round((r - s) / 2.0))
  x = x[top:top + s, left:left + s] / np.float32(255)
  mean = np.asarray(spec["normalization"]["mean"], np.float32)
  std = np.asarray(spec["normalization"]["std"], np.float32)
  return (x - mean) / std


def main(argv):
  if len(argv) < 3:
    print(__doc__)
    return 1
  exported, params, contract = load(argv[1])
  images = np.stack([preprocess(p, contract) for p in argv[2:]])  # any batch size works
  out = exported.call(params, images)
  maps, scores = np.asarray(out["anomaly_map"]), np.asarray(out["score"])
  cal = contract.get("calibration") or {}
  thr = (cal.get("image") or {}).get("threshold")
  for path, m, s in zip(argv[2:], maps, scores):
    y, x = np.unravel_index(np.argmax(m), m.shape)
    decision = "" if thr is None else ("  ANOMALOUS" if s > thr else "  normal")
    print(f"{path}: score {s:.6f}{decision}  (map max {m.max():.4f} at row {y}, col {x} "
          f"of {m.shape[0]}x{m.shape[1]})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
