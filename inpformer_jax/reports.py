"""What a run writes for people: results.{json,md,csv}, report.html, train_metrics.jsonl.

  results.json  per dataset, per class, the seven metrics, the means, protocol and encoder
  results.md    the paper's per-class table (x100, one decimal) with the Mean row
  results.csv   one row per class and per dataset mean
  report.html   the table, curves, histograms and gallery (`report_page`; report_files/)
  train_metrics.jsonl (+ tensorboard/ when tensorboardX is installed)  one row per log step
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import jax

from inpformer_jax import metrics as metrics_lib
from inpformer_jax import report_page

METRICS_FILE = "train_metrics.jsonl"


# ---------------------------------------------------------------------------------------
# Results tables.
# ---------------------------------------------------------------------------------------


def with_means(results: dict[str, dict[str, dict]]) -> dict:
  """{dataset: {category: m}} -> {dataset: {"classes": ..., "mean": macro average}} (the mean
  of each metric over the classes where it is defined, as the paper's Mean rows)."""
  return {dataset: {"classes": per_class,
                    "mean": {k: float(v) for k, v in
                             metrics_lib.macro_average(per_class).items()}}
          for dataset, per_class in results.items()}


def write_reports(results: dict[str, dict[str, dict]], workdir: str | os.PathLike,
                  info: dict) -> dict:
  """Writes results.{json,md,csv} and report.html into `workdir`; returns the JSON object.

  info: what produced the numbers (setting, protocol, gt_threshold, encoder, step, ...).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = metrics_lib.METRIC_NAMES
  # Undefined metrics (e.g. pixel metrics of a class without masks) are null, not NaN.
  report = _nan_to_none({"info": info, "metrics": list(names), "notes": notes(results),
                         "datasets": with_means(results)})
  _atomic_write(workdir / "results.json", json.dumps(report, indent=2, allow_nan=False))
  _atomic_write(workdir / "results.md", markdown_table(report))
  rows = [["dataset", "category", *names]]
  for dataset, d in report["datasets"].items():
    for category, m in list(d["classes"].items()) + [("Mean", d["mean"])]:
      rows.append([dataset, category, *["" if _missing(m.get(n)) else f"{m[n]:.6f}"
                                        for n in names]])
  tmp = workdir / "results.csv.tmp"
  with open(tmp, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  tmp.replace(workdir / "results.csv")
  report_page.write_eval_page(workdir, report, results)
  return report


def markdown_table(report: dict) -> str:
  """The paper's per-class layout: one table per dataset, metrics in %, a Mean row."""
  info, names = report["info"], metrics_lib.METRIC_NAMES
  lines = [f"# Results ({info.get('setting', '')})", ""]
  lines.append(", ".join(f"{k}: {v}" for k, v in info.items()))
  for note in report.get("notes", ()):
    lines += ["", f"Note: {note}"]
  for dataset, d in report["datasets"].items():
    lines += ["", f"## {dataset}", "",
              "| Category | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for category, m in d["classes"].items():
      lines.append(f"| {category} | " + " | ".join(_pct(m.get(n)) for n in names) + " |")
    lines.append("| **Mean** | " + " | ".join(f"**{_pct(d['mean'].get(n))}**"
                                              for n in names) + " |")
  return "\n".join(lines) + "\n"


def notes(results: dict[str, dict[str, dict]]) -> list[str]:
  """Why metrics are absent: one line per dataset with classes evaluated without masks (the
  per-class `metrics.Metrics.info` of `evaluate`)."""
  out = []
  for dataset, per_class in results.items():
    bare = [c for c, m in per_class.items()
            if getattr(m, "info", {}).get("pixel_metrics") is False]
    if bare:
      which = "all classes" if len(bare) == len(per_class) else "classes " + ", ".join(bare)
      out.append(f"pixel metrics: no masks for {dataset} ({which}): its test set has no "
                 f"ground_truth/ (config.data.masks.{dataset}=False), so only image metrics "
                 "are reported and the pixel ones are null")
  return out


def _missing(x) -> bool:
  return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x) -> str:
  return "-" if _missing(x) else f"{100 * x:.1f}"


def _nan_to_none(x):
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  return None if _missing(x) else x


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


# ---------------------------------------------------------------------------------------
# Training metrics.
# ---------------------------------------------------------------------------------------


class TrainLog:
  """Appends JSON rows to WORKDIR/train_metrics.jsonl, and TensorBoard scalars (process 0).

  resume_step: the step a resumed run restarts from; rows after it were written by the
  interrupted run and are dropped (the resumed run recomputes them). None: a fresh log.
  """

  def __init__(self, workdir, *, resume_step: int | None):
    self.path = Path(workdir) / METRICS_FILE
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    if resume_step is None:
      self.path.unlink(missing_ok=True)
    elif self.path.exists():
      keep = []
      for line in filter(str.strip, self.path.read_text().splitlines()):
        try:
          if json.loads(line)["step"] <= resume_step:
            keep.append(line)
        except (json.JSONDecodeError, KeyError):
          break  # a line cut by the kill
      self.path.write_text("".join(k + "\n" for k in keep))
    try:
      # The optional `tensorboard` extra; imported here because tensorboardX imports torch
      # when torch is installed (seconds, and the core never needs torch).
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.info("tensorboardX not installed: metrics go to %s only", self.path)
      return
    self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=(
        None if resume_step is None else resume_step + 1))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(f"train/{k}", v, row["step"])
      self._tb.flush()


def read_metrics(workdir) -> list[dict]:
  return [json.loads(l) for l in (Path(workdir) / METRICS_FILE).read_text().splitlines() if l]
