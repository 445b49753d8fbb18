"""The paper's tables -> runs: every table mapped (or a stated reason), the shipped copy exact."""

import json

import pytest

from inpformer_jax.reproduce import tables
from tests.conftest import REPO, in_ci

SHARED = REPO.parent / "shared" / "paper" / "inpformer_tables.json"


def test_the_shipped_table_file_is_the_extracted_one():
  if not SHARED.is_file():
    msg = f"{SHARED} is missing: put ../shared beside the clone"
    if in_ci():
      pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)
  assert json.loads(tables.PAPER_FILE.read_text()) == json.loads(SHARED.read_text())


def test_every_table_maps_to_runs_or_a_stated_reason():
  paper = tables.load_paper()
  maps = tables.map_tables(paper, tables.select(paper, "all"))
  assert [m.name for m in maps] == [f"S{i}" for i in range(1, 18)]
  for m in maps:
    assert m.sections or m.not_ours, m.name
    for s in m.sections:
      assert s.paper and tables.metric_names(s), (m.name, s.label)
  by = {m.name: m for m in maps}
  assert not by["S3"].sections and "no INP-Former" in by["S3"].not_ours[-1]
  # One run serves several tables: S12/S13, S5's multi-class MVTec column, S2/S4's defaults.
  key = "mvtec_multi_class_vit_base_R448-C392"
  for name, label in (("S12", None), ("S13", None), ("S5", "multi_class, mvtec"),
                      ("S2", "R448-C392"), ("S4", "ViT-Base")):
    assert key in {s.run.key for s in by[name].sections if label in (None, s.label)}, name
  assert [s.run.key for s in by["S1"].sections] == [
      "realiad_multi_class_vit_base_R448-C392", "realiad_multi_class_vit_small_R448-C392",
      "realiad_multi_class_vit_small_R256-C224"]
  assert {(s.run.resize, s.run.crop) for s in by["S2"].sections} == {
      (224, 224), (256, 224), (280, 280), (320, 280), (392, 392), (448, 392)}
  assert {s.run.shots for s in by["S7"].sections} == {2}
  assert {s.run.source_run.key for s in by["S8"].sections} == {key.replace("mvtec", "realiad")}
  assert len(by["S11"].sections[0].paper) == 31  # 30 classes and the mean
  # Competitors' numbers and the cost columns are named as not reproduced.
  assert any("Dinomaly" in n for n in by["S13"].not_ours)
  assert any(n.startswith("RD4AD, UniAD") for n in by["S1"].not_ours)
  assert any("Params(M)" in n for n in by["S4"].not_ours)
  runs = tables.runs_of(maps)
  assert len(runs) == len({r.key for r in runs}) == 24
  assert runs.index(runs[-1].source_run) < len(runs) - 1  # zero-shot after its source


def test_an_unknown_table_name_is_a_user_error():
  paper = tables.load_paper()
  with pytest.raises(tables.TableError, match="no table S18 .* it has S1, S2"):
    tables.select(paper, "S12,S18")
  assert tables.select(paper, "S13, S12") == ["S12", "S13"]
