"""config.data -> samples: dataset specs and their errors, the union, the training source."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from configs import mvtec
from inpformer_jax.data import datasets, fewshot, pipeline, preprocess, readers
from inpformer_jax.data.folder import DatasetLayoutError
from inpformer_jax.settings import ConfigError
from tests.data.helpers import CROP, RESIZE, make_realiad, random_mvtec, take, train

CLASSES = ["bottle", "cable"]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mvtec"))
  random_mvtec(root, CLASSES)
  return root


def _config(root, arg=""):
  """configs/mvtec.py at the runlocal size, reading CLASSES from root."""
  c = mvtec.get_config(",".join(filter(None, [arg, "runlocal=True"])))
  c.data.roots.mvtec = root
  c.data.categories.mvtec = ",".join(CLASSES)
  return c


def test_union_and_groups(tmp_path):
  random_mvtec(str(tmp_path / "mvtec"), ["bottle", "cable"], seed=0)
  random_mvtec(str(tmp_path / "mpdd"), ["tubes"], seed=2)
  specs = [{"name": "mvtec", "root": str(tmp_path / "mvtec"), "categories": ["bottle", "cable"]},
           {"name": "mpdd", "root": str(tmp_path / "mpdd"), "categories": None}]
  train_samples = datasets.read(specs, "train")
  assert len(train_samples) == 9
  test = datasets.read(specs, "test")
  # The union keeps each dataset's order: (dataset, class) groups are contiguous, in order.
  groups = [(s.dataset, s.category) for s in test]
  assert list(dict.fromkeys(groups)) == [("mvtec", "bottle"), ("mvtec", "cable"),
                                         ("mpdd", "tubes")]
  assert groups == sorted(groups, key=list(dict.fromkeys(groups)).index)
  # One training stream over all datasets.
  seen = np.concatenate([b["index"] for b in take(train(train_samples, global_batch_size=3), 3)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(9))
  # Evaluation rows carry the dataset so metrics can be grouped per (dataset, class).
  b = next(iter(pipeline.eval_batches(test, resize=RESIZE, crop=CROP, batch_size=16,
                                      process_index=0, process_count=1)))
  assert set(b["dataset"][b["valid"]]) == {"mvtec", "mpdd"}
  with pytest.raises(ValueError, match="appear twice"):
    datasets.union(train_samples, train_samples[:1])
  assert readers.classes_of(test) == ["bottle", "cable", "tubes"]


def test_specs_from_the_config(mvtec_root):
  c = _config(mvtec_root)
  assert datasets.specs(c.data, "train") == [
      {"name": "mvtec", "root": mvtec_root, "categories": ["bottle", "cable"], "layout": "mvtec",
       "masks_required": True}]
  c.data.categories.mvtec = ""
  c.data.test = "mvtec, demo"
  c.data.roots.demo = mvtec_root
  assert datasets.specs(c.data, "test") == [
      {"name": "mvtec", "root": mvtec_root, "categories": None, "layout": "mvtec",
       "masks_required": True},
      {"name": "demo", "root": mvtec_root, "categories": None, "layout": "demo",
       "masks_required": True}]


def test_specs_errors_name_the_fix(mvtec_root, tmp_path):
  c = _config(mvtec_root)
  c.data.train = " , "
  with pytest.raises(ConfigError, match=r"config\.data\.train is empty"):
    datasets.specs(c.data, "train")
  c.data.train = "mvtec,nope"
  with pytest.raises(ConfigError, match=r"'nope'.*config\.data\.roots\.nope"):
    datasets.specs(c.data, "train")
  c.data.roots.mvtec = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"'mvtec' not found.*--config\.data\.roots\.mvtec="):
    datasets.specs(c.data, "test")


def test_training_source_multi_class_is_the_split_source(mvtec_root):
  c = _config(mvtec_root)
  split = datasets.read_split(c.data, "train")
  assert len(split.samples) == 6
  assert datasets.training_source(c, split) is split.source
  assert [split.source[i]["index"] for i in range(6)] == list(range(6))
  np.testing.assert_array_equal(split.source[5]["image"], preprocess.resize_pil_only(
      split.samples[5].image_path, c.data.resize))
  assert "mask" not in split.source[0] and "mask" in datasets.read_split(c.data, "test").source[0]


def test_training_source_few_shot_is_the_support_set(mvtec_root):
  c = _config(mvtec_root, "setting=few_shot,shots=2")
  split = datasets.read_split(c.data, "train")
  out = datasets.training_source(c, split).images
  crop = c.data.crop
  assert out.shape == (2 * len(CLASSES) * 22, crop, crop, 3) and out.dtype == np.float32
  shots = fewshot.select_shots(split.samples, 2, c.seed)
  want = fewshot.support_set(shots, preprocess.Preprocessing(c.data.resize, crop), seed=c.seed)
  np.testing.assert_array_equal(out, want)
  c.few_shot.augment = False
  plain = datasets.training_source(c, split).images
  np.testing.assert_array_equal(
      plain, np.stack([preprocess.load_image(s.image_path, c.data.resize, crop) for s in shots]))


def test_a_dataset_name_of_ones_own_is_read_by_its_layout(mvtec_root, tmp_path):
  c = _config(mvtec_root)
  c.data.roots.mine = mvtec_root  # MVTec-style folders: detected as 'folder'
  c.data.train = c.data.test = "mine"
  (spec,) = datasets.specs(c.data, "test")
  assert (spec["layout"], spec["masks_required"]) == ("folder", True)
  split = datasets.read_split(c.data, "test")
  assert {s.dataset for s in split.samples} == {"mine"} and len(split.samples) == 8
  c.data.layouts.mine, c.data.categories.mine = "mvtec", ",".join(CLASSES)  # the MVTec reader
  assert [dataclasses.replace(s, dataset="mvtec") for s in datasets.read_split(
      c.data, "test").samples] == readers.read_dataset("mvtec", mvtec_root, CLASSES, "test")
  c.data.layouts.mine = "mvtek"
  with pytest.raises(ConfigError, match=r"config\.data\.layouts\.mine='mvtek'; choose one of "):
    datasets.specs(c.data, "test")
  del c.data.layouts["mine"]
  c.data.roots.mine = str(tmp_path)  # nothing to tell the layout by
  with pytest.raises(ConfigError, match=r"cannot tell the layout of dataset 'mine' .* pass "
                                        r"--config\.data\.layouts\.mine=one of mvtec\|visa"):
    datasets.specs(c.data, "test")
  os.makedirs(tmp_path / "realiad_jsons")
  assert datasets.specs(c.data, "test")[0]["layout"] == "realiad"


def test_a_test_set_without_masks_needs_masks_false(tmp_path):
  root = str(tmp_path / "mine")
  random_mvtec(root, ["bottle"])
  shutil.rmtree(os.path.join(root, "bottle", "ground_truth"))
  c = _config(root)
  c.data.roots.mine = root
  c.data.test = "mine"
  with pytest.raises(DatasetLayoutError, match=r"but no masks.*--config\.data\.masks\.mine=False"):
    datasets.read_split(c.data, "test")
  c.data.masks.mine = False
  samples = datasets.read_split(c.data, "test").samples
  assert len(samples) == 4 and not any(s.has_mask for s in samples)


def test_realiad_fields_reach_the_reader_and_find_the_single_view_jsons(tmp_path):
  root = str(tmp_path)
  # The release unpacks every split setting under realiad_jsons/: the single-view one too.
  _, multi = make_realiad(root, res="512", views=(1, 2))
  os.makedirs(os.path.join(root, "realiad_jsons", "realiad_jsons_sv"))
  with open(multi) as f:
    spec = json.load(f)
  spec["test"] = [i for i in spec["test"] if "_C2_" in i["image_path"]][:1]  # one image
  with open(os.path.join(root, "realiad_jsons", "realiad_jsons_sv", "audiojack.json"), "w") as f:
    json.dump(spec, f)
  c = _config(root)
  c.data.roots.realiad, c.data.categories.realiad, c.data.test = root, "audiojack", "realiad"
  c.data.realiad.resolution, c.data.realiad.views = "512", "c2"
  (got,) = datasets.specs(c.data, "test")
  assert got == {"name": "realiad", "root": root, "categories": ["audiojack"],
                 "layout": "realiad", "resolution": "512", "views": ("C2",)}
  samples = datasets.read_split(c.data, "test").samples
  assert len(samples) == 2 and all("_C2_" in s.image_path for s in samples)  # 1 OK + 1 NG
  c.data.realiad.jsons = "realiad_jsons_sv"
  assert [s.image_path for s in datasets.read_split(c.data, "test").samples] == [
      samples[0].image_path]
  c.data.realiad.views = "C6"
  with pytest.raises(ConfigError, match=r"config\.data\.realiad\.views='C6'"):
    datasets.specs(c.data, "test")
  c.data.realiad.views, c.data.realiad.resolution = "", "2048"
  with pytest.raises(ConfigError, match=r"config\.data\.realiad\.resolution='2048'"):
    datasets.specs(c.data, "test")
