"""Prepared records in place of the files: `prepare` for every reader, the config finding the
builds, and a joint MVTec + Real-IAD run from records equal to the same run from the files."""

import dataclasses
import json
import re

import numpy as np
import pytest

from configs import mvtec
from inpformer_jax import reports
from inpformer_jax import train
from inpformer_jax.data import datasets, prepare, prepared, readers, tfds_builders
from inpformer_jax.settings import ConfigError
from tests.runlocal import (CLASSES, assert_same_rows, fast_compile_module,  # noqa: F401
                            final_params, local_config, make_mvtec_like, make_realiad_like,
                            max_abs_diff)

RESIZE = 32  # runlocal's data.resize
ORDER = ",".join(reversed(CLASSES))  # a class order that differs from the stored one


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  base = tmp_path_factory.mktemp("data")
  return {"mvtec": make_mvtec_like(base / "mvtec", classes=(*CLASSES, "zipper")),
          "realiad": make_realiad_like(base / "realiad")}


@pytest.fixture(scope="module")
def tfds_dir(roots, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tfds"))
  # MVTec: three classes (a config naming two of them selects their records);
  # Real-IAD: exactly the config's classes, raw pixels.
  prepare.main(["--dataset", "mvtec", "--manual_dir", roots["mvtec"], "--data_dir", out,
                "--resize", str(RESIZE), "--categories", "bottle,cable,zipper"])
  prepare.main(["--dataset", "realiad", "--manual_dir", roots["realiad"], "--data_dir", out,
                "--resize", str(RESIZE), "--categories", ",".join(CLASSES), "--encoding", "raw"])
  return out


def _configs(roots, tfds_dir, **over):
  files = local_config(mvtec.get_config, "", roots, **over)
  with files.unlocked():
    files.data.train = files.data.test = "mvtec,realiad"
    files.data.categories.mvtec = ORDER
  records = local_config(mvtec.get_config, "", roots, **over)
  with records.unlocked():
    records.data.train = records.data.test = "mvtec,realiad"
    records.data.categories.mvtec = ORDER
    records.data.source = "array_record"
    records.data.tfds_dir = tfds_dir
    records.data.roots.mvtec = records.data.roots.realiad = "/nonexistent"  # not needed
  return files, records


def test_records_give_the_files_samples_and_pixels(roots, tfds_dir):
  files, records = _configs(roots, tfds_dir)
  for which in ("train", "test"):
    a, b = datasets.read_split(files.data, which), datasets.read_split(records.data, which)
    assert a.samples == b.samples and len(a.source) == len(b.source) > 8
    groups = list(dict.fromkeys((s.dataset, s.category) for s in b.samples))
    assert groups == [("mvtec", c) for c in reversed(CLASSES)] + [("realiad", c)
                                                                  for c in CLASSES]
    for i in range(len(a.source)):
      x, y = a.source[i], b.source[i]
      assert set(x) == set(y), which
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{which} {i} {k}")
  # Few-shot reads its shots from the records too.
  with files.unlocked(), records.unlocked():
    files.setting = records.setting = "few_shot"
    files.few_shot.shots = records.few_shot.shots = 1
  a = datasets.training_source(files, datasets.read_split(files.data, "train"))
  b = datasets.training_source(records, datasets.read_split(records.data, "train"))
  np.testing.assert_array_equal(a.images, b.images)


def test_every_reader_has_a_builder_and_a_manifest(roots, tfds_dir, tmp_path, capsys):
  assert set(prepared.BUILDER_NAMES) == set(readers.READERS)
  assert sorted(tfds_builders.BUILDERS) == sorted(prepared.BUILDER_NAMES.values())
  for name in readers.READERS:
    assert tfds_builders.builder_class(name).READER == name
  # An own MVTec-layout folder through the generic builder.
  capsys.readouterr()
  assert prepare.main(["--dataset", "folder", "--manual_dir", roots["mvtec"], "--data_dir",
                       str(tmp_path), "--resize", str(RESIZE), "--categories", "zipper"]) == 0
  path = re.search(r"^prepared \S+ at (\S+) in ", capsys.readouterr().out, re.M).group(1)
  manifest = json.loads(open(f"{path}/{prepared.MANIFEST}").read())
  assert manifest["reader"] == "folder" and manifest["categories"] == ["zipper"]
  assert manifest["num_records"] == {"train": 4, "test": 4} and manifest["subset"]
  samples, source = prepared.open_split(str(tmp_path), "folder", "test", resize=RESIZE,
                                        categories=["zipper"])
  assert samples == readers.read_dataset("folder", roots["mvtec"], ["zipper"], "test")
  assert [source[i]["path"] for i in range(4)] == [s.image_path for s in samples]
  # A config's own name for the folder (its layout given) reads that build, under its name.
  mine = local_config(mvtec.get_config, "", {}, **{
      "data.roots.mine": "/nonexistent", "data.layouts.mine": "folder", "data.test": "mine",
      "data.categories.mine": "zipper", "data.source": "array_record",
      "data.tfds_dir": str(tmp_path)})
  assert datasets.read_split(mine.data, "test").samples == [
      dataclasses.replace(s, dataset="mine") for s in samples]


def test_missing_or_mismatched_builds_name_the_prepare_command(roots, tfds_dir, tmp_path):
  _, records = _configs(roots, tfds_dir)
  with records.unlocked():
    records.data.resize = 64
  with pytest.raises(ConfigError, match=r"stored side \[32\], but config\.data\.resize=64.*"
                                        r"inpformer_jax\.data\.prepare --dataset mvtec .*"
                                        r"--resize 64"):
    datasets.read_split(records.data, "train")
  with records.unlocked():
    records.data.resize = RESIZE
    records.data.train = "visa"
  with pytest.raises(ConfigError, match=r"no prepared visa .* run python -m "
                                        r"inpformer_jax\.data\.prepare --dataset visa"):
    datasets.read_split(records.data, "train")
  with records.unlocked():
    records.data.train = "realiad"
    records.data.categories.realiad = "bottle,cable,zipper"  # the build holds two classes
  with pytest.raises(ConfigError, match="no prepared realiad .*bottle,cable,zipper"):
    datasets.read_split(records.data, "train")
  with records.unlocked():
    records.data.tfds_dir = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"config\.data\.tfds_dir=.*nowhere.* is not a directory"):
    datasets.read_split(records.data, "train")
  with records.unlocked():
    records.data.source = "tfrecord"
  with pytest.raises(ConfigError, match="config.data.source='tfrecord'; choose one of files"):
    datasets.read_split(records.data, "train")


def test_joint_training_from_records_equals_files(roots, tfds_dir, tmp_path):
  # Warm-up 0: every one of the 4 steps learns.
  over = {"train.total_steps": 4, "optim.warmup_steps": 0, "train.checkpoint_every_steps": 100}
  files, records = _configs(roots, tfds_dir, **over)
  recipes = train.Recipes()
  a = train.train_and_evaluate(files, str(tmp_path / "files"), recipes=recipes)
  b = train.train_and_evaluate(records, str(tmp_path / "records"), recipes=recipes)
  rows_a, rows_b = reports.read_metrics(tmp_path / "files"), reports.read_metrics(tmp_path /
                                                                                 "records")
  assert len(rows_a) == 4 and all(r["lr"] > 0 for r in rows_a)
  assert_same_rows(rows_a, rows_b, tol=0)  # the same pixels in the same order: bit for bit
  initial = recipes.get(files, 4).trainable
  assert max_abs_diff(final_params(tmp_path / "files"), initial) > 1e-3
  assert max_abs_diff(final_params(tmp_path / "files"), final_params(tmp_path / "records")) == 0
  assert set(a["datasets"]) == {"mvtec", "realiad"}
  assert a["datasets"] == b["datasets"]
