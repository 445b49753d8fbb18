"""The paper's tables -> the runs that reproduce them, or the reason a part is not ours to run.

A table file (`paper_tables.json`, a copy of the extracted supplementary tables S1-S17) has,
per table: setting, dataset, encoder, image_size ("R448-C392" = resize 448, centre crop 392),
shots, and rows. How a table's rows are read is decided by its shape, not its name, so a
table file of the same shape for other data (the demo rehearsal) maps the same way:

  row_config            rows keyed by variant, each its own run (S1, S4)
  image_size null       rows keyed by image size, each its own run (S2)
  setting a list        rows keyed by setting, then dataset (S5)
  dataset a list        rows keyed by method, then dataset (S6-S8)
  dataset a string      rows keyed by class, then method (S12-S17) or metric (S9-S11)

Only the INP-Former rows/columns are ours; every other method's numbers are the paper's
quotes of other code (a stated reason, not a run).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from inpformer_jax import errors
from inpformer_jax import metrics as metrics_lib

PAPER_FILE = Path(__file__).with_name("paper_tables.json")
OURS = "INP-Former"
MEAN = "mean"
# S1's column: the mean of the seven metrics of the dataset's Mean row.
MAD = "mAD"
# Columns no run measures: model size and compute, not anomaly-detection results.
COST_COLUMNS = ("Params(M)", "FLOPs(G)")
# The table files' dataset keys -> this project's dataset names (configs/common.py roots).
DATASET_NAMES = {"real_iad": "realiad"}
# S8 does not name the dataset the zero-shot model was trained on; the official script's
# default source (and the README's commands) is Real-IAD.
ZERO_SHOT_SOURCE = "realiad"
_SIZE = re.compile(r"R(\d+)(?:-C(\d+))?")


class TableError(errors.UserError, ValueError):
  """A table name or table file that cannot be mapped; names the table and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training (and evaluation) run: one workdir under the reproduction's workdir."""
  datasets: tuple[str, ...]
  setting: str
  encoder: str
  resize: int
  crop: int
  shots: int | None = None
  source: str | None = None  # zero-shot: the dataset of the source model (another run)

  @property
  def key(self) -> str:
    """The run's workdir name, e.g. mvtec_multi_class_vit_base_R448-C392."""
    setting = {"few_shot": f"few_shot{self.shots}",
               "zero_shot": f"zero_shot_from_{self.source}"}.get(self.setting, self.setting)
    enc = self.encoder.removeprefix("dinov2reg_").removesuffix("_14")
    return f"{'-'.join(self.datasets)}_{setting}_{enc}_R{self.resize}-C{self.crop}"

  @property
  def source_run(self) -> Run | None:
    """The multi-class run whose model a zero-shot run evaluates."""
    if self.setting != "zero_shot":
      return None
    return Run((self.source,), "multi_class", self.encoder, self.resize, self.crop)


@dataclasses.dataclass(frozen=True)
class Section:
  """Rows of one table set against one run's results for one dataset."""
  table: str
  label: str
  run: Run
  dataset: str
  paper: dict  # row (class or 'mean') -> metric -> percent (None: not printed)


@dataclasses.dataclass(frozen=True)
class TableMap:
  name: str
  title: str
  sections: tuple[Section, ...]
  not_ours: tuple[str, ...]  # what of the table is not reproduced, and why


def load_paper(path: str | Path | None = None) -> dict:
  """The table file (default: the copy shipped in the package)."""
  path = Path(path or PAPER_FILE)
  try:
    paper = json.loads(path.read_text())
  except FileNotFoundError:
    raise TableError(f"--paper {path}: no such file") from None
  except json.JSONDecodeError as e:
    raise TableError(f"--paper {path}: not JSON ({e})") from None
  if not isinstance(paper.get("tables"), dict) or not paper["tables"]:
    raise TableError(f"--paper {path}: no 'tables' object (the layout of {PAPER_FILE.name})")
  return paper


def select(paper: dict, spec: str) -> list[str]:
  """'all' or 'S9,S12' -> table names in the file's order; an unknown name is an error."""
  known = list(paper["tables"])
  names = known if spec.strip().lower() == "all" else [
      n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise TableError(f"--tables={spec!r}: name tables, e.g. --tables=S12,S13 or --tables=all")
  unknown = [n for n in names if n not in known]
  if unknown:
    raise TableError(f"--tables: no table {', '.join(unknown)} in the table file; it has "
                     f"{', '.join(known)} (or --tables=all)")
  return [n for n in known if n in names]


def parse_size(text: str) -> tuple[int, int]:
  """'R448-C392' -> (448, 392); 'R224' -> (224, 224)."""
  m = _SIZE.fullmatch(text)
  if not m:
    raise TableError(f"image size {text!r}: expected R<resize>-C<crop> or R<side>")
  return int(m.group(1)), int(m.group(2) or m.group(1))


def dataset_name(key: str) -> str:
  return DATASET_NAMES.get(key, key)


def map_table(name: str, table: dict) -> TableMap:
  """One table -> the sections that compare our runs with it, and what is not ours."""
  setting, rows = table.get("setting"), table["rows"]
  not_ours = []
  costs = [c for c in COST_COLUMNS if c in (table.get("columns") or ())]
  if costs:
    not_ours.append(f"{'/'.join(costs)}: model size and compute of the authors' code, not "
                    "results of a run; not reproduced (a run's config.json names its encoder; "
                    "ViT-B has 68.5 M trainable parameters, docs/reproduce.md)")
  if "row_config" in table:
    sections = _per_variant(name, table)
  elif table.get("image_size") is None and table.get("encoder"):
    sections = [_section(name, key, _run(table, table["dataset"], setting, size=key),
                         table["dataset"], {MEAN: _metrics(v)}) for key, v in rows.items()]
  elif isinstance(setting, list):
    sections = _per_setting(name, table)
    if "delta" in rows:
      not_ours.append("delta row: not compared on its own; it is the difference of the two "
                      "rows compared above (ours: the same difference of our two runs)")
  elif isinstance(table.get("dataset"), list):
    sections = _per_method_dataset(name, table)
  else:
    sections = _per_class(name, table)
  others = _other_methods(table)
  if others:
    not_ours.append(f"{', '.join(others)}: other methods' numbers as the paper quotes them; "
                    "not ours to run")
  if not sections:
    not_ours.append("no INP-Former result in this table: nothing of it is ours to reproduce")
  return TableMap(name, table.get("title", ""), tuple(sections), tuple(not_ours))


def map_tables(paper: dict, names: list[str]) -> list[TableMap]:
  return [map_table(n, paper["tables"][n]) for n in names]


def runs_of(maps: list[TableMap]) -> list[Run]:
  """Every run the tables need, once, a zero-shot run's source run before it."""
  out = []
  for m in maps:
    for s in m.sections:
      for run in (s.run.source_run, s.run):
        if run is not None and run not in out:
          out.append(run)
  return sorted(out, key=lambda r: r.setting == "zero_shot")


# ---------------------------------------------------------------------------------------
# Table shapes.
# ---------------------------------------------------------------------------------------


def _run(table: dict, dataset, setting: str, *, size: str | None = None,
         encoder: str | None = None) -> Run:
  resize, crop = parse_size(size or table["image_size"])
  datasets = tuple(dataset_name(d) for d in (dataset if isinstance(dataset, list)
                                             else [dataset]))
  source = None
  if setting == "zero_shot":
    source = ZERO_SHOT_SOURCE if ZERO_SHOT_SOURCE not in datasets else "visa"
  return Run(datasets, setting, encoder or table["encoder"], resize, crop,
             shots=table.get("shots") if setting == "few_shot" else None, source=source)


def _section(name, label, run, dataset, paper) -> Section:
  return Section(name, label, run, dataset_name(dataset), paper)


def _metrics(values: dict) -> dict:
  """The result columns of a row (the cost columns dropped)."""
  return {k: v for k, v in values.items() if k not in COST_COLUMNS}


def _per_variant(name, table):
  """S1/S4: each INP-Former variant row is its own run (row_config gives what differs)."""
  out = []
  for label, conf in table["row_config"].items():
    run = _run(table, table["dataset"], table["setting"], size=conf.get("image_size"),
               encoder=conf.get("encoder"))
    out.append(_section(name, label, run, table["dataset"], {MEAN: _metrics(table["rows"][label])}))
  return out


def _per_setting(name, table):
  """S5: setting -> dataset -> metrics; the Δ row is the difference of the two others."""
  out = []
  for setting in table["setting"]:
    run = _run(table, table["dataset"], setting) if setting == "super_multi_class" else None
    for dataset, values in table["rows"][setting].items():
      r = run or _run(table, dataset, setting)
      out.append(_section(name, f"{setting}, {dataset}", r, dataset, {MEAN: _metrics(values)}))
  return out


def _per_method_dataset(name, table):
  """S6-S8: method -> dataset -> metrics; ours is the INP-Former row, one run per dataset."""
  ours = table["rows"].get(OURS, {})
  return [_section(name, f"{OURS}, {dataset}", _run(table, dataset, table["setting"]), dataset,
                   {MEAN: _metrics(values)}) for dataset, values in ours.items()]


def _per_class(name, table):
  """S9-S17: class -> (method ->) metrics, one run for the dataset."""
  rows = {}
  for cls, values in table["rows"].items():
    if all(isinstance(v, dict) for v in values.values()):
      if OURS not in values:
        continue
      values = values[OURS]
    rows[cls] = _metrics(values)
  if not rows:
    return []
  return [_section(name, f"{OURS}, {table['dataset']}",
                   _run(table, table["dataset"], table["setting"]), table["dataset"], rows)]


def _other_methods(table: dict) -> list[str]:
  """The methods other than INP-Former (and its variants) whose rows/columns the table has."""
  rows = table["rows"]
  if "methods" in table:
    names = list(table["methods"])
  elif "row_config" in table:
    names = [r for r in rows if r not in table["row_config"]]
  elif isinstance(table.get("setting"), list):
    names = []
  elif isinstance(table.get("dataset"), list) or table.get("encoder") is None:
    names = list(rows)
  else:
    names = []
  return [n for n in names if not n.startswith(OURS)]


def metric_names(section: Section) -> list[str]:
  """The section's metrics in the paper's order (the seven, a subset, or mAD)."""
  present = {m for values in section.paper.values() for m in values}
  return [m for m in (*metrics_lib.METRIC_NAMES, MAD) if m in present]
