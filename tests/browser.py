"""A page rendered by a real browser: Debian's headless Chromium, as a person would open it.

`render(page)` opens a copy of the page (beside it, so its relative links hold) with a probe
script appended, and returns what the probe read off the rendered page once it had loaded:
the visible text, every <img> with whether it decoded, every SVG chart with its rendered width
and what it draws, and the table headers. Without
Chromium the test is skipped, and fails under CI=true (`.ci/run` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import in_ci

_PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute("src"),
      loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth}));
  const charts = [...document.querySelectorAll("svg.chart")].map(s => ({
      label: s.getAttribute("aria-label"), width: s.getBoundingClientRect().width,
      series: s.querySelectorAll("polyline.series").length,
      bars: s.querySelectorAll("rect.bar").length,
      threshold: s.querySelectorAll("line.threshold").length}));
  const out = {text: document.body.innerText, images: imgs, charts: charts,
      headers: [...document.querySelectorAll("th")].map(t => t.innerText)};
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""
# The flags this machine's Chromium needs as root and without a network (see the env notes).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def chromium() -> str:
  path = shutil.which("chromium") or shutil.which("chromium-browser")
  if path is None:
    msg = "chromium is not installed (apt-get install chromium): the page is not rendered"
    if in_ci():
      pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)
  return path


def render(page: str | Path, *, screenshot: str | Path | None = None,
           width: int = 1300, height: int = 2000) -> dict:
  """-> {"text", "images": [{"src", "loaded", "width"}], "charts": [{"label", "width",
  "series", "bars", "threshold"}], "headers"} of the rendered page."""
  page = Path(page)
  probe = page.with_name(page.stem + ".probe.html")
  probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
  with tempfile.TemporaryDirectory() as profile:
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
           "--virtual-time-budget=10000"]
    try:
      dom = subprocess.run(cmd + ["--dump-dom", probe.as_uri()], capture_output=True, text=True,
                           timeout=120, check=True).stdout
      if screenshot is not None:
        subprocess.run(cmd + [f"--screenshot={screenshot}", page.as_uri()],
                       capture_output=True, timeout=120, check=True)
    finally:
      probe.unlink()
  m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
  assert m, f"the probe did not run: Chromium printed {dom[:500]!r}"
  # textContent is HTML-escaped in the dump.
  return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace(
      "&quot;", '"').replace("&#39;", "'").replace("&amp;", "&"))
