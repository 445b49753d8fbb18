"""inpformer_jax.loading: every checkpoint kind -> the same model; a run's encoder; init_from;
unusable paths and stale calibrations explained."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

from configs import mvtec
from inpformer_jax import anomaly_map
from inpformer_jax import checkpoint
from inpformer_jax import loading
from inpformer_jax import metrics
from inpformer_jax import params as params_lib
from inpformer_jax import settings
from inpformer_jax import train
from inpformer_jax.checkpoint import CheckpointError
from inpformer_jax.data import preprocess, readers
from inpformer_jax.deploy.inferencer import Inferencer
from inpformer_jax.models import factory
from tests.deploy import models
from tests.deploy.models import tiny  # noqa: F401 (fixtures)
from tests.torch_reference import inpformer as torch_inpformer
from weights_conversion import convert_inpformer

CROP = models.CROP


def _same_tree(got, want):
  assert params_lib.shapes(got) == params_lib.shapes(want)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def _runlocal_config(**fields):
  """configs/mvtec.py:runlocal=True (tiny random ViT with 4 registers, 32 -> 28 px), with
  top-level `fields` (seed=, init_from=) replaced."""
  config = mvtec.get_config("runlocal=True")
  with config.unlocked():
    config.update(fields)
  return config


def _write_state(workdir, step, trainable):
  """A training checkpoint as the trainer writes it (state only) -> its abstract state."""
  state = {"params": trainable, "opt_state": {"count": np.zeros((), np.int32)},
           "step": np.int32(step), "rng": np.zeros(2, np.uint32)}
  ck = checkpoint.TrainCheckpointer(workdir, save_interval_steps=1)
  ck.save(step, state, force=True)
  ck.close()
  return jax.eval_shape(lambda: state)


# ---------------------------------------------------------------------------------------
# One model, any file: the official .pth, .safetensors, the converted params dir.
# ---------------------------------------------------------------------------------------


def test_official_pth_gives_the_official_maps(golden, golden_state_dict, tmp_path):
  """An official-format model.pth (golden fixture, written with torch) through the loader
  and the padded batch: the official smoothed maps and scores."""
  z, _ = golden
  pth = tmp_path / "model.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in golden_state_dict.items()}, pth)
  x = np.asarray(z["input/images"]).transpose(0, 2, 3, 1)
  loaded = loading.load(pth, image_size=x.shape[1])
  info = loaded.describe()
  assert info["kind"] == "torch_file"
  assert info["calibration_path"].endswith("model.pth.calibration.json")
  maps, scores = Inferencer(loaded, batch_size=3)(x)
  np.testing.assert_allclose(maps, z["map/smoothed256"][:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(scores, z["score/top1pct"], atol=1e-5, rtol=0)


def test_the_same_model_saved_three_ways_scores_the_same(tmp_path, capsys):
  """A random tiny official INP-Former (tests/torch_reference, official key names) as
  model.pth, as model.safetensors and as the params dir convert_inpformer.py makes of the
  .pth: load() of each gives the same params, maps and scores -- the official code's."""
  torch.manual_seed(0)
  net = torch_inpformer.build_inpformer({"embed_dim": 32, "num_heads": 2, "depth": 10},
                                        num_registers=0, inp_num=4, image_size=CROP).eval()
  state_dict = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
  torch.save(state_dict, tmp_path / "model.pth")
  save_safetensors(state_dict, str(tmp_path / "model.safetensors"))
  assert convert_inpformer.main(["--input", str(tmp_path / "model.pth"),
                                 "--output", str(tmp_path / "converted")]) == 0
  assert "wrote" in capsys.readouterr().out
  x = np.random.default_rng(0).normal(size=(3, CROP, CROP, 3)).astype(np.float32)
  want = torch_inpformer.infer(net, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  first = None
  for name, kind in (("model.pth", "torch_file"), ("model.safetensors", "torch_file"),
                     ("converted", "params_dir")):
    loaded = loading.load(tmp_path / name, image_size=CROP)
    assert loaded.source["kind"] == kind
    assert loaded.preprocessing == preprocess.Preprocessing(models.RESIZE, CROP)
    assert loading.read_inpformer(tmp_path / name)[1] == models.ARCH
    maps, scores = Inferencer(loaded, batch_size=4)(x)
    if first is None:
      first = loaded.params, maps, scores
      np.testing.assert_allclose(maps, want["map"][:, 0].numpy(), atol=1e-5, rtol=0)
      np.testing.assert_allclose(scores, want["score"].numpy(), atol=1e-5, rtol=0)
    else:
      _same_tree(loaded.params, first[0])
      np.testing.assert_array_equal(maps, first[1])
      np.testing.assert_array_equal(scores, first[2])


# ---------------------------------------------------------------------------------------
# Training workdirs.
# ---------------------------------------------------------------------------------------


def test_training_workdir_is_loaded(tmp_path):
  """A workdir as the trainer writes it: config.json + ckpt/<step>/ holding the trainable
  params; the frozen encoder comes from config.model.encoder_weights (a params dir here)."""
  config = _runlocal_config()
  model = factory.build_model(config.model)
  crop = config.data.crop
  encoder = models.fill(factory.abstract_encoder(model, crop), seed=1)
  trained = models.fill(loading.abstract_trainable(model, crop), seed=2)
  enc_dir = tmp_path / "encoder_weights"
  m = config.model
  checkpoint.save_params(enc_dir, encoder, {"kind": "dinov2", "arch": {
      "width": m.width, "depth": m.depth, "num_heads": m.num_heads,
      "num_register_tokens": m.num_registers}})
  with config.unlocked():
    config.model.encoder_weights = str(enc_dir)
  wd = tmp_path / "wd"
  _write_state(wd, 7, trained)
  (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  loaded = loading.load(wd)
  info = loaded.describe()
  assert info["step"] == 7 and info["image_size"] == crop
  assert info["resize"] == config.data.resize and info["kind"] == "workdir"
  _same_tree(loaded.params, params_lib.merge(encoder, trained))
  with pytest.raises(CheckpointError, match="neither a training workdir"):
    loading.load(tmp_path)
  with pytest.raises(CheckpointError, match=f"--image_size 56: the model in .* at {crop}"):
    loading.load(wd, image_size=56)


def test_a_trained_workdir_scores_as_the_trainer_evaluated(tmp_path, fast_compile):
  """2 runlocal steps on a tiny dataset in MVTec layout: Inferencer(load(workdir)) gives the
  scores computed independently from the restored checkpoint (+ the run's random encoder),
  and its maps give the metrics the trainer's evaluation wrote to results.json."""
  root = str(tmp_path / "data")
  models.demo_class(root)  # MVTec layout: <root>/brick/{train,test,ground_truth}
  config = _runlocal_config()
  with config.unlocked():
    config.data.roots.mvtec, config.data.categories.mvtec = root, "brick"
  wd = tmp_path / "wd"
  report = train.train_and_evaluate(config, str(wd))
  samples = readers.read_dataset("mvtec", root, ["brick"], "test")
  loaded = loading.load(wd)
  assert loaded.source["step"] == config.train.total_steps
  results = list(Inferencer(loaded, batch_size=2).run([s.image_path for s in samples],
                                                       progress=False))
  assert all(r.error is None for r in results)
  maps = np.stack([r.anomaly_map for r in results])
  scores = np.array([r.score for r in results])

  ck = checkpoint.TrainCheckpointer(wd)
  state, step = ck.restore(log=pytest.fail)
  ck.close()
  assert step == config.train.total_steps
  model = factory.build_model(config.model)
  crop, resize = config.data.crop, config.data.resize
  # The trainer kept its random encoder beside the checkpoints (it cannot be named).
  encoder, meta = checkpoint.load_params(wd / loading.ENCODER_SUBDIR)
  assert meta["weights"] == loading.RANDOM and meta["seed"] == config.seed
  full = params_lib.merge(encoder, state["params"])
  images = np.stack([preprocess.load_image(s.image_path, resize, crop) for s in samples])
  want = jax.jit(lambda p, x: anomaly_map.maps_and_scores(
      model, p, x, image_size=crop, map_kind=settings.map_kind(config),
      top_ratio=config.eval.top_ratio))(
          full, images)
  np.testing.assert_allclose(scores, want["score"], rtol=1e-5)
  np.testing.assert_allclose(maps, want["anomaly_map"], rtol=1e-5, atol=1e-6)
  assert np.ptp(scores) > 1e-4

  masks = anomaly_map.resize_masks_to_map(np.stack(
      [loaded.preprocessing.mask(s.mask_path) for s in samples]))
  for cat, got in report["datasets"]["mvtec"]["classes"].items():
    rows = [i for i, s in enumerate(samples) if s.category == cat]
    ours = metrics.compute_metrics(maps[rows], masks[rows], [samples[i].label for i in rows],
                                   scores[rows], protocol=config.eval.protocol,
                                   gt_threshold=config.eval.gt_threshold)
    for name in metrics.IMAGE_METRICS:
      assert ours[name] == pytest.approx(got[name], abs=1e-9), (cat, name)
    for name in metrics.PIXEL_METRICS:
      assert ours[name] == pytest.approx(got[name], abs=1e-4), (cat, name)


def test_zero_shot_workdir_loads_its_source_with_the_inp_distance_map(tiny, tmp_path):
  """setting=zero_shot trains nothing: its workdir (config.json, an empty ckpt/) names the
  source model in config.init_from, which is loaded at this run's sizes and map kind."""
  config = mvtec.get_config("setting=zero_shot,source=realiad,runlocal=True")
  with config.unlocked():
    config.init_from = tiny
  wd = tmp_path / "zero_shot"
  (wd / checkpoint.CKPT_SUBDIR).mkdir(parents=True)
  (wd / "config.json").write_text(config.to_json_best_effort())
  loaded = loading.load(wd)
  # config.json holds eval.map null (by setting): it resolves as the run did.
  assert loaded.map_kind == "inp_distance" == settings.map_kind(config)
  assert config.eval.map is None and '"map": null' in (wd / "config.json").read_text()
  assert loaded.scoring == {"image_size": config.data.crop, "map_kind": "inp_distance",
                            "top_ratio": config.eval.top_ratio}
  assert loaded.preprocessing == preprocess.Preprocessing(config.data.resize, config.data.crop)
  _same_tree(loaded.params, checkpoint.load_params(tiny)[0])
  with config.unlocked():
    config.init_from = str(tmp_path / "missing")
  (wd / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(CheckpointError, match="config.init_from .*missing does not exist"):
    loading.load(wd)


# ---------------------------------------------------------------------------------------
# Unusable paths.
# ---------------------------------------------------------------------------------------


def test_unusable_paths_are_explained(tmp_path):
  with pytest.raises(CheckpointError, match=r"--checkpoint .*nope does not exist"):
    loading.load(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="empty is neither a training workdir") as e:
    loading.load(tmp_path / "empty")
  assert "single-class" not in str(e.value)
  per_class = tmp_path / "single_class_run"
  for cat in ("bottle", "cable"):
    (per_class / "mvtec" / cat / checkpoint.CKPT_SUBDIR).mkdir(parents=True)
    (per_class / "mvtec" / cat / "config.json").write_text("{}")
  (per_class / "config.json").write_text("{}")  # the trainer writes one at the top too
  with pytest.raises(CheckpointError, match="neither a training workdir") as e:
    loading.load(per_class)
  assert (f"single-class runs keep one workdir per class, e.g. {per_class / 'mvtec' / 'bottle'}"
          in str(e.value))
  half = tmp_path / "half"
  (half / checkpoint.CKPT_SUBDIR).mkdir(parents=True)
  with pytest.raises(CheckpointError, match="has ckpt/ but no config.json"):
    loading.load(half)
  (half / "config.json").write_text(_runlocal_config().to_json_best_effort())
  with pytest.raises(CheckpointError, match="holds no readable checkpoint; train first"):
    loading.load(half)


def test_calibration_mismatch_warns_on_stderr(tiny, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(tiny, ckpt)
  loaded = loading.load(ckpt, image_size=CROP)
  assert loaded.calibration is None
  good = {"checkpoint_id": loaded.source["checkpoint_id"], "image_size": CROP,
          "map_kind": "reconstruction", "top_ratio": 0.01, "image": {"threshold": 1.0}}
  (ckpt / "calibration.json").write_text(json.dumps(good))
  capsys.readouterr()
  assert loading.load(ckpt, image_size=CROP).calibration == good
  assert capsys.readouterr() == ("", "")
  stale = dict(good, checkpoint_id="0123456789ab", image_size=99)
  (tmp_path / "other.json").write_text(json.dumps(stale))
  loaded = loading.load(ckpt, image_size=CROP, calibration=tmp_path / "other.json")
  assert loaded.calibration == stale
  out, err = capsys.readouterr()
  assert out == ""
  assert (f"other.json was made for checkpoint 0123456789ab, this is "
          f"{loaded.source['checkpoint_id']}") in err
  assert f"other.json was made with image_size=99, predicting with {CROP}" in err


# ---------------------------------------------------------------------------------------
# What the trainer shares: config.init_from and a run's encoder.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runlocal():
  """(config, model, trainable params as numpy) of the runlocal model."""
  config = _runlocal_config()
  model = factory.build_model(config.model)
  return config, model, models.fill(loading.abstract_trainable(model, config.data.crop), seed=3)


def test_init_from_a_params_dir_replaces_only_the_entries_it_provides(runlocal, tmp_path):
  config, model, trainable = runlocal
  src = models.fill(factory.abstract_encoder(model, config.data.crop), seed=4)
  new_inps = np.full_like(trainable["prototype_token"], 0.5)
  checkpoint.save_params(tmp_path / "some", {"prototype_token": new_inps, "encoder": src},
                         {"kind": "inpformer"})
  got, step = loading.init_trainable_from(str(tmp_path / "some"), trainable, None)
  assert step is None and sorted(got) == sorted(trainable)  # the encoder entry is dropped
  np.testing.assert_array_equal(got["prototype_token"], new_inps)
  _same_tree({k: v for k, v in got.items() if k != "prototype_token"},
             {k: v for k, v in trainable.items() if k != "prototype_token"})
  # A whole model (a converted official one) replaces every trainable entry.
  full = models.fill(models.full_abstract(model, config.data.crop), seed=5)
  checkpoint.save_params(tmp_path / "full", full, {"kind": "inpformer"})
  got, _ = loading.init_trainable_from(str(tmp_path / "full"), trainable, None)
  _same_tree(got, params_lib.split(full)[1])


def test_init_from_refusals_name_the_fix(runlocal, tmp_path):
  config, model, trainable = runlocal
  checkpoint.save_params(tmp_path / "dino", models.fill(factory.abstract_encoder(
      model, config.data.crop)), {"kind": "dinov2", "arch": {}})
  with pytest.raises(CheckpointError, match="DINOv2 encoder only; pass it as "
                     r"--config.model.encoder_weights=.*dino"):
    loading.init_trainable_from(str(tmp_path / "dino"), trainable, None)
  bad = dict(trainable, prototype_token=np.zeros((5, 32), np.float32))
  checkpoint.save_params(tmp_path / "bad", bad, {"kind": "inpformer"})
  with pytest.raises(CheckpointError, match=r"wrong shape \(1\): \['prototype_token: "
                     r"\(5, 32\), expected \(6, 32\)'\]"):
    loading.init_trainable_from(str(tmp_path / "bad"), trainable, None)
  checkpoint.save_params(tmp_path / "alien", {"head": np.zeros(3, np.float32)},
                         {"kind": "inpformer"})
  with pytest.raises(CheckpointError, match=r"entries \['head'\] are not in the model"):
    loading.init_trainable_from(str(tmp_path / "alien"), trainable, None)
  with pytest.raises(CheckpointError, match="does not exist"):
    loading.init_trainable_from(str(tmp_path / "nope"), trainable, None)


def test_init_from_a_workdir_gives_its_newest_step(runlocal, tmp_path):
  _, _, trainable = runlocal
  older = jax.tree.map(lambda x: x + 1, trainable)
  newer = jax.tree.map(lambda x: x + 2, trainable)
  wd = tmp_path / "wd"
  _write_state(wd, 3, older)
  abstract = _write_state(wd, 5, newer)
  (wd / "config.json").write_text("{}")
  got, step = loading.init_trainable_from(str(wd), trainable, abstract)
  assert step == 5
  _same_tree(got, newer)


def test_encoder_params_order(runlocal, tmp_path):
  """WORKDIR/encoder/ first, then config.init_from's encoder, then config ('random': the
  seeded init)."""
  config, model, _ = runlocal
  crop = config.data.crop
  abstract = factory.abstract_encoder(model, crop)
  seeded = factory.random_encoder(model, config.seed, crop)
  got, where = loading.encoder_params(config, model, tmp_path / "no_encoder_here")
  assert where == loading.RANDOM
  _same_tree(got, seeded)
  got, _ = loading.encoder_params(_runlocal_config(seed=config.seed + 1), model)
  assert not np.array_equal(got["cls_token"], seeded["cls_token"])  # the seed matters

  source = models.fill(models.full_abstract(model, crop), seed=6)
  checkpoint.save_params(tmp_path / "source", source, {"kind": "inpformer"})
  with_init = _runlocal_config(init_from=str(tmp_path / "source"))
  got, where = loading.encoder_params(with_init, model)
  assert where == f"from init_from ({tmp_path / 'source'})"
  _same_tree(got, source["encoder"])

  saved = models.fill(abstract, seed=7)
  checkpoint.save_params(tmp_path / "wd" / loading.ENCODER_SUBDIR, saved,
                         {"kind": "encoder", "weights": "saved by the test"})
  for c in (config, with_init):
    got, where = loading.encoder_params(c, model, tmp_path / "wd")
    assert where == "saved by the test"
    _same_tree(got, saved)
