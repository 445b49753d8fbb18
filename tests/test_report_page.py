"""report_page and charts: the page of a class (tables, charts, gallery) from its metrics, cells
escaped, no plotting package needed; the charts put data where the axes say."""

import re
import sys

import numpy as np
import pytest

from inpformer_jax import charts
from inpformer_jax import metrics
from inpformer_jax import reports
from inpformer_jax import visuals


def _results(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.array([0, 0, 1, 1])
  masks = np.zeros((4, 16, 16), np.float32)
  masks[2:, 4:10, 4:10] = 1
  maps = rng.uniform(0, 0.5, (4, 16, 16)).astype(np.float32) + masks * 0.4
  scores = maps.reshape(4, -1).max(1)
  m = metrics.compute_metrics(maps, masks, labels, scores)
  g = visuals.Gallery(k=2)
  g.add(("d", "c<1>"), np.zeros((4, 8, 8, 3), np.float32), masks, maps, scores, labels,
        ["a", "b", "c", "d"], ["good", "good", "x", "x"])
  m.info["gallery"] = g.write(("d", "c<1>"), tmp_path / "report_files" / "d" / "c", None)
  return {"d": {"c<1>": m}}


def test_the_page_needs_no_plotting_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` would raise
  reports.write_reports(_results(tmp_path), tmp_path, {"setting": "multi_class"})
  html = (tmp_path / "report.html").read_text()
  assert all(f"<th>{n}</th>" in html for n in metrics.METRIC_NAMES)
  assert [m for m in re.findall(r'aria-label="([^"]+)"', html)] == [
      "d/c&lt;1&gt; ROC", "d/c&lt;1&gt; PR", "d/c&lt;1&gt; scores"]
  # No threshold given: most, least, highest-scored normal, lowest-scored anomalous (2 each).
  assert html.count('.jpg"') == 4 * 2
  assert "c&lt;1&gt;" in html and "c<1>" not in html


def test_line_chart_puts_points_where_its_axes_say():
  svg = charts.line_chart([charts.Series([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], "roc")],
                          title="t", xlabel="x", ylabel="y", label="l")
  (points,) = re.findall(r'<polyline class="series" data-label="roc" points="([^"]+)"', svg)
  left, top, right, bottom = charts.MARGIN
  w, h = charts.WIDTH - left - right, charts.HEIGHT - top - bottom
  got = [tuple(map(float, p.split(","))) for p in points.split()]
  assert got == [pytest.approx((left, top + h), abs=0.05),
                 pytest.approx((left + w / 2, top), abs=0.05),
                 pytest.approx((left + w, top), abs=0.05)]


def test_histogram_chart_bars_are_the_counts():
  svg = charts.histogram_chart([charts.Bars([0.0, 1.0, 2.0], [3, 0], "a", "#000")],
                               title="t", xlabel="x", label="l", vlines=[(1.5, "thr")])
  heights = [float(x) for x in re.findall(r'<rect class="bar"[^>]* height="([\d.]+)"', svg)]
  _, top, _, bottom = charts.MARGIN
  # The count axis runs 0..4 (whole ticks): a bar of 3 is 3/4 of the plot's height.
  assert heights == [pytest.approx(0.75 * (charts.HEIGHT - top - bottom), abs=0.05)]
  assert svg.count('class="threshold"') == 1
