"""Ours vs the paper from results.json files: values, differences, flags, mAD, re-evaluations."""

import csv
import io
import json

from inpformer_jax import metrics
from inpformer_jax.reproduce import compare
from inpformer_jax.reproduce import tables


def _results(path, per_class, protocol="official", gt=0.5):
  mean = {n: sum(m[n] for m in per_class.values()) / len(per_class) for n in metrics.METRIC_NAMES}
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps({
      "info": {"setting": "multi_class", "protocol": protocol, "gt_threshold": gt, "step": 9,
               "encoder_weights": "w"},
      "datasets": {"realiad": {"classes": per_class, "mean": mean}}}))


def test_values_differences_flags_and_protocols(tmp_path):
  paper = tables.load_paper()
  maps = tables.map_tables(paper, ["S1", "S17"])
  run = maps[1].sections[0].run.key
  classes = list(paper["tables"]["S17"]["rows"])[:-1]
  ours = {c: {n: 0.9 for n in metrics.METRIC_NAMES} for c in classes}
  ours["audiojack"]["P-AP"] = 0.5393  # paper 54.6 (from 53.9 to 54.6: 0.7, not flagged)
  ours["audiojack"]["AUPRO"] = 0.9  # paper 95.x: flagged
  _results(tmp_path / run, ours)
  _results(tmp_path / run / "eval_exact", ours, protocol="exact", gt=0.0)
  cmp = compare.compare(maps, tmp_path)
  s1 = cmp["tables"][0]["sections"]
  assert s1[0]["run"] == run and [s["status"] for s in s1] == ["compared", "not run yet",
                                                              "not run yet"]
  (mad,) = s1[0]["results"][0]["rows"]
  # mAD = mean of the seven means: six at 90, P-AP (29 x 90 + 53.93) / 30 = 88.80 -> 89.83.
  assert mad["metrics"]["mAD"]["ours"] == 89.8 and mad["metrics"]["mAD"]["paper"] == 78.8
  results = cmp["tables"][1]["sections"][0]["results"]
  assert [(r["source"], r["protocol"], r["gt_threshold"]) for r in results] == [
      (f"{run}/results.json", "official", 0.5), (f"{run}/eval_exact/results.json", "exact", 0.0)]
  audio = results[0]["rows"][0]["metrics"]
  assert audio["P-AP"] == {"ours": 53.9, "paper": 54.6, "diff": -0.7, "flag": False}
  assert audio["AUPRO"]["flag"] and audio["AUPRO"]["diff"] < -1
  assert results[0]["compared"] == 31 * 4
  md = compare.to_markdown(cmp)
  assert "| audiojack | " in md and "**90.0 (" in md and "53.9 (54.6, -0.7)" in md
  assert "protocol exact, GT > 0.0" in md and "not run yet" in md
  rows = list(csv.DictReader(io.StringIO(compare.to_csv(cmp))))
  assert len(rows) == 2 * (1 + 31 * 4)  # two results.json: S1 mAD + S17 classes x 4
  assert {r["flag"] for r in rows if r["row"] == "audiojack" and r["metric"] == "AUPRO"} == {"1"}
  assert sorted(p.name for p in compare.write(cmp, tmp_path)) == [
      "comparison.csv", "comparison.json", "comparison.md", "report.html"]
  # The page marks exactly the cells past tolerance.
  html = (tmp_path / "report.html").read_text()
  assert html.count('<td class="flag">') == sum(
      c["flag"] for t in cmp["tables"] for s in t["sections"] for r in s["results"]
      for row in r["rows"] for c in row["metrics"].values()) > 0


def test_comparison_of_a_workdir_in_one_call(tmp_path):
  cmp = compare.comparison(tmp_path, "S12,S3")
  assert [t["table"] for t in cmp["tables"]] == ["S3", "S12"]
  assert cmp["tables"][0]["sections"] == [] and cmp["tables"][0]["not_ours"]
  assert cmp["tables"][1]["sections"][0]["status"] == "not run yet"
