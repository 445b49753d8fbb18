"""evaluate(): each class's metrics are those of all its rows, though they are computed in a
worker thread as soon as the class is complete and the classes straddle the batches."""

import jax
import numpy as np

from configs import mvtec
from inpformer_jax import anomaly_map
from inpformer_jax import evaluate as eval_lib
from inpformer_jax import metrics as metrics_lib
from inpformer_jax import params as params_lib
from inpformer_jax import train
from inpformer_jax.data import datasets
from inpformer_jax.data import pipeline
from tests.runlocal import local_config, make_mvtec_like


def test_class_metrics_cover_every_row_of_the_class(tmp_path):
  # 2 classes x 4 test images in batches of 3: each class ends inside a batch, and its
  # metrics start while the next class's rows are still to come.
  config = local_config(mvtec.get_config, "", {"mvtec": make_mvtec_like(tmp_path / "d")},
                        **{"eval.batch_size": 3, "eval.gallery_size": 0})
  test = datasets.read_split(config.data, "test")
  r = train.Recipe.create(config, total_steps=1)
  params = jax.device_put(params_lib.merge(r.encoder, r.trainable))
  forward, seen = r.forward(config), []

  def recording(p, images):
    out = forward(p, images)
    seen.append(out)
    return out

  with jax.set_mesh(r.mesh):
    got = eval_lib.evaluate(r.model, params, test.samples, config, r.mesh, forward=recording)
  # The same maps and scores, every row of a class fed to one accumulator at once.
  batches = pipeline.eval_batches(test.samples, resize=config.data.resize, crop=config.data.crop,
                                  batch_size=3)
  accs = {}
  for batch, out in zip(batches, seen, strict=True):
    masks = anomaly_map.resize_masks_to_map(np.asarray(batch["mask"], np.float32))
    for row in np.flatnonzero(np.asarray(batch["index"]) >= 0):
      s = test.samples[int(batch["index"][row])]
      acc = accs.setdefault(s.category, metrics_lib.MetricAccumulator(
          protocol=config.eval.protocol, gt_threshold=config.eval.gt_threshold))
      acc.add(np.asarray(out["anomaly_map"])[row:row + 1], masks[row:row + 1], [s.label],
              np.asarray(out["score"])[row:row + 1])
  assert len(seen) == 3 and sorted(accs) == sorted(got["mvtec"])
  for category, acc in accs.items():
    want = acc.result()
    assert dict(got["mvtec"][category]) == dict(want), category
    assert got["mvtec"][category].info["n_images"] == 4
