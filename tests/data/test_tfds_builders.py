"""TFDS builders (ArrayRecord, no TensorFlow): build + read round trip into the grain pipelines."""

import numpy as np
import pytest

from inpformer_jax.data import pipeline, prepare, preprocess, readers, sources, tfds_builders
from tests.data.helpers import CROP, RESIZE, make_realiad, random_mvtec

CLASSES = ["bottle", "cable"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  base = tmp_path_factory.mktemp("tfds")
  mv, ri, data_dir = str(base / "mvtec"), str(base / "realiad"), str(base / "tfds")
  random_mvtec(mv, CLASSES, counts=(5, 3, 3))
  # Two samples x two views per split, at resolution 256.
  make_realiad(ri, "audiojack", nested=False, views=(1, 2), train_ids=(0, 1), test_ids=(10, 11),
               anomalous_ids=(30, 31), defect="pit")
  prepare.main(["--dataset", "mvtec_ad", "--manual_dir", mv, "--data_dir", data_dir,
                "--resize", str(RESIZE), "--categories", ",".join(CLASSES)])
  prepare.main(["--dataset", "mvtec", "--manual_dir", mv, "--data_dir", data_dir,
                "--resize", str(RESIZE), "--categories", ",".join(CLASSES), "--encoding", "raw"])
  prepare.main(["--dataset", "real_iad", "--manual_dir", ri, "--data_dir", data_dir,
                "--resize", str(RESIZE), "--categories", "audiojack", "--resolution", "256",
                "--views", "C1"])
  return mv, ri, data_dir


def _mvtec_source(data_dir, split, with_masks=False):
  return tfds_builders.source(data_dir, "mvtec", split, resize=RESIZE, categories=CLASSES,
                              with_masks=with_masks)


def test_records_hold_the_resized_pixels_in_reader_order(prepared):
  mv, _, data_dir = prepared
  samples = readers.read_dataset("mvtec", mv, CLASSES, "test")
  src = _mvtec_source(data_dir, "test", with_masks=True)
  assert len(src) == len(samples) == 12
  for i in (0, 7, 11):
    r, s = src[i], samples[i]
    assert r["path"] == s.image_path and r["defect"] == s.defect and r["label"] == s.label
    np.testing.assert_array_equal(r["image"], preprocess.resize_pil_only(s.image_path, RESIZE))
    want = (np.zeros((RESIZE, RESIZE), np.uint8) if s.mask_path is None
            else preprocess.resize_mask_pil_only(s.mask_path, RESIZE))
    np.testing.assert_array_equal(r["mask"], want)
  # Training reads skip the mask and metadata.
  assert set(_mvtec_source(data_dir, "train")[0]) == {"index", "image"}


def test_eval_from_array_record_equals_eval_from_files(prepared):
  mv, _, data_dir = prepared
  samples = readers.read_dataset("mvtec", mv, CLASSES, "test")
  kw = dict(resize=RESIZE, crop=CROP, batch_size=5, process_index=0, process_count=1)
  files = list(pipeline.eval_batches(samples, **kw))
  records = list(pipeline.eval_batches(source=_mvtec_source(data_dir, "test", True), **kw))
  assert len(files) == len(records) == 3
  for a, b in zip(files, records):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # Bit-identical, strings included.


def test_train_from_array_record_equals_train_from_files(prepared):
  mv, _, data_dir = prepared
  samples = readers.read_dataset("mvtec", mv, CLASSES, "train")
  kw = dict(resize=RESIZE, crop=CROP, global_batch_size=4, seed=7, process_index=0,
            process_count=1)
  a = iter(pipeline.train_dataset(samples, **kw))
  b = iter(pipeline.train_dataset(source=_mvtec_source(data_dir, "train"), **kw))
  for _ in range(4):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_array_record_source_in_worker_processes(prepared):
  _, _, data_dir = prepared
  kw = dict(resize=RESIZE, crop=CROP, global_batch_size=4, seed=1, process_index=0,
            process_count=1, source=_mvtec_source(data_dir, "train"))
  ref = iter(pipeline.train_dataset(**kw))
  got = iter(pipeline.train_dataset(num_workers=1, **kw))
  for _ in range(3):
    x, y = next(ref), next(got)
    np.testing.assert_array_equal(np.asarray(y["image"]), x["image"])


def test_real_iad_builder_passes_resolution_and_views(prepared):
  _, ri, data_dir = prepared
  path = tfds_builders.builder_dir(data_dir, "real_iad", RESIZE, ["audiojack"],
                                   resolution="256", views=("C1",))
  assert "resize64-audiojack-resolution_256-views_C1" in path
  src = sources.ArrayRecordSource(path, "test", with_masks=True)
  want = readers.read_dataset("realiad", ri, ["audiojack"], "test", resolution="256",
                              views=("C1",))
  assert len(src) == len(want) == 4  # 2 normal + 2 anomalous samples, view C1 only.
  rows = [src[i] for i in range(len(src))]
  assert [r["path"] for r in rows] == [s.image_path for s in want]
  assert all("_C1_" in r["path"] for r in rows)
  assert [r["defect"] for r in rows] == ["good", "good", "pit", "pit"]
  assert all(r["mask"].max() == 255 for r in rows[2:]) and all(r["mask"].max() == 0
                                                               for r in rows[:2])


def test_concat_sources_for_super_multi_class(prepared):
  _, _, data_dir = prepared
  mv = _mvtec_source(data_dir, "test", with_masks=True)
  ri = tfds_builders.source(data_dir, "real_iad", "test", resize=RESIZE,
                            categories=["audiojack"], with_masks=True, resolution="256",
                            views=("C1",))
  both = sources.ConcatSource(mv, ri)
  assert len(both) == 16
  eb = pipeline.eval_batches(source=both, resize=RESIZE, crop=CROP, batch_size=6,
                             process_index=0, process_count=1)
  rows = [(int(i), str(d)) for b in eb for i, d, v in zip(b["index"], b["dataset"], b["valid"])
          if v]
  assert sorted(i for i, _ in rows) == list(range(16))
  assert {d for i, d in rows if i < 12} == {"mvtec"} and {d for i, d in rows if i >= 12} == {
      "realiad"}


def test_user_errors_name_the_fix(prepared, tmp_path, capsys):
  _, _, data_dir = prepared
  with pytest.raises(FileNotFoundError, match="python -m inpformer_jax.data.prepare"):
    tfds_builders.source(data_dir, "visa", "train", resize=RESIZE)
  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_builders.builder_class("imagenet")
  for extra, named in ((["--dataset", "mvtec", "--manual_dir", str(tmp_path), "--resolution",
                         "256"], "--resolution applies to --dataset real_iad only"),
                       (["--dataset", "visa", "--manual_dir", str(tmp_path / "nope")],
                        f"--manual_dir {tmp_path / 'nope'} does not exist")):
    assert prepare.main([*extra, "--data_dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and named in line, line
  with pytest.raises(ValueError, match="has no split"):
    sources.ArrayRecordSource(tfds_builders.builder_dir(data_dir, "mvtec", RESIZE, CLASSES),
                               "validation")


def test_raw_encoding_reads_the_same_pixels(prepared):
  _, _, data_dir = prepared
  png = _mvtec_source(data_dir, "test", with_masks=True)
  raw = tfds_builders.source(data_dir, "mvtec", "test", resize=RESIZE, categories=CLASSES,
                             with_masks=True, encoding="raw")
  assert raw.builder_dir.endswith("resize64-raw-bottle+cable/1.0.0")
  assert len(raw) == len(png)
  for i in range(len(png)):
    a, b = png[i], raw[i]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
