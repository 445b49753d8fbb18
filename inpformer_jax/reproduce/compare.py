"""Ours vs the paper: per table, per class and mean, the difference, and a flag past tolerance.

`compare(...)` returns plain data (dicts and lists: for the report page and for JSON);
`write(...)` renders it as WORKDIR/comparison.{md,csv,json}. Our values are results.json's
fractions x 100 rounded to one decimal, as the paper prints; the difference is ours - paper.

Every results.json of a run is compared: the run's own (WORKDIR/<key>/results.json) and any
re-evaluation under it (WORKDIR/<key>/<dir>/results.json, e.g. with the exact protocol or the
paper-era GT threshold; docs/reproduce.md), each labelled with its protocol and GT threshold.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from inpformer_jax import metrics as metrics_lib
from inpformer_jax import report_page
from inpformer_jax.reproduce import run as run_lib
from inpformer_jax.reproduce import tables as tables_lib

# 1.0 point: ten times the paper's printing step (0.1) and far above our evaluator's distance
# to the official one (<= 1e-3 points, docs/metrics.md), so a flag means a real difference of
# the run (seed, weights, data, recipe), not rounding.
DEFAULT_TOLERANCE = 1.0
PROTOCOL_NOTE = (
    "protocol 'official' = the authors' evaluator (adeval 200-bin histograms for P-AUROC, P-AP, "
    "AUPRO; the paper's numbers), 'exact' = sort-based; GT threshold 0.5 = masks > 0.5 (the "
    "current official code), 0 = masks > 0 (the paper-era code; its README warns P-AP/P-F1max "
    "may be slightly lower now). See docs/metrics.md and docs/reproduce.md.")


def _ours(report: dict, dataset: str, row: str, metric: str) -> float | None:
  d = report.get("datasets", {}).get(dataset)
  if d is None:
    return None
  values = d["mean"] if row == tables_lib.MEAN else d["classes"].get(row)
  if values is None:
    return None
  if metric == tables_lib.MAD:
    got = [values.get(n) for n in metrics_lib.METRIC_NAMES]
    return None if None in got else 100 * sum(got) / len(got)
  v = values.get(metric)
  return None if v is None else 100 * v


def _section_rows(section, report: dict, tolerance: float) -> list[dict]:
  rows = []
  for row, paper in section.paper.items():
    cells = {}
    for metric in tables_lib.metric_names(section):
      p = paper.get(metric)
      o = _ours(report, section.dataset, row, metric)
      o = None if o is None else round(o, 1)
      diff = None if o is None or p is None else round(o - p, 1)
      cells[metric] = {"ours": o, "paper": p, "diff": diff,
                       "flag": diff is not None and abs(diff) > tolerance}
    rows.append({"row": row, "metrics": cells})
  return rows


def _reports(workdir: Path, key: str) -> list[tuple[str, dict]]:
  """(path relative to workdir, report) of the run and of its re-evaluations."""
  base = run_lib.run_dir(workdir, key)
  paths = [base / run_lib.RESULTS] + sorted(base.glob(f"*/{run_lib.RESULTS}"))
  out = []
  for path in paths:
    try:
      out.append((str(path.relative_to(workdir)), json.loads(path.read_text())))
    except (FileNotFoundError, json.JSONDecodeError):
      continue
  return out


def compare(maps: list, workdir: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> dict:
  """-> {"tolerance", "protocol_note", "tables": [{table, title, not_ours, sections: [
  {label, run, dataset, results: [{source, protocol, gt_threshold, encoder_weights, step,
  rows: [{row, metrics: {name: {ours, paper, diff, flag}}}], flagged, compared}]}]}]}"""
  workdir = Path(workdir)
  out = {"tolerance": tolerance, "protocol_note": PROTOCOL_NOTE, "tables": []}
  for m in maps:
    sections = []
    for s in m.sections:
      results = []
      for source, report in _reports(workdir, s.run.key):
        info = report.get("info", {})
        rows = _section_rows(s, report, tolerance)
        cells = [c for r in rows for c in r["metrics"].values() if c["diff"] is not None]
        results.append({"source": source, "protocol": info.get("protocol"),
                        "gt_threshold": info.get("gt_threshold"),
                        "encoder_weights": info.get("encoder_weights"), "step": info.get("step"),
                        "rows": rows, "compared": len(cells),
                        "flagged": sum(c["flag"] for c in cells)})
      sections.append({"label": s.label, "run": s.run.key, "dataset": s.dataset,
                       "status": "compared" if results else "not run yet", "results": results})
    out["tables"].append({"table": m.name, "title": m.title, "not_ours": list(m.not_ours),
                          "sections": sections})
  return out


def comparison(workdir: str | Path, tables: str = "all", paper: str | Path | None = None,
               tolerance: float = DEFAULT_TOLERANCE) -> dict:
  """`compare` of a reproduction workdir in one call (e.g. for the report page): the tables
  of `paper` (default: the shipped file) named by `tables` ('all' or 'S12,S13')."""
  table_file = tables_lib.load_paper(paper)
  return compare(tables_lib.map_tables(table_file, tables_lib.select(table_file, tables)),
                 workdir, tolerance)


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.1f}"


def _cell_text(c: dict) -> str:
  """ours (paper, difference)."""
  if c["ours"] is None:
    return f"- ({_fmt(c['paper'])})"
  return (f"{_fmt(c['ours'])} ({_fmt(c['paper'])}, {c['diff']:+.1f})" if c["diff"] is not None
          else f"{_fmt(c['ours'])} (-)")


def _cell(c: dict) -> str:
  """The markdown cell: bold past tolerance."""
  return f"**{_cell_text(c)}**" if c["flag"] else _cell_text(c)


def to_markdown(cmp: dict) -> str:
  lines = ["# Reproduction: ours (paper, difference)", "",
           f"Cells: ours (paper, ours - paper), in %; **bold** = |difference| > "
           f"{cmp['tolerance']:g} point(s).", "", cmp["protocol_note"]]
  for t in cmp["tables"]:
    lines += ["", f"## {t['table']}: {t['title']}"]
    for note in t["not_ours"]:
      lines.append(f"- not reproduced: {note}")
    for s in t["sections"]:
      lines += ["", f"### {s['label']} (run {s['run']})"]
      if not s["results"]:
        lines.append("not run yet")
      for r in s["results"]:
        names = list(r["rows"][0]["metrics"]) if r["rows"] else []
        lines += ["", f"{r['source']}: protocol {r['protocol']}, GT > {r['gt_threshold']}, "
                  f"encoder weights {r['encoder_weights']}, step {r['step']}; "
                  f"{r['flagged']} of {r['compared']} values past tolerance", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for row in r["rows"]:
          lines.append(f"| {row['row']} | " + " | ".join(_cell(row["metrics"][n])
                                                      for n in names) + " |")
  return "\n".join(lines) + "\n"


def to_csv(cmp: dict) -> str:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["table", "section", "run", "source", "protocol", "gt_threshold", "row", "metric",
              "ours", "paper", "diff", "flag"])
  for t in cmp["tables"]:
    for s in t["sections"]:
      for r in s["results"]:
        for row in r["rows"]:
          for metric, c in row["metrics"].items():
            values = ["" if c[k] is None else c[k] for k in ("ours", "paper", "diff")]
            w.writerow([t["table"], s["label"], s["run"], r["source"], r["protocol"],
                        r["gt_threshold"], row["row"], metric, *values, int(c["flag"])])
  return buf.getvalue()


def to_html(cmp: dict, workdir: Path) -> str:
  """The comparison as the body of WORKDIR/report.html: per table and section, ours (paper,
  difference) with the cells past tolerance marked, and links to each run's own page."""
  esc = report_page.esc
  parts = [f"<p>Cells: ours (paper, ours &minus; paper), in %; marked cells differ by more "
           f"than {cmp['tolerance']:g} point(s).</p>",
           f'<p class="info">{esc(cmp["protocol_note"])}</p>']
  for t in cmp["tables"]:
    parts.append(f"<h2>{esc(t['table'])}: {esc(t['title'])}</h2>")
    parts += [f'<p class="info">not reproduced: {esc(n)}</p>' for n in t["not_ours"]]
    for s in t["sections"]:
      page = run_lib.run_dir(workdir, s["run"]) / report_page.PAGE
      link = (f' &middot; <a href="{esc(page.relative_to(workdir).as_posix())}">its report</a>'
              if page.exists() else "")
      parts.append(f"<h3>{esc(s['label'])} (run {esc(s['run'])}){link}</h3>")
      if not s["results"]:
        parts.append('<p class="info">not run yet</p>')
      for r in s["results"]:
        names = list(r["rows"][0]["metrics"]) if r["rows"] else []
        parts.append(f'<p class="info">{esc(r["source"])}: protocol {esc(r["protocol"])}, '
                     f"GT &gt; {esc(r['gt_threshold'])}, encoder weights "
                     f"{esc(r['encoder_weights'])}, step {esc(r['step'])}; {r['flagged']} of "
                     f"{r['compared']} values past tolerance</p>")
        rows = [[row["row"], *(_cell_text(row["metrics"][n]) for n in names)]
                for row in r["rows"]]
        flags = [["", *("flag" if row["metrics"][n]["flag"] else "" for n in names)]
                 for row in r["rows"]]
        parts.append(report_page.table(["", *names], rows, cell_classes=flags, classes=[
            "mean" if row["row"] == tables_lib.MEAN else "" for row in r["rows"]]))
  return "\n".join(parts)


def write(cmp: dict, workdir: str | Path) -> list[Path]:
  """WORKDIR/comparison.{md,csv,json} and WORKDIR/report.html."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  out = []
  for ext, text in (("md", to_markdown(cmp)), ("csv", to_csv(cmp)),
                    ("json", json.dumps(cmp, indent=1))):
    path = workdir / f"comparison.{ext}"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    out.append(path)
  out.append(report_page.write(workdir / report_page.PAGE, "INP-Former: ours vs the paper",
                               to_html(cmp, workdir)))
  return out
