"""Readers on small datasets written here in each real layout, and every bad-input case."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from inpformer_jax.data import preprocess, readers
from inpformer_jax.data.folder import DatasetLayoutError
from tests.data.helpers import make_mvtec, make_realiad, write_image, write_mask


# ---------------------------------------------------------------------------------------------
# MVTec AD


def test_mvtec_reads_layout_and_pairs_masks_by_stem(tmp_path):
  make_mvtec(tmp_path, "bottle")
  make_mvtec(tmp_path, "screw", defects=("scratch_head",))
  train = readers.read_mvtec(str(tmp_path), ["bottle", "screw"], "train")
  assert len(train) == 6 and all(s.label == 0 and s.mask_path is None for s in train)
  test = readers.read_dataset("mvtec", str(tmp_path), ["bottle", "screw"], "test")
  assert [s.category for s in test].count("bottle") == 6
  assert {s.defect for s in test} == {"good", "broken", "crack", "scratch_head"}
  for s in test:
    assert os.path.isabs(s.image_path) and s.dataset == "mvtec" and s.has_mask
    if s.label == 1:
      stem = os.path.splitext(os.path.basename(s.image_path))[0]
      assert os.path.basename(s.mask_path) == f"{stem}_mask.png"
      assert os.path.basename(os.path.dirname(s.mask_path)) == s.defect
      # the sizes were made distinct per image, so a wrong pairing would differ
      assert preprocess.image_size(s.mask_path) == preprocess.image_size(s.image_path)
    else:
      assert s.mask_path is None and s.defect == "good"


def test_mvtec_all_classes_by_default_and_missing_ones_named(tmp_path):
  make_mvtec(tmp_path, "bottle")
  with pytest.raises(DatasetLayoutError, match=r"'carpet'.*not found"):
    readers.read_mvtec(str(tmp_path), split="test")
  assert len(readers.CLASSES["mvtec"]) == 15
  assert len(readers.CLASSES["visa"]) == 12
  assert len(readers.CLASSES["realiad"]) == 30


def test_missing_mask_names_expected_file(tmp_path):
  base = make_mvtec(tmp_path)
  os.remove(os.path.join(base, "ground_truth", "crack", "1_a_mask.png"))
  with pytest.raises(DatasetLayoutError, match=r"no mask for .*1_a\.png.*1_a_mask\.png"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_extra_mask_is_an_error(tmp_path):
  base = make_mvtec(tmp_path)
  write_mask(os.path.join(base, "ground_truth", "crack", "7_mask.png"))
  with pytest.raises(DatasetLayoutError, match=r"have no image.*7_mask\.png"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_mask_folder_without_defect_folder_is_an_error(tmp_path):
  base = make_mvtec(tmp_path)
  write_mask(os.path.join(base, "ground_truth", "hole", "0_mask.png"))
  with pytest.raises(DatasetLayoutError, match=r"hole.*no matching test/hole/"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_mask_folder_for_normal_images_is_an_error(tmp_path):
  base = make_mvtec(tmp_path)
  write_mask(os.path.join(base, "ground_truth", "good", "000_mask.png"))
  with pytest.raises(DatasetLayoutError, match=r"ground_truth/good: normal images have no masks"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_two_images_with_one_stem_is_an_error(tmp_path):
  base = make_mvtec(tmp_path)
  write_image(os.path.join(base, "test", "crack", "1.jpg"), (21, 10))
  with pytest.raises(DatasetLayoutError, match=r"two images named 1\.\*"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_missing_ground_truth_folder_for_one_defect(tmp_path):
  base = make_mvtec(tmp_path)
  write_image(os.path.join(base, "test", "hole", "0.png"))
  with pytest.raises(DatasetLayoutError, match=r"ground_truth/hole is missing"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")


def test_mask_size_mismatch_names_both_files(tmp_path):
  base = make_mvtec(tmp_path)
  write_mask(os.path.join(base, "ground_truth", "broken", "1_mask.png"), size=(5, 5))
  with pytest.raises(DatasetLayoutError, match=r"1_mask\.png is 5x5 but its image .*1\.png"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test")
  assert len(readers.read_mvtec(str(tmp_path), ["bottle"], "test", check_sizes=False)) == 6


@pytest.mark.parametrize("case,match", [
    ("no_root", r"dataset root .* does not exist"),
    ("no_train", r"train is missing"),
    ("extra_train_folder", r"exactly one folder good/"),
    ("loose_test_file", r"unexpected file .*notes\.txt"),
    ("non_image", r"readme\.txt is not an image"),
    ("subfolder_in_images", r"unexpected sub-folder"),
    ("empty_train", r"no training images"),
    ("empty_defect", r"defect folder .*crack is empty"),
    ("class_folder_as_root", r"looks like a single class folder"),
])
def test_wrong_layouts_are_named_with_the_expected_layout(tmp_path, case, match):
  base = make_mvtec(tmp_path)
  root, split = str(tmp_path), "train"
  if case == "no_root":
    root = str(tmp_path / "nope")
  elif case == "no_train":
    os.rename(os.path.join(base, "train"), os.path.join(base, "training"))
  elif case == "extra_train_folder":
    write_image(os.path.join(base, "train", "bad", "0.png"))
  elif case == "loose_test_file":
    open(os.path.join(base, "test", "notes.txt"), "w").close()
    split = "test"
  elif case == "non_image":
    open(os.path.join(base, "train", "good", "readme.txt"), "w").close()
  elif case == "subfolder_in_images":
    write_image(os.path.join(base, "train", "good", "more", "0.png"))
  elif case == "empty_train":
    for f in os.listdir(os.path.join(base, "train", "good")):
      os.remove(os.path.join(base, "train", "good", f))
  elif case == "empty_defect":
    d = os.path.join(base, "test", "crack")
    for f in os.listdir(d):
      os.remove(os.path.join(d, f))
    split = "test"
  elif case == "class_folder_as_root":
    with pytest.raises(DatasetLayoutError, match=match):
      readers.read_folder(base, split="train")
    return
  with pytest.raises(DatasetLayoutError, match=match) as e:
    readers.read_mvtec(root, ["bottle"], split)
  assert "expected layout" in str(e.value)


def test_hidden_files_are_ignored(tmp_path):
  base = make_mvtec(tmp_path)
  open(os.path.join(base, "train", "good", ".DS_Store"), "w").close()
  open(os.path.join(base, "train", "good", "Thumbs.db"), "w").close()
  assert len(readers.read_mvtec(str(tmp_path), ["bottle"], "train")) == 3


def test_unreadable_image_lazily_and_with_verify(tmp_path):
  base = make_mvtec(tmp_path)
  bad = os.path.join(base, "test", "good", "000.png")
  with open(bad, "wb") as f:
    f.write(b"not a png")
  samples = readers.read_mvtec(str(tmp_path), ["bottle"], "test")  # header of good not read
  with pytest.raises(preprocess.ImageReadError, match="000.png"):
    preprocess.load_image(next(s for s in samples if s.image_path == bad).image_path, 16, 14)
  with pytest.raises(preprocess.ImageReadError, match="000.png"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "test", verify=True)


def test_truncated_image_is_caught_by_verify(tmp_path):
  base = make_mvtec(tmp_path)
  path = os.path.join(base, "train", "good", "001.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(preprocess.ImageReadError, match="001.png"):
    readers.read_mvtec(str(tmp_path), ["bottle"], "train", verify=True)


# ---------------------------------------------------------------------------------------------
# VisA (1cls) and generic folders


def test_visa_masks_share_the_image_stem(tmp_path):
  make_mvtec(tmp_path, "pcb1", mask_suffix="", ext=".JPG", defects=("bad",))
  test = readers.read_visa(str(tmp_path), ["pcb1"], "test")
  bad = [s for s in test if s.label == 1]
  assert len(bad) == 2 and all(s.dataset == "visa" for s in test)
  for s in bad:
    assert os.path.basename(s.mask_path) == os.path.basename(s.image_path)[:-4] + ".png"
  assert len(readers.read_visa(str(tmp_path), "pcb1", "train")) == 3


def test_visa_rejects_mvtec_mask_names(tmp_path):
  make_mvtec(tmp_path, "pcb1", mask_suffix="_mask", ext=".JPG", defects=("bad",))
  with pytest.raises(DatasetLayoutError, match=r"no mask for .*expected .*1\.png"):
    readers.read_visa(str(tmp_path), ["pcb1"], "test")


def test_folder_btad_layout(tmp_path):
  make_mvtec(tmp_path, "01", mask_suffix="", ext=".bmp", good="ok", defects=("ko",))
  make_mvtec(tmp_path, "02", mask_suffix="_mask", good="good", defects=("ko",))
  test = readers.read_dataset("btad", str(tmp_path), None, "test")
  assert {s.category for s in test} == {"01", "02"}
  assert all(s.dataset == "btad" and s.has_mask for s in test)
  assert {s.defect for s in test} == {"good", "ko"}
  assert len(readers.read_folder(str(tmp_path), split="train")) == 6


def test_folder_without_masks(tmp_path):
  base = make_mvtec(tmp_path, "widget")
  shutil.rmtree(os.path.join(base, "ground_truth"))
  test = readers.read_folder(str(tmp_path), split="test")
  assert len(test) == 6 and not any(s.has_mask for s in test)
  assert all(s.mask_path is None for s in test)
  assert sum(s.label for s in test) == 4
  with pytest.raises(DatasetLayoutError, match="masks_required=False"):
    readers.read_folder(str(tmp_path), split="test", masks_required=True)


def test_folder_ambiguous_mask_names(tmp_path):
  base = make_mvtec(tmp_path, "widget", mask_suffix="")
  write_mask(os.path.join(base, "ground_truth", "crack", "1_mask.png"), size=(22, 10))
  with pytest.raises(DatasetLayoutError, match="two masks match"):
    readers.read_folder(str(tmp_path), split="test")


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="unknown dataset 'mvtec2'"):
    readers.read_dataset("mvtec2", "/tmp", None, "test")


# ---------------------------------------------------------------------------------------------
# Real-IAD


def test_realiad_reads_json_split_every_view_is_a_sample(tmp_path):
  make_realiad(tmp_path, "audiojack")
  make_realiad(tmp_path, "usb", nested=False)
  train = readers.read_realiad(str(tmp_path), ["audiojack", "usb"], "train", resolution="256")
  assert len(train) == 20 and all(s.label == 0 for s in train)
  test = readers.read_dataset("real_iad", str(tmp_path), ["audiojack"], "test", resolution=256)
  assert len(test) == 10 and sum(s.label for s in test) == 5
  for s in test:
    assert s.dataset == "realiad" and s.category == "audiojack" and s.has_mask
    if s.label:
      assert s.defect == "AK" and s.mask_path.endswith(".png")
      assert os.path.splitext(s.mask_path)[0] == os.path.splitext(s.image_path)[0]
    else:
      assert s.defect == "good" and s.mask_path is None


def test_realiad_view_filter(tmp_path):
  make_realiad(tmp_path)
  test = readers.read_realiad(str(tmp_path), ["audiojack"], "test", resolution="256",
                              views=("C1", 3))
  assert len(test) == 4
  assert {"_C1_" in s.image_path or "_C3_" in s.image_path for s in test} == {True}
  with pytest.raises(ValueError, match="C1..C5"):
    readers.read_realiad(str(tmp_path), ["audiojack"], "test", resolution="256", views=["C7"])


def test_realiad_paths_prefixed_with_class_are_accepted(tmp_path):
  make_realiad(tmp_path, prefix_class=True)
  assert len(readers.read_realiad(str(tmp_path), ["audiojack"], "train", resolution="256")) == 10


@pytest.mark.parametrize("case,match", [
    ("resolution", r"realiad_1024 does not exist \(found \['realiad_256'"),
    ("no_json", r"no split file for class 'audiojack'"),
    ("missing_image", r"\[train\]\[0\] names .*C1.*does not exist"),
    ("missing_mask_path", r"has no mask_path"),
    ("mask_size", r"is 3x3 but its image"),
    ("category", r"belongs to category 'usb'"),
    ("bad_json", r"not valid JSON"),
    ("no_split", r"has no 'train' list"),
])
def test_realiad_errors(tmp_path, case, match):
  cdir, jpath = make_realiad(tmp_path)
  spec = json.load(open(jpath))
  res = "256"
  if case == "resolution":
    res = "1024"
  elif case == "no_json":
    os.remove(jpath)
  elif case == "missing_image":
    os.remove(os.path.join(cdir, spec["train"][0]["image_path"]))
  elif case == "missing_mask_path":
    spec["test"][-1]["mask_path"] = None
  elif case == "mask_size":
    write_mask(os.path.join(cdir, spec["test"][-1]["mask_path"]), (3, 3))
  elif case == "category":
    spec["train"][1]["category"] = "usb"
  elif case == "no_split":
    del spec["train"]
  if case in ("missing_mask_path", "category", "no_split"):
    json.dump(spec, open(jpath, "w"))
  if case == "bad_json":
    open(jpath, "w").write("{")
  split = "test" if case in ("missing_mask_path", "mask_size") else "train"
  with pytest.raises(DatasetLayoutError, match=match):
    readers.read_realiad(str(tmp_path), ["audiojack"], split, resolution=res)
