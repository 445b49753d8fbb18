"""grain pipelines: training order/sharding/state, exactly-once evaluation, sources."""

import collections
import os

import jax
import numpy as np
import pytest

from inpformer_jax import sharding
from inpformer_jax.data import pipeline, preprocess, sources
from tests.data.helpers import CROP, RESIZE, take, train, write_samples


@pytest.fixture(scope="module")
def train_samples(tmp_path_factory):
  return write_samples(str(tmp_path_factory.mktemp("train")), 10)


@pytest.fixture(scope="module")
def test_samples(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("test"))
  good = write_samples(os.path.join(root, "good"), 7, seed=1)
  bad = write_samples(os.path.join(root, "bad"), 6, label=1, masks=True, seed=2)
  return good + bad  # 13 samples: no batch size below divides it.


def test_train_batches_visit_every_image_each_epoch(train_samples):
  batches = take(train(train_samples), 5)  # 20 elements = two epochs of 10.
  assert batches[0]["image"].shape == (4, CROP, CROP, 3)
  assert batches[0]["image"].dtype == np.float32
  order = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(order[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(order[10:]), np.arange(10))
  assert not np.array_equal(order[:10], order[10:]), "each epoch should be reshuffled"
  # The pixels are the official transform of the file the index names.
  b = batches[1]
  for row in range(4):
    ref = preprocess.load_image(train_samples[b["index"][row]].image_path, RESIZE, CROP)
    np.testing.assert_array_equal(b["image"][row], ref)
  assert pipeline.steps_per_epoch(10, 4) == 2


def test_train_seed_controls_order(train_samples):
  def idx(seed):
    return np.concatenate([b["index"] for b in take(train(train_samples, seed=seed), 3)])
  np.testing.assert_array_equal(idx(0), idx(0))
  assert not np.array_equal(idx(0), idx(1))


@pytest.mark.parametrize("process_count,global_bs", [(2, 4), (3, 6)])
def test_train_processes_get_disjoint_slices_of_the_global_batch(train_samples, process_count,
                                                                 global_bs):
  ref = take(train(train_samples, global_batch_size=global_bs, process_count=1), 4)
  per = [take(train(train_samples, global_batch_size=global_bs, process_index=p,
                      process_count=process_count), 4) for p in range(process_count)]
  for step in range(4):
    got = np.concatenate([per[p][step]["index"] for p in range(process_count)])
    np.testing.assert_array_equal(got, ref[step]["index"])
    assert per[0][step]["image"].shape[0] == global_bs // process_count


def test_train_state_restores_in_a_fresh_iterator(train_samples):
  ds = train(train_samples)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # Crosses the epoch boundary (batch 5 starts epoch 2).
  it2 = iter(train(train_samples))
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["image"], want["image"])


@pytest.mark.slow  # Spawns 4 worker processes (each imports grain and jax): ~10 s unloaded.
def test_train_with_worker_processes_matches_and_restores(train_samples):
  # Two spawned workers: same batches as in-process, and their state restores too.
  ref = take(train(train_samples), 5)
  it = iter(train(train_samples, num_workers=2))
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  for want, got in zip(ref, first + rest):
    np.testing.assert_array_equal(np.asarray(got["index"]), want["index"])
    np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
  it2 = iter(train(train_samples, num_workers=2))
  it2.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(it2)["index"]), ref[2]["index"])


def test_array_source_images_given_directly(train_samples):
  # Pre-augmented float arrays can be given directly, uint8 resized ones are finished.
  # (The few-shot support set through ArraySource: tests/data/test_fewshot.py.)
  arr = np.random.default_rng(0).integers(0, 256, (6, RESIZE, RESIZE, 3), dtype=np.uint8)
  b = take(train(arr, global_batch_size=2), 1)[0]
  np.testing.assert_array_equal(b["image"][0], preprocess.finish_from_resized(arr[b["index"][0]],
                                                                             CROP))
  floats = np.stack([preprocess.load_image(s.image_path, RESIZE, CROP) for s in train_samples[:4]])
  b = take(train(floats, global_batch_size=2), 1)[0]
  np.testing.assert_array_equal(b["image"], floats[b["index"]])


def test_train_config_errors(train_samples):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    train(train_samples, global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    train(train_samples, global_batch_size=16)
  with pytest.raises(ValueError, match="does not match the config's crop"):
    take(train(np.zeros((4, 32, 32, 3), np.float32), global_batch_size=2), 1)
  with pytest.raises(ValueError, match="ArraySource expects"):
    sources.ArraySource(np.zeros((4, 32, 32), np.float32))
  with pytest.raises(ValueError, match="not both"):
    train(train_samples, source=sources.ArraySource(np.zeros((4, CROP, CROP, 3), np.float32)))


def _check_exactly_once(samples, batches_per_process, batch_rows):
  seen = collections.Counter()
  for batches in batches_per_process:
    assert len(batches) == len(batches_per_process[0]), "processes must run equal batch counts"
    for b in batches:
      assert b["image"].shape == (batch_rows, CROP, CROP, 3)
      assert b["mask"].shape == (batch_rows, CROP, CROP)
      for row in np.flatnonzero(b["valid"]):
        i = int(b["index"][row])
        seen[i] += 1
        s = samples[i]
        assert (b["label"][row], b["path"][row], b["category"][row], b["dataset"][row],
                b["defect"][row]) == (s.label, s.image_path, s.category, s.dataset, s.defect)
      pad = ~b["valid"]
      assert (b["index"][pad] == -1).all() and (b["path"][pad] == "").all()
  assert seen == collections.Counter(range(len(samples)))


@pytest.mark.parametrize("devices", [1, 3, 8])
def test_eval_visits_each_image_once_for_any_device_count(test_samples, devices):
  bs = 2 * devices  # 2, 6, 16: none divides the 13 samples.
  eb = pipeline.eval_batches(test_samples, resize=RESIZE, crop=CROP, batch_size=bs,
                             process_index=0, process_count=1)
  batches = list(eb)
  assert len(batches) == len(eb) == -(-13 // bs)
  _check_exactly_once(test_samples, [batches], bs)


def test_eval_two_processes(test_samples):
  per = []
  for p in range(2):
    eb = pipeline.eval_batches(test_samples, resize=RESIZE, crop=CROP, batch_size=6,
                               process_index=p, process_count=2)
    per.append(list(eb))
  assert len(per[0]) == len(per[1]) == 3  # ceil(13 / 6): the last batch is padded on both.
  _check_exactly_once(test_samples, per, 3)


def test_eval_rows_hold_official_images_and_soft_masks(test_samples):
  batches = list(pipeline.eval_batches(test_samples, resize=RESIZE, crop=CROP, batch_size=16,
                                       process_index=0, process_count=1))
  b = batches[0]
  for row in np.flatnonzero(b["valid"]):
    s = test_samples[b["index"][row]]
    np.testing.assert_array_equal(b["image"][row],
                                  preprocess.load_image(s.image_path, RESIZE, CROP))
    np.testing.assert_array_equal(b["mask"][row], preprocess.load_mask(s.mask_path, RESIZE, CROP))
  anomalous = b["valid"] & (b["label"] == 1)
  assert (b["mask"][anomalous].max(axis=(1, 2)) == 1.0).all()
  assert (b["mask"][~anomalous] == 0).all()
  soft = b["mask"][anomalous]
  assert ((soft > 0) & (soft < 1)).any(), "bilinear resize should leave soft mask edges"


def test_eval_with_workers_matches_in_process(test_samples):
  kw = dict(resize=RESIZE, crop=CROP, batch_size=8, process_index=0, process_count=1)
  ref = list(pipeline.eval_batches(test_samples, **kw))
  got = list(pipeline.eval_batches(test_samples, num_workers=1, **kw))
  assert len(got) == len(ref)
  for a, b in zip(ref, got):
    for k in a:
      np.testing.assert_array_equal(np.asarray(b[k]), a[k])


def test_global_batch_assembles_numeric_fields(test_samples):
  n = jax.local_device_count()
  mesh = sharding.make_mesh()
  b = next(iter(pipeline.eval_batches(test_samples, resize=RESIZE, crop=CROP, batch_size=2 * n,
                                      process_index=0, process_count=1)))
  # String fields (dataset, category, ...) stay on the host.
  numeric = {k: v for k, v in b.items() if np.asarray(v).dtype.kind in "biuf"}
  g = sharding.global_batch(numeric, mesh)
  assert set(g) == {"image", "mask", "label", "valid", "index", "has_mask"}
  assert g["image"].shape == (2 * n, CROP, CROP, 3)
  assert g["image"].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(g["index"]), b["index"])


def test_uint8_output_normalised_on_device_equals_host_path(train_samples):
  host = take(train(train_samples), 2)
  dev = take(train(train_samples, uint8=True), 2)
  for h, d in zip(host, dev):
    assert d["image"].dtype == np.uint8 and d["image"].shape == (4, CROP, CROP, 3)
    np.testing.assert_array_equal(d["index"], h["index"])
    np.testing.assert_array_equal(np.asarray(jax.jit(pipeline.normalize)(d["image"])),
                                  h["image"])
  with pytest.raises(ValueError, match="uint8 output needs uint8 sources"):
    take(train(np.zeros((4, CROP, CROP, 3), np.float32), global_batch_size=2, uint8=True), 1)
