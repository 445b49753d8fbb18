r"""A serialized INP-Former for serving: `jax.export` of forward + anomaly map + score.

  python -m inpformer_jax.deploy.export --checkpoint demo_workdir --output exported/

writes OUTPUT/
  model.jaxexport   `exported.serialize()` bytes: StableHLO of
                    (params, images (b, S, S, 3) float32 normalised)
                      -> {"anomaly_map": (b, 256, 256) float32, "score": (b,) float32}
                    with a symbolic batch b, lowered for the platforms given (cpu, cuda);
  params.npz        the parameters, one array per leaf, "leaf_00000"... in the order of
                    `jax.tree.leaves` (= the flattened first argument of `exported.in_tree`);
  contract.json     input shape/dtype, normalisation mean/std and the preprocessing sizes,
                    output names/shapes, image size, map size, top_ratio, map kind,
                    calibration (if the checkpoint has one), checkpoint id, sizes.

The params are an ARGUMENT, not constants baked into the program: a ViT-L model's weights
(~1.2 GB in float32) would make a serialized module beyond what protobuf/flatbuffer
serialization handles comfortably (2 GB limit) and every compile would constant-fold them;
as an argument they stay ordinary device buffers, can be placed/sharded by the server and
swapped (a retrained checkpoint with the same architecture) without re-exporting.
Loading needs jax and numpy only (`examples/serve_exported.py`, `load_exported` below).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags as absl_flags
import jax
import jax.numpy as jnp
import numpy as np

from inpformer_jax import anomaly_map
from inpformer_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from inpformer_jax.deploy import flags
from inpformer_jax.loading import Loaded

EXPORT_FILE = "model.jaxexport"
PARAMS_FILE = "params.npz"
CONTRACT_FILE = "contract.json"
OUTPUT_NAMES = ("anomaly_map", "score")
# What jax.export lowers for; it accepts any other name silently (and the module never runs).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_model(loaded: Loaded, *, platforms=("cpu", "cuda")):
  """-> jax.export.Exported of `anomaly_map.maps_and_scores` with a symbolic batch 'b'."""
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    what = f"unknown {', '.join(unknown)}" if unknown else "no platform given"
    raise flags.FlagError(f"--platforms {','.join(platforms)}: {what}; choose from "
                          f"{','.join(PLATFORMS)}")
  s = loaded.preprocessing.crop
  fn = anomaly_map.jit_maps_and_scores(loaded.model, **loaded.scoring)
  (b,) = jax.export.symbolic_shape("b")
  params_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype),
                             loaded.params)
  images_spec = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
  return jax.export.export(fn, platforms=tuple(platforms))(params_spec, images_spec)


def contract(exported, params, info: dict, calibration: dict | None) -> dict:
  s = info["image_size"]
  leaves = jax.tree.leaves(params)
  out_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  return {
      "format": "jax.export (serialize() bytes), params passed as the first argument",
      "jax_version": jax.__version__,
      "platforms": list(exported.platforms),
      "inputs": {
          "params": {"file": PARAMS_FILE, "n_leaves": len(leaves),
                     "n_parameters": int(sum(np.size(x) for x in leaves)),
                     "bytes": int(sum(np.asarray(x).nbytes for x in leaves))},
          "images": {"shape": ["b", s, s, 3], "dtype": "float32", "layout": "NHWC RGB",
                     "normalization": {"mean": IMAGENET_MEAN.tolist(),
                                       "std": IMAGENET_STD.tolist(),
                                       "formula": "(pixel / 255 - mean) / std"},
                     "preprocessing": {"resize": info["resize"], "crop": s,
                                       "steps": "PIL RGB -> resize (resize, resize) BILINEAR "
                                                "-> centre crop (crop, crop) -> normalise"}},
      },
      "outputs": {k: {"shape": ["b" if str(d) == "b" else int(d) for d in v.shape],
                      "dtype": str(v.dtype)} for k, v in out_avals.items()},
      "image_size": s, "map_size": int(out_avals["anomaly_map"].shape[-1]),
      "top_ratio": info["top_ratio"], "map_kind": info["map_kind"],
      "decision_rule": "anomalous if score > calibration.image.threshold",
      "calibration": calibration,
      "checkpoint": info["path"], "checkpoint_id": info["checkpoint_id"], "step": info["step"],
  }


def save(directory, exported, params, info: dict, calibration: dict | None = None) -> dict:
  """Writes model.jaxexport, params.npz, contract.json; -> the contract (with file sizes)."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  blob = exported.serialize()
  (d / EXPORT_FILE).write_bytes(blob)
  leaves = jax.tree.leaves(params)
  np.savez(d / PARAMS_FILE, **{f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
  c = contract(exported, params, info, calibration)
  c["files"] = {EXPORT_FILE: len(blob), PARAMS_FILE: (d / PARAMS_FILE).stat().st_size}
  (d / CONTRACT_FILE).write_text(json.dumps(c, indent=2))
  return c


def load_exported(directory):
  """jax + numpy only: -> (call(images) -> dict of numpy, contract).

  The same code as examples/serve_exported.py, importable.
  """
  d = Path(directory)
  exp = jax.export.deserialize(bytearray((d / EXPORT_FILE).read_bytes()))
  with np.load(d / PARAMS_FILE) as z:
    leaves = [z[f"leaf_{i:05d}"] for i in range(len(z.files))]
  # in_tree is the tree of ((params, images), {}); rebuild params with a placeholder image.
  (params, _), _ = jax.tree.unflatten(exp.in_tree, leaves + [None])
  params = jax.device_put(params)
  c = json.loads((d / CONTRACT_FILE).read_text())

  def call(images):
    out = exp.call(params, np.asarray(images, np.float32))
    return {k: np.asarray(v) for k, v in out.items()}
  return call, c


def _main(a) -> int:
  loaded = flags.load(a)
  exp = export_model(loaded, platforms=[p for p in a.platforms.split(",") if p])
  c = save(a.output, exp, loaded.params, loaded.describe(), loaded.calibration)
  print(f"exported for {c['platforms']} -> {a.output} ({c['files'][EXPORT_FILE] / 1e6:.2f} MB "
        f"program, {c['files'][PARAMS_FILE] / 1e6:.1f} MB params"
        f"{', calibration included' if loaded.calibration else ''})")
  if a.check:
    call, _ = load_exported(a.output)
    s = loaded.preprocessing.crop
    x = np.random.default_rng(0).normal(size=(2, s, s, 3)).astype(np.float32)
    live = anomaly_map.jit_maps_and_scores(loaded.model, **loaded.scoring)(loaded.params, x)
    got = call(x)
    diff = max(float(np.max(np.abs(np.asarray(live[k]) - got[k]))) for k in OUTPUT_NAMES)
    print(f"check: max |exported - live| = {diff:.3g}")
    if diff > 1e-5:
      return 3
  return 0


def _define(fv: absl_flags.FlagValues) -> None:
  absl_flags.DEFINE_string("output", None, "folder to write", flag_values=fv)
  absl_flags.mark_flag_as_required("output", flag_values=fv)
  absl_flags.DEFINE_string("platforms", "cpu,cuda",
                           f"comma-separated, of {','.join(PLATFORMS)}", flag_values=fv)
  absl_flags.DEFINE_bool("check", False, "run the exported and the live model on 2 random "
                         "inputs and compare (exit 3 if they differ)", flag_values=fv)


def main(argv=None) -> int:
  return flags.run(_main, _define, argv, prog="inpformer_jax.deploy.export", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
