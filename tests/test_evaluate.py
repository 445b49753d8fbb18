"""evaluate(): each class's metrics and gallery are those of all its rows, though they are
computed and written in a worker thread as soon as the class is complete and the classes
straddle the batches."""

import jax
import numpy as np
from PIL import Image

from configs import mvtec
from inpformer_jax import anomaly_map
from inpformer_jax import evaluate as eval_lib
from inpformer_jax import metrics as metrics_lib
from inpformer_jax import params as params_lib
from inpformer_jax import train
from inpformer_jax import visuals
from inpformer_jax.data import datasets
from inpformer_jax.data import pipeline
from inpformer_jax.data.records import Sample
from tests.runlocal import local_config, make_mvtec_like


def test_class_metrics_cover_every_row_of_the_class(tmp_path):
  # 2 classes x 4 test images in batches of 3: each class ends inside a batch, and its
  # metrics start while the next class's rows are still to come.
  config = local_config(mvtec.get_config, "", {"mvtec": make_mvtec_like(tmp_path / "d")},
                        **{"eval.batch_size": 3, "eval.gallery_size": 2})
  test = datasets.read_split(config.data, "test")
  r = train.Recipe.create(config, total_steps=1)
  params = jax.device_put(params_lib.merge(r.encoder, r.trainable))
  forward, seen = r.forward(config), []

  def recording(p, images):
    out = forward(p, images)
    seen.append((np.asarray(images), out))
    return out

  with jax.set_mesh(r.mesh):
    got = eval_lib.evaluate(r.model, params, test.samples, config, r.mesh, forward=recording,
                            workdir=tmp_path / "wd")
  # The same maps and scores, every row of a class fed to one accumulator at once.
  kw = {"resize": config.data.resize, "crop": config.data.crop, "batch_size": 3}
  accs, gallery = {}, visuals.Gallery(2)
  for batch, crops, (images, out) in zip(pipeline.eval_batches(test.samples, **kw),
                                         pipeline.eval_batches(test.samples, uint8=True, **kw),
                                         seen, strict=True):
    # The model saw the host pipeline's normalised images, though normalised on the device
    # (padding rows aside: zeros before or after normalising, never read).
    valid = np.asarray(batch["index"]) >= 0
    np.testing.assert_array_equal(images[valid], batch["image"][valid])
    masks = anomaly_map.resize_masks_to_map(np.asarray(batch["mask"], np.float32))
    for row in np.flatnonzero(np.asarray(batch["index"]) >= 0):
      s = test.samples[int(batch["index"][row])]
      acc = accs.setdefault(s.category, metrics_lib.MetricAccumulator(
          protocol=config.eval.protocol, gt_threshold=config.eval.gt_threshold))
      acc.add(np.asarray(out["anomaly_map"])[row:row + 1], masks[row:row + 1], [s.label],
              np.asarray(out["score"])[row:row + 1])
      gallery.add(("mvtec", s.category), np.asarray(crops["image"])[row:row + 1],
                  masks[row:row + 1], np.asarray(out["anomaly_map"])[row:row + 1],
                  np.asarray(out["score"])[row:row + 1], [s.label], [eval_lib._name(s)],
                  [s.defect])
  assert len(seen) == 3 and sorted(accs) == sorted(got["mvtec"])
  for category, acc in accs.items():
    want = acc.result()
    assert dict(got["mvtec"][category]) == dict(want), category
    assert got["mvtec"][category].info["n_images"] == 4
    # The panels written by the worker: those of a gallery that saw every row, same pixels.
    page = got["mvtec"][category].info["gallery"]
    ref = gallery.write(("mvtec", category), tmp_path / "ref" / category, page["threshold"])
    assert [[im["name"] for im in s["images"]] for s in page["sections"]] == [
        [im["name"] for im in s["images"]] for s in ref["sections"]]
    assert sum(len(s["images"]) for s in ref["sections"]) >= 4
    for a, b in zip(page["sections"], ref["sections"], strict=True):
      for x, y in zip(a["images"], b["images"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(x["file"])),
                                      np.asarray(Image.open(y["file"])))


def test_rows_of_a_class_are_a_slice_when_contiguous_else_their_indices():
  samples = [Sample(f"/x/{i}.png", None, 0, "d", c, "good", False)
             for i, c in enumerate("aabab")]
  rows = np.arange(6)  # a batch's rows: samples 0, 1, 2, 3, padding, 4
  got = eval_lib._group_rows(samples, np.array([0, 1, 2, 3, -1, 4]))
  assert sorted(got) == [("d", "a"), ("d", "b")]
  np.testing.assert_array_equal(rows[got[("d", "a")]], [0, 1, 3])
  np.testing.assert_array_equal(rows[got[("d", "b")]], [2, 5])
  # Contiguous: views of the batch, padding left out.
  got = eval_lib._group_rows(samples, np.array([0, 1, 2, -1]))
  assert got == {("d", "a"): slice(0, 2), ("d", "b"): slice(2, 3)}
