"""report.html: the page a person looks at, for an evaluated workdir and for a predict run.

  evaluation  the results table; per class the image- and pixel-level ROC and PR curves, the
              histogram of good vs defective image scores with the F1-optimal threshold, and the
              gallery (`visuals.Gallery`): most / least anomalous, false positives, misses
  predict     the scores' histogram with the threshold, the most and least anomalous images and
              every image sorted by score, with its decision when a threshold is set

The page is static HTML with its pictures in files beside it (report_files/, predict's
overlays/) and its charts inline (SVG, `charts`): it opens offline, from the folder, in any
browser.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from inpformer_jax import charts
from inpformer_jax import metrics as metrics_lib
from inpformer_jax import visuals

PAGE = "report.html"
FILES = "report_files"
PREDICT_GALLERY = 12  # images in each of predict's two gallery sections
HIST_BINS = 30
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.mean td{font-weight:bold;background:#f3f3f3}
td.flag{background:#fde2e2}
.info{color:#555;font-size:.9em}
.note{background:#fff6d5;padding:.4em .8em;border-left:4px solid #e0b400}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:.8em;max-width:600px}
figure img{display:block;height:160px}
figcaption{color:#444}
.anomalous{color:#b00020}.normal{color:#1b5e20}
img.colorbar{height:14px;width:256px;vertical-align:middle}
.charts{display:flex;flex-wrap:wrap;gap:12px}
section.cls{border-top:2px solid #ddd;margin-top:1.5em}
"""


# ---------------------------------------------------------------------------------------
# Building blocks (the reproduce comparison uses them too).
# ---------------------------------------------------------------------------------------


def esc(x) -> str:
  return html.escape(str(x), quote=True)


def table(columns: Sequence[str], rows: Sequence[Sequence], *, classes: Sequence[str] = (),
          cell_classes: Sequence[Sequence[str]] = ()) -> str:
  """An HTML table; rows of already formatted cells (escaped here), `classes` one CSS class
  per row ("mean" for a Mean row), `cell_classes` one per cell ("flag" marks a cell)."""
  head = "".join(f"<th>{esc(c)}</th>" for c in columns)
  body = []
  for i, row in enumerate(rows):
    cc = cell_classes[i] if i < len(cell_classes) else ()
    cells = "".join(f'<td class="{esc(cc[j]) if j < len(cc) else ""}">{esc(v)}</td>'
                    for j, v in enumerate(row))
    body.append(f'<tr class="{esc(classes[i]) if i < len(classes) else ""}">{cells}</tr>')
  return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
          f"<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def write(path: str | Path, title: str, body: str) -> Path:
  path = Path(path)
  tmp = path.with_suffix(".html.tmp")
  tmp.write_text(page(title, body))
  tmp.replace(path)
  return path


def _rel(path: str | Path, page_dir: Path) -> str:
  return Path(os.path.relpath(path, page_dir)).as_posix()


def _pct(x) -> str:
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _colorbar(folder: Path) -> Path:
  path = folder / "colorbar.png"
  folder.mkdir(parents=True, exist_ok=True)
  Image.fromarray(visuals.colorbar()).save(path)
  return path


def _scale_line(scale, source: str, bar: str) -> str:
  lo, hi = scale
  return (f'<p>Colour scale ({esc(source)}): {lo:.4g} <img class="colorbar" src="{bar}" '
          f'alt="colour scale"> {hi:.4g}</p>')


# ---------------------------------------------------------------------------------------
# Evaluation page.
# ---------------------------------------------------------------------------------------


def write_eval_page(workdir: str | Path, report: dict, results: dict,
                    extra: str = "") -> Path:
  """WORKDIR/report.html from `reports.write_reports`' JSON object and `evaluate`'s results
  (their Metrics.info: curves, scores, labels, threshold, gallery). extra: more HTML at the end."""
  workdir = Path(workdir)
  files = workdir / FILES
  bar = _rel(_colorbar(files), workdir)
  names = metrics_lib.METRIC_NAMES
  info = report["info"]
  parts = ['<p class="info">' + esc(", ".join(f"{k}: {v}" for k, v in info.items())) + "</p>"]
  parts += [f'<p class="note">{esc(n)}</p>' for n in report.get("notes", ())]
  parts.append("<h2>Results (%)</h2>")
  for dataset, d in report["datasets"].items():
    rows = [[c, *(_pct(m.get(n)) for n in names)] for c, m in d["classes"].items()]
    rows.append(["Mean", *(_pct(d["mean"].get(n)) for n in names)])
    parts += [f"<h3>{esc(dataset)}</h3>",
              table(["Category", *names], rows, classes=[""] * (len(rows) - 1) + ["mean"])]
  for dataset, per_class in results.items():
    for category, m in per_class.items():
      parts.append(_class_section(workdir, dataset, category, m, bar))
  return write(workdir / PAGE, f"INP-Former results: {info.get('setting', '')}",
               "\n".join(parts) + extra)


def _class_section(workdir, dataset, category, m, bar) -> str:
  info = getattr(m, "info", {})
  thr = info.get("threshold")
  out = [f'<section class="cls" id="{esc(dataset)}-{esc(category)}">',
         f"<h3>{esc(dataset)} / {esc(category)}</h3>",
         "<p>" + esc(", ".join(f"{n} {_pct(m.get(n))}" for n in metrics_lib.METRIC_NAMES))
         + "</p>"]
  if thr is not None:
    out.append(f"<p>F1-optimal image threshold {thr['threshold']:.6g} (F1 {thr['f1']:.3f}, "
               f"precision {thr['precision']:.3f}, recall {thr['recall']:.3f})</p>")
  cal = info.get("calibrated")
  if cal is not None:
    out.append(f"<p>Calibrated image threshold {cal['threshold']:.6g} ({esc(cal['source'])})"
               "</p>")
  if "scores" in info:
    out.append(_class_charts(f"{dataset}/{category}", info))
  gallery = info.get("gallery")
  if gallery:
    out.append(_scale_line(gallery["scale"], gallery["scale_source"], bar))
    if gallery["threshold"] is not None:
      out.append(f"<p class=\"info\">Mistakes at the {esc(gallery['decided_by'])} threshold "
                 f"{gallery['threshold']:.6g}</p>")
    for s in gallery["sections"]:
      out.append(f"<h4>{esc(s['title'])}</h4>")
      if not s["images"]:
        out.append('<p class="info">none</p>')
        continue
      out.append(_figures(
          (_rel(it["file"], workdir), it["name"], it["score"],
           "anomalous" if it["label"] else "normal") for it in s["images"]))
  out.append("</section>")
  return "\n".join(out)


def _figures(items) -> str:
  """items: (src, name, score, ground truth or decision) -> a flex row of figures."""
  figs = [f'<figure><img src="{esc(src)}" alt="{esc(name)}"><figcaption>{esc(name)}<br>'
          f"score {score:.5g}"
          + (f' · <span class="{esc(kind)}">{esc(kind)}</span>' if kind else "")
          + "</figcaption></figure>" for src, name, score, kind in items]
  return '<div class="gallery">' + "".join(figs) + "</div>"


def _class_charts(name: str, info: dict) -> str:
  """ROC and PR (image level solid, pixel level dashed) and the score histogram of a class
  with its thresholds (F1-optimal, and calibration.json's when there is one)."""
  vlines = [(t["threshold"], label) for t, label in (
      (info.get("threshold"), "F1-optimal"), (info.get("calibrated"), "calibrated")) if t]
  rocs, prs = [], []
  for level in ("image", "pixel"):
    c = info.get("curves", {}).get(level)
    if c:
      rocs.append(charts.Series(c["roc"]["fpr"], c["roc"]["tpr"], level, level == "pixel"))
      prs.append(charts.Series(c["pr"]["recall"], c["pr"]["precision"], level,
                               level == "pixel"))
  scores, labels = np.asarray(info["scores"]), np.asarray(info["labels"], bool)
  edges = np.histogram_bin_edges(scores, HIST_BINS)
  bars = [charts.Bars(edges, np.histogram(scores[want], edges)[0], text, colour)
          for want, text, colour in ((~labels, "good", "#2ca02c"),
                                     (labels, "defective", "#d62728"))]
  return '<div class="charts">' + "".join([
      charts.line_chart(rocs, title="ROC", xlabel="false-positive rate",
                        ylabel="true-positive rate", label=f"{name} ROC", diagonal=True),
      charts.line_chart(prs, title="PR", xlabel="recall", ylabel="precision",
                        label=f"{name} PR", legend="lower left"),
      charts.histogram_chart(bars, title="image scores", xlabel="score",
                             label=f"{name} scores", vlines=vlines),
  ]) + "</div>"


# ---------------------------------------------------------------------------------------
# Predict page.
# ---------------------------------------------------------------------------------------


def write_predict_page(output: str | Path, rows: Sequence[dict], info: dict,
                       threshold: float | None, threshold_source: str,
                       scale: tuple[float, float] | None, scale_source: str) -> Path:
  """OUTPUT/report.html for `deploy.predict`: rows as predictions.jsonl holds them."""
  out = Path(output)
  ranked = sorted(rows, key=lambda r: -r["score"])
  parts = ['<p class="info">' + esc(", ".join(f"{k}: {info[k]}" for k in (
      "kind", "path", "step", "image_size", "map_kind") if k in info)) + "</p>",
           f"<p>{len(rows)} images; threshold: "
           + (f"{threshold:.6g} ({esc(threshold_source)})" if threshold is not None
              else f"none ({esc(threshold_source)})") + "</p>"]
  if threshold is not None:
    n = sum(r.get("decision") == "anomalous" for r in rows)
    parts.append(f'<p><span class="anomalous">{n} anomalous</span>, '
                 f'<span class="normal">{len(rows) - n} normal</span></p>')
  if scale is not None:
    parts.append(_scale_line(scale, scale_source, _rel(_colorbar(out / FILES), out)))
  if rows:
    scores = np.array([r["score"] for r in rows])
    edges = np.histogram_bin_edges(scores, HIST_BINS)
    parts.append('<div class="charts">' + charts.histogram_chart(
        [charts.Bars(edges, np.histogram(scores, edges)[0], "images", charts.COLOURS[0])],
        title="image scores", xlabel="score", label="scores",
        vlines=[] if threshold is None else [(threshold, "threshold")]) + "</div>")
  with_pictures = [r for r in ranked if r.get("overlay_file")]
  if rows and not with_pictures:
    parts.append('<p class="note">no overlays (written without --overlays)</p>')

  def gallery(items):
    return _figures((r["overlay_file"], r["name"], r["score"], r.get("decision"))
                    for r in items)

  k = PREDICT_GALLERY
  if len(with_pictures) > 2 * k:
    parts += ["<h2>Most anomalous</h2>", gallery(with_pictures[:k]),
              "<h2>Least anomalous</h2>", gallery(with_pictures[::-1][:k])]
  elif with_pictures:
    parts += ["<h2>Every image, most anomalous first</h2>", gallery(with_pictures)]
  parts.append("<h2>All images, by score</h2>")
  parts.append(table(["#", "image", "score", "decision"],
                     [[i + 1, r["name"], f"{r['score']:.6g}", r.get("decision", "-")]
                      for i, r in enumerate(ranked)]))
  return write(out / PAGE, "INP-Former predictions", "\n".join(parts))
