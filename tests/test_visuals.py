"""visuals: the gallery keeps the right images while batches stream by, and every map of a
class is coloured on one scale."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inpformer_jax import visuals

S = 16  # input side of the synthetic images


def _feed(gallery, key, scores, labels, maps, batch=3):
  n = len(scores)
  images = np.zeros((n, S, S, 3), np.float32)
  names = [f"img{i}" for i in range(n)]
  for lo in range(0, n, batch):
    sl = slice(lo, lo + batch)
    gallery.add(key, images[sl], None, maps[sl], scores[sl], labels[sl], names[sl],
                ["good" if y == 0 else "crack" for y in labels[sl]])


def test_gallery_keeps_the_most_telling_images_across_batches():
  rng = np.random.default_rng(0)
  scores = rng.permutation(np.linspace(0.1, 1.0, 10))
  labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1, 0])
  maps = rng.uniform(0, 1, (10, 8, 8)).astype(np.float32)
  g = visuals.Gallery(k=2)
  _feed(g, ("d", "c"), scores, labels, maps)
  threshold = 0.55
  by_score = sorted(range(10), key=lambda i: scores[i])
  normals = [i for i in by_score if labels[i] == 0]
  anomalies = [i for i in by_score if labels[i] == 1]
  want = {"most": by_score[::-1][:2], "least": by_score[:2],
          "fp": [i for i in normals[::-1][:2] if scores[i] > threshold],
          "miss": [i for i in anomalies[:2] if scores[i] <= threshold]}
  got = {name: [s.name for s in shots] for name, _, shots in g.sections(("d", "c"), threshold)}
  assert got == {k: [f"img{i}" for i in v] for k, v in want.items()}
  assert g.scale(("d", "c")) == (float(maps.min()), float(maps.max()))
  # Without a threshold the mistake sections are the extreme images of each label.
  titles = [t for _, t, _ in g.sections(("d", "c"), None)]
  assert "Highest-scored normal images" in titles and "Lowest-scored anomalous images" in titles


def test_maps_of_a_class_share_one_colour_scale(tmp_path):
  """A normal image's flat, low map stays blue and a defect turns red; a map stretched to
  its own min and max would paint the normal image red too."""
  rng = np.random.default_rng(1)
  normal = 0.1 + 0.01 * rng.uniform(size=(S, S))
  defect = normal.copy()
  defect[4:12, 4:12] = 0.9
  g = visuals.Gallery(k=2, tile=S)
  images = np.zeros((2, S, S, 3), np.float32)
  g.add(("d", "c"), images, None, np.stack([normal, defect]), np.array([0.1, 0.9]),
        np.array([0, 1]), ["n", "a"], ["good", "crack"])
  out = g.write(("d", "c"), tmp_path, threshold=0.5)
  assert out["scale"] == pytest.approx((normal.min(), 0.9))
  files = {im["name"]: im["file"] for s in out["sections"] for im in s["images"]}

  def map_tile(name):  # the overlay tile of the panel written (JPEG: colours approximate)
    return np.asarray(Image.open(files[name]).convert("RGB"))[:, -S:].astype(int)

  n, a = map_tile("n"), map_tile("a")
  assert (n[..., 2] > n[..., 0]).all()  # blue over red everywhere
  assert (a[6:10, 6:10, 0] > a[6:10, 6:10, 2]).all()  # the defect red
  # Written once per image, even where two sections show it.
  written = {im["file"] for s in out["sections"] for im in s["images"]}
  assert len(written) == 2 and sorted(tmp_path.glob("*.jpg")) == sorted(map(Path, written))



def test_galleries_of_several_processes_merge_into_the_gallery_of_one():
  rng = np.random.default_rng(2)
  scores = rng.uniform(size=12)
  labels = rng.integers(0, 2, 12)
  maps = rng.uniform(0, 1, (12, 8, 8)).astype(np.float32)
  masks = (maps > 0.8).astype(np.float32)
  one, parts = visuals.Gallery(k=3, tile=8), [visuals.Gallery(k=3, tile=8) for _ in range(2)]
  images = rng.normal(size=(12, 8, 8, 3)).astype(np.float32)
  names = [f"img{i}" for i in range(12)]
  for g, rows in ((one, slice(None)), (parts[0], slice(0, 12, 2)), (parts[1], slice(1, 12, 2))):
    g.add("k", images[rows], masks[rows], maps[rows], scores[rows], labels[rows],
          names[rows], ["d"] * 12)
  merged = visuals.Gallery(k=3, tile=8)
  for g in parts:
    merged.absorb("k", g.export("k"))
  assert merged.scale("k") == one.scale("k")
  for (_, _, a), (_, _, b) in zip(one.sections("k", 0.5), merged.sections("k", 0.5)):
    assert [s.name for s in a] == [s.name for s in b]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.rgb, y.rgb)
      np.testing.assert_array_equal(x.mask, y.mask)
      np.testing.assert_array_equal(x.amap, y.amap)


def test_only_the_images_kept_at_close_are_drawn(monkeypatch):
  """Tiles are drawn when the class is closed, for the images it still keeps, from copies of
  their rows (the batch arrays may be reused meanwhile)."""
  drawn = []
  to_rgb = visuals.to_rgb
  monkeypatch.setattr(visuals, "to_rgb", lambda x: drawn.append(x) or to_rgb(x))
  rng = np.random.default_rng(3)
  n = 12
  images = rng.normal(size=(n, S, S, 3)).astype(np.float32)
  maps = rng.uniform(0, 1, (n, S, S)).astype(np.float32)
  scores, labels = np.linspace(0.1, 1.0, n), np.arange(n) % 2  # rising: each one is kept
  g = visuals.Gallery(k=1, tile=8)
  for i in range(n):
    g.add("k", images[i:i + 1], None, maps[i:i + 1], scores[i:i + 1], labels[i:i + 1],
          [f"img{i}"], ["d"])
  assert not drawn
  want = {name: np.array(images[int(name[3:])]) for name in ("img0", "img1", "img10", "img11")}
  images[:] = 0  # the batch reused
  g.close("k")
  kept = {s.name: s for _, _, shots in g.sections("k", None) for s in shots}
  assert sorted(kept) == sorted(want) and len(drawn) == len(want)
  for name, shot in kept.items():
    one = visuals.Gallery(k=1, tile=8)
    one.add("k", want[name][None], None, maps[int(name[3:])][None], [1.0], [0], [name], ["d"])
    np.testing.assert_array_equal(shot.rgb, one.sections("k", None)[0][2][0].rgb)
