"""The data check before training: every fault of both splits in one DataFaults, clean data
passes and gives the splits the trainer would have read."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import mvtec
from inpformer_jax import errors
from inpformer_jax.data import datasets, validate
from inpformer_jax.data.validate import DataFaults
from tests.data.helpers import make_mvtec, make_realiad, write_mask


def _config(name, root, categories, **over):
  c = mvtec.get_config("runlocal=True")
  c.data.train = c.data.test = name
  c.data.roots[name] = str(root)
  c.data.categories[name] = categories
  for key, value in over.items():
    setattr(c if key == "setting" else c.data, key, value)
  return c


def _truncated(path, fmt):
  """A random image saved in fmt, then cut in half: the header still reads."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
      path, fmt)
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[:len(data) // 2])
  return path


def test_every_fault_of_both_splits_in_one_error(tmp_path):
  bottle, cable = make_mvtec(tmp_path, "bottle"), make_mvtec(tmp_path, "cable")
  capsule = make_mvtec(tmp_path, "capsule")
  for f in os.listdir(f"{capsule}/train/good"):
    os.remove(f"{capsule}/train/good/{f}")  # an empty class (no training images)
  j = os.path.join
  faulty = {
      "garbage": j(bottle, "train", "good", "001.png"),
      "text": j(cable, "train", "good", "readme.txt"),
      "no_mask": j(bottle, "test", "crack", "1_a.png"),
      "mask_size": j(bottle, "ground_truth", "broken", "1_mask.png"),
      "lone_mask": j(cable, "ground_truth", "crack", "7_mask.png"),
      "png_cut": _truncated(j(bottle, "test", "good", "000.png"), "PNG"),
      "jpeg_cut": _truncated(j(cable, "test", "good", "002.jpg"), "JPEG"),
  }
  Path(faulty["garbage"]).write_bytes(b"not a png")
  Path(faulty["text"]).write_text("notes")
  os.remove(j(bottle, "ground_truth", "crack", "1_a_mask.png"))
  write_mask(faulty["mask_size"], (5, 5))
  write_mask(faulty["lone_mask"])

  with pytest.raises(DataFaults) as e:
    validate.validate_run(_config("mvtec", tmp_path, "bottle,cable,capsule"), "train_and_eval")
  assert isinstance(e.value, errors.UserError)
  lines = str(e.value).splitlines()
  assert lines[0] == "8 data fault(s) in mvtec train, mvtec test; fix them and rerun"
  assert len(lines) == 9 and all(line.startswith("  ") for line in lines[1:])
  named = {kind: [line for line in lines if path in line] for kind, path in faulty.items()}
  assert all(len(v) == 1 for v in named.values()), named
  assert "not an image (PIL cannot identify it)" in named["garbage"][0]
  assert "is not an image" in named["text"][0]
  assert "no mask for" in named["no_mask"][0]
  assert "is 5x5 but its image" in named["mask_size"][0]
  assert "has no image" in named["lone_mask"][0]
  assert "truncated" in named["png_cut"][0] and "IEND" in named["png_cut"][0]
  assert "truncated" in named["jpeg_cut"][0] and "FFD9" in named["jpeg_cut"][0]
  assert any("'capsule' has no training images" in line for line in lines)
  assert len(e.value.faults) == 8 and e.value.where == ["mvtec train", "mvtec test"]


def test_clean_data_gives_the_splits_of_the_mode(tmp_path):
  make_mvtec(tmp_path, "bottle")
  make_mvtec(tmp_path, "cable")
  config = _config("mvtec", tmp_path, "bottle,cable")
  splits = validate.validate_run(config, "train_and_eval")
  for which in ("train", "test"):
    want = datasets.read_split(config.data, which)
    assert splits[which].samples == want.samples and len(splits[which].source) == len(want.source)
  assert splits["test"].source.with_masks and not splits["train"].source.with_masks
  assert list(validate.validate_run(config, "train")) == ["train"]
  assert list(validate.validate_run(config, "eval")) == ["test"]
  zero_shot = _config("mvtec", tmp_path, "bottle,cable", setting="zero_shot")
  assert list(validate.validate_run(zero_shot, "train_and_eval")) == ["test"]


def test_the_message_lists_at_most_max_listed_faults_and_counts_all():
  faults = [(f"/d/{i}.png", f"/d/{i}.png: truncated; replace it") for i in range(35)]
  lines = str(DataFaults(faults, ["mvtec test"])).splitlines()
  assert lines[0] == "35 data fault(s) in mvtec test; fix them and rerun"
  assert lines[1:1 + validate.MAX_LISTED] == [f"  {m}" for _, m in faults[:validate.MAX_LISTED]]
  assert lines[-1] == "  ... and 5 more" and len(lines) == validate.MAX_LISTED + 2


def test_real_iad_faults_are_collected(tmp_path):
  cdir, jpath = make_realiad(tmp_path, res="1024", views=(1, 2))
  spec = json.loads(Path(jpath).read_text())
  test = spec["test"]
  os.remove(os.path.join(cdir, test[0]["image_path"]))  # a listed image that is gone
  os.remove(os.path.join(cdir, test[-1]["mask_path"]))  # a listed mask that is gone
  test[-2]["mask_path"] = None  # an anomalous image without mask_path
  Path(jpath).write_text(json.dumps(spec))
  _truncated(os.path.join(cdir, test[1]["image_path"]), "JPEG")
  with pytest.raises(DataFaults) as e:
    validate.validate_split(_config("realiad", tmp_path, "audiojack").data, "test")
  message = str(e.value)
  assert message.startswith("4 data fault(s) in realiad test;")
  for rel in (test[0]["image_path"], test[-1]["mask_path"], test[1]["image_path"]):
    assert rel in message
  assert "has no mask_path" in message


def test_records_are_counted_against_the_manifest(tmp_path):
  build = tmp_path / "mvtec_ad" / "resize32" / "1.0.0"
  build.mkdir(parents=True)
  (build / "inpformer.json").write_text(json.dumps({
      "reader": "mvtec", "resize": 32, "encoding": "png", "subset": False,
      "categories": ["bottle"], "reader_kwargs": {}, "num_records": {"train": 3}}))
  (build / "samples_train.json").write_text(json.dumps([{}, {}]))
  (build / "dataset_info.json").write_text(json.dumps({
      "name": "mvtec_ad", "fileFormat": "array_record",
      "splits": [{"name": "train", "shardLengths": ["1", "2"]}]}))
  (build / "mvtec_ad-train.array_record-00000-of-00002").write_bytes(b"")
  config = _config("mvtec", "/nonexistent", "", source="array_record", tfds_dir=str(tmp_path))
  with pytest.raises(DataFaults) as e:
    validate.validate_split(config.data, "train")
  fix = "prepare it again (python -m inpformer_jax.data.prepare ...)"
  assert [m for _, m in e.value.faults] == [
      f"{build}/mvtec_ad-train.array_record-00001-of-00002: shard missing; {fix}",
      (f"{build}: train records disagree: 3 in inpformer.json, 2 in samples_train.json, 3 in "
       f"the shards; {fix}")]
