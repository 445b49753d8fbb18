"""The CPU rehearsal: the command on tiny demo-class data in runlocal mode, a multi-class and a
few-shot run, stopped after the first run and resumed, the comparison printed."""

import json

from inpformer_jax import train
from inpformer_jax.reproduce import __main__ as cli_main
from inpformer_jax.reproduce import plan
from inpformer_jax.reproduce import run
from inpformer_jax.reproduce import tables
from tests import browser
from tests.runlocal import make_mvtec_like

CLASSES = ("brick", "grass")  # the demo's class names
MULTI = "demo_multi_class_vit_base_R448-C392"
FEW = "demo_few_shot1_vit_base_R448-C392"


def _table_file(path):
  """Two tables of the paper's shapes (S12: class -> method -> metrics; S6: method ->
  dataset -> metrics) with the demo's classes."""
  image = {"I-AUROC": 90.0, "I-AP": 91.0, "I-F1max": 80.0}
  rows = {c: {"Other": image, "INP-Former": image} for c in (*CLASSES, "mean")}
  common = {"encoder": "dinov2reg_vit_base_14", "image_size": "R448-C392", "dataset": "demo"}
  seven = dict(image, **{"P-AUROC": 95.0, "P-AP": 40.0, "P-F1max": 45.0, "AUPRO": 85.0})
  paper = {"tables": {
      "D12": dict(common, title="multi-class, image level", setting="multi_class",
                  methods={"Other": {}, "INP-Former": {}}, rows=rows),
      "D6": dict(common, title="1-shot", setting="few_shot", shots=1, dataset=["demo"],
                 rows={"Other": {"demo": seven}, "INP-Former": {"demo": seven}})}}
  path.write_text(json.dumps(paper))
  return str(path)


def test_rehearsal_stops_resumes_and_compares(tmp_path, capsys, fast_compile):
  data = make_mvtec_like(tmp_path / "demo", defect="scratch", classes=CLASSES)
  work, paper = tmp_path / "w", _table_file(tmp_path / "t.json")
  # Uncached: the programs (and so the compilation cache entries) of the engine's runlocal
  # tests.
  overrides = [f"data.roots.demo={data}", "train.cache_features=False"]
  maps = tables.map_tables(tables.load_paper(paper), ["D12", "D6"])
  planned = plan.plan(tables.runs_of(maps), overrides, runlocal=True)
  assert [p.run.key for p in planned] == [MULTI, FEW]
  assert [p.train_images for p in planned] == [8, 2 * 22] and planned[0].counted == "files"
  # A first invocation runs only the multi-class run (as if the job ended after it); the
  # second skips it and runs the rest. One Recipes: the two runs' steps compile once.
  recipes = train.Recipes()
  assert run.execute(planned, work, only=[MULTI], recipes=recipes) == [MULTI]
  assert (work / MULTI / "results.json").is_file() and not (work / FEW).exists()
  assert run.execute(planned, work, recipes=recipes) == [MULTI, FEW]
  out = capsys.readouterr().out
  assert f"{FEW}: not in --only" in out and f"{MULTI}: finished, skipped" in out
  # The dry run's measured rate (runlocal: one model for both runs; its compiled step reused).
  rates = plan.estimate(planned, work, measure_steps=1, recipes=recipes)
  (rate,) = rates.values()
  assert rate["steps_per_sec"] > 0 and rate["measured_steps"] == 1
  assert json.loads((work / plan.RATES_FILE).read_text()) == rates
  assert all(p.seconds > 0 for p in planned)
  assert "measuring: " in capsys.readouterr().out
  # The command: both finished and skipped, the comparison printed and written.
  argv = ["--tables=all", f"--workdir={work}", f"--paper={paper}", "--runlocal",
          *(f"--config_overrides={o}" for o in overrides)]
  assert cli_main.main(argv) == 0
  out = capsys.readouterr().out
  assert f"{FEW}: finished, skipped" in out
  assert "## D12" in out and "## D6" in out and "not reproduced: Other" in out
  assert {p.name for p in work.glob("comparison.*")} == {
      "comparison.md", "comparison.csv", "comparison.json"}
  # The same as a page, in a browser: the tables, and each run's own page linked.
  page = browser.render(work / "report.html")
  assert "D12: multi-class, image level" in page["text"] and "I-AUROC" in page["headers"]
  assert f"{MULTI} (run {MULTI})" not in page["text"]  # labels, not keys twice
  assert (work / MULTI / "report.html").is_file() and f'href="{MULTI}/report.html"' in (
      work / "report.html").read_text()
  cmp = json.loads((work / "comparison.json").read_text())
  ours = json.loads((work / MULTI / "results.json").read_text())["datasets"]["demo"]
  (d12,) = cmp["tables"][0]["sections"]
  (res,) = d12["results"]
  assert res["protocol"] == "official" and res["compared"] == 9
  brick = res["rows"][0]
  assert brick["row"] == "brick"
  cell = brick["metrics"]["I-AUROC"]
  assert cell["ours"] == round(100 * ours["classes"]["brick"]["I-AUROC"], 1)
  assert cell["diff"] == round(cell["ours"] - 90.0, 1)
  assert cell["flag"] == (abs(cell["diff"]) > 1.0)
  few = cmp["tables"][1]["sections"][0]["results"][0]
  assert few["compared"] == 7 and few["step"] == 2


def test_missing_dataset_roots_are_one_error_before_any_run(tmp_path, capsys):
  argv = ["--tables=S8", f"--workdir={tmp_path / 'w'}",
          f"--config_overrides=data.roots.mvtec={tmp_path / 'no_mvtec'}"]
  assert cli_main.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: dataset roots not found")
  assert f"data.roots.mvtec=PATH: '{tmp_path / 'no_mvtec'}' is not a folder (needed by " \
         "mvtec_zero_shot_from_realiad_vit_base_R448-C392)" in err
  assert "data.roots.realiad=PATH" in err and "data.roots.visa=PATH" in err
  assert not (tmp_path / "w").exists()
