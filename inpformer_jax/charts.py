"""ROC, PR and score-histogram charts as inline SVG, for report.html.

Drawn by hand rather than by matplotlib: a page of 30 classes needs 60 charts, which
matplotlib renders at 1-4 s each on a 2-core CPU, SVG in about a millisecond, crisp at any
zoom and with no extra package to install.

  line_chart([Series(xs, ys, "image"), ...], title="ROC", xlabel=..., ylabel=...)
  histogram_chart([Bars(edges, counts, "good", colour), ...], title=..., vlines=[(t, "label")])
"""

from __future__ import annotations

import dataclasses
import html
from typing import Sequence

import numpy as np

WIDTH, HEIGHT = 330, 250
# Plot area inside the chart: left, top, right, bottom margins (px) for ticks and labels.
MARGIN = (46, 24, 12, 40)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
TICKS = 5


@dataclasses.dataclass
class Series:
  """A polyline: x and y values, its legend label; dashed or solid."""
  xs: Sequence[float]
  ys: Sequence[float]
  label: str
  dashed: bool = False


@dataclasses.dataclass
class Bars:
  """A histogram: len(counts) + 1 bin edges, the counts, its legend label and colour."""
  edges: Sequence[float]
  counts: Sequence[int]
  label: str
  colour: str


def _esc(x) -> str:
  return html.escape(str(x), quote=True)


class _Frame:
  """Data -> pixel coordinates for the plot area."""

  def __init__(self, xlim, ylim):
    self.x0, self.x1 = xlim
    self.y0, self.y1 = ylim
    left, top, right, bottom = MARGIN
    self.left, self.top = left, top
    self.w, self.h = WIDTH - left - right, HEIGHT - top - bottom

  def x(self, v):
    span = (self.x1 - self.x0) or 1.0
    return self.left + (np.asarray(v, np.float64) - self.x0) / span * self.w

  def y(self, v):
    span = (self.y1 - self.y0) or 1.0
    return self.top + self.h - (np.asarray(v, np.float64) - self.y0) / span * self.h


def _axes(f: _Frame, title: str, xlabel: str, ylabel: str, label: str) -> list[str]:
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
         f'aria-label="{_esc(label)}" width="{WIDTH}" height="{HEIGHT}" '
         f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="10">',
         f'<text x="{f.left + f.w / 2:.1f}" y="14" text-anchor="middle" font-size="12">'
         f"{_esc(title)}</text>",
         f'<rect x="{f.left}" y="{f.top}" width="{f.w}" height="{f.h}" fill="none" '
         'stroke="#444"/>']
  for v in np.linspace(f.x0, f.x1, TICKS):
    x = float(f.x(v))
    out.append(f'<line x1="{x:.1f}" y1="{f.top + f.h}" x2="{x:.1f}" y2="{f.top + f.h + 4}" '
               f'stroke="#444"/><text x="{x:.1f}" y="{f.top + f.h + 14}" '
               f'text-anchor="middle">{v:.3g}</text>')
  for v in np.linspace(f.y0, f.y1, TICKS):
    y = float(f.y(v))
    out.append(f'<line x1="{f.left - 4}" y1="{y:.1f}" x2="{f.left}" y2="{y:.1f}" '
               f'stroke="#444"/><text x="{f.left - 6}" y="{y + 3:.1f}" '
               f'text-anchor="end">{v:.3g}</text>')
  out.append(f'<text x="{f.left + f.w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
             f"{_esc(xlabel)}</text>")
  out.append(f'<text transform="translate(11 {f.top + f.h / 2:.1f}) rotate(-90)" '
             f'text-anchor="middle">{_esc(ylabel)}</text>')
  return out


def _legend(f: _Frame, entries: list[tuple[str, str, bool]], corner: str) -> list[str]:
  """entries: (label, colour, dashed); corner: '{lower,upper} {left,right}'."""
  out = []
  vertical, horizontal = corner.split()
  for i, (label, colour, dashed) in enumerate(entries):
    y = (f.top + f.h - 10 - 12 * (len(entries) - 1 - i) if vertical == "lower"
         else f.top + 12 + 12 * i)
    x = f.left + 8 if horizontal == "left" else f.left + f.w - 92
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    out.append(f'<line x1="{x}" y1="{y - 3}" x2="{x + 16}" y2="{y - 3}" stroke="{colour}" '
               f'stroke-width="2"{dash}/><text x="{x + 20}" y="{y}">{_esc(label)}</text>')
  return out


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               label: str, diagonal: bool = False, legend: str = "lower right") -> str:
  """Polylines on [0, 1] x [0, 1] (ROC, PR); diagonal: the chance line of a ROC."""
  f = _Frame((0.0, 1.0), (0.0, 1.0))
  out = _axes(f, title, xlabel, ylabel, label)
  if diagonal:
    out.append(f'<line x1="{f.x(0):.1f}" y1="{f.y(0):.1f}" x2="{f.x(1):.1f}" y2="{f.y(1):.1f}"'
               ' stroke="#aaa" stroke-dasharray="2 3"/>')
  entries = []
  for i, s in enumerate(series):
    colour = COLOURS[i % len(COLOURS)]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(f.x(s.xs), f.y(s.ys)))
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    out.append(f'<polyline class="series" data-label="{_esc(s.label)}" points="{points}" '
               f'fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>')
    entries.append((s.label, colour, s.dashed))
  return "".join(out + _legend(f, entries, legend) + ["</svg>"])


def histogram_chart(bars: Sequence[Bars], *, title: str, xlabel: str, label: str,
                    vlines: Sequence[tuple[float, str]] = ()) -> str:
  """Overlaid histograms on their common bins; vlines: (x, label), e.g. thresholds."""
  edges = [float(e) for b in bars for e in b.edges]
  lo, hi = (min(edges), max(edges)) if edges else (0.0, 1.0)
  for x, _ in vlines:
    lo, hi = min(lo, x), max(hi, x)
  # A count axis of whole numbers: the top a multiple of the tick intervals.
  top = -(-max([int(c) for b in bars for c in b.counts] + [1]) // (TICKS - 1)) * (TICKS - 1)
  f = _Frame((lo, hi), (0.0, float(top)))
  out = _axes(f, title, xlabel, "images", label)
  entries = []
  for b in bars:
    xs = f.x(b.edges)
    for c, x0, x1 in zip(b.counts, xs[:-1], xs[1:]):
      if c:
        y = float(f.y(c))
        out.append(f'<rect class="bar" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 0.5):.1f}"'
                   f' height="{f.top + f.h - y:.1f}" fill="{b.colour}" fill-opacity="0.55"/>')
    entries.append((b.label, b.colour, False))
  for (value, text), colour in zip(vlines, ("#000", "#7b1fa2")):
    x = float(f.x(value))
    out.append(f'<line class="threshold" x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" '
               f'y2="{f.top + f.h}" stroke="{colour}" stroke-dasharray="4 3"/>')
    entries.append((text, colour, True))
  return "".join(out + _legend(f, entries, "upper right") + ["</svg>"])
