"""The dry run: every run of the paper's tables with steps, images and a time from rates."""

import json

from inpformer_jax.reproduce import __main__ as cli_main
from inpformer_jax.reproduce import plan
from inpformer_jax.reproduce import tables


def _planned():
  paper = tables.load_paper()
  return plan.plan(tables.runs_of(tables.map_tables(paper, tables.select(paper, "all"))))


def test_steps_and_images_follow_the_official_recipes():
  by = {p.run.key: p for p in _planned()}
  mvtec = by["mvtec_multi_class_vit_base_R448-C392"]
  # SPEC §6: 3629 images -> 226 steps per epoch x 200 = 45,200; few-shot 15 x k x 22 images.
  assert (mvtec.steps, mvtec.train_images, mvtec.test_images) == (45200, 3629, 1725)
  assert mvtec.counted == "known sizes"
  assert by["mvtec_few_shot2_vit_base_R448-C392"].train_images == 15 * 2 * 22
  assert by["mvtec_single_class_vit_base_R448-C392"].steps == 200 * sum(
      n // 16 for n in plan.MVTEC_TRAIN.values())
  assert by["visa_zero_shot_from_realiad_vit_base_R448-C392"].steps == 0
  s224 = by["mvtec_multi_class_vit_base_R256-C224"].config
  assert (s224.data.resize, s224.data.crop, s224.model.encoder) == (
      256, 224, "dinov2reg_vit_base_14")
  assert by["mvtec_multi_class_vit_large_R448-C392"].config.model.encoder.endswith("large_14")
  # The authors' figure is the R448-C392 MVTec run itself.
  assert abs(plan.paper_gpu_hours(mvtec) - 3.5) < 1e-9


def test_dry_run_all_tables_with_rates_from_a_file(tmp_path, capsys):
  rates = {p.rate_key: {"steps_per_sec": 4.0} for p in _planned()}
  del rates[next(k for k in rates if "large" in k)]
  (tmp_path / "rates.json").write_text(json.dumps(rates))
  argv = ["--tables=all", f"--workdir={tmp_path / 'w'}", "--dry_run",
          f"--rates={tmp_path / 'rates.json'}"]
  assert cli_main.main(argv) == 0
  out = capsys.readouterr().out
  assert "S3: no run" in out and "measuring" not in out
  line = next(l for l in out.splitlines() if l.startswith("mvtec_multi_class_vit_base_R448-C392"))
  assert line.split()[1:4] == ["45200", "3629", "1725"]
  assert f"{(45200 + 0.5 * 108) / 4 / 3600:.1f}h" in line  # 108 test batches of 16
  assert "large_14 float32 crop 392 batch 16 on cpu x1: none (not measured, not in --rates)" in out
  total = out.splitlines()[-1]
  assert total.startswith("all of S1-S17 on this machine: ") and "(1 runs without a rate)" in total
  assert "24 runs" in total and not (tmp_path / "w").exists()  # nothing written


def test_a_second_dry_run_reads_the_cached_rates(tmp_path):
  planned = _planned()[:2]
  cache = {p.rate_key: {"steps_per_sec": 2.0, "what": "cached"} for p in planned}
  (tmp_path / plan.RATES_FILE).write_text(json.dumps(cache))

  def no_measuring(msg):  # a measurement of ViT-B/392 here would take minutes
    raise AssertionError(msg)

  plan.estimate(planned, tmp_path, log=no_measuring)
  # Real-IAD multi-class: 455,800 steps, 114,585 test images = 7,162 batches of 16 at half a step.
  assert planned[0].steps == 455800
  assert planned[0].seconds == (455800 + 0.5 * 7162) / 2.0

