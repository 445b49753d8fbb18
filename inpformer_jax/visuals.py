"""Pictures of anomaly maps: the jet colour map, overlays on one colour scale, and the gallery of
a class's most telling test images.

Every map on a page is coloured on ONE scale (lo, hi): the calibration's pixel range, or the
range of all the maps of the class (evaluation) or of the run (predict). A map is never
stretched to its own min and max, which paints every normal image red somewhere; on one scale
a normal image stays blue, a defect turns red, and two maps can be compared.

  gallery = Gallery(k=4)
  for batch: gallery.add(key, images, masks, maps, scores, labels, names, defects)
  gallery.close(key)  # the class is complete: its kept images become tiles
  entries = gallery.write(key, folder, threshold)  # JPEG panels + what the page shows
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from inpformer_jax.data import preprocess

TILE = 192  # side of one gallery tile (input, ground truth, overlay), px
JPEG_QUALITY = 90
ALPHA = 0.5  # weight of the map's colours over the input
# Gallery sections: (name, title); the page shows them in this order.
SECTIONS = (("most", "Most anomalous"), ("fp", "False positives (normal, score > threshold)"),
            ("miss", "Misses (anomalous, score <= threshold)"), ("least", "Least anomalous"))


def jet(x: np.ndarray) -> np.ndarray:
  """x in [0, 1] (...) -> uint8 RGB (..., 3), matplotlib's 'jet' (piecewise linear)."""
  x = np.clip(x, 0.0, 1.0)
  r = np.clip(np.minimum(4 * x - 1.5, -4 * x + 4.5), 0, 1)
  g = np.clip(np.minimum(4 * x - 0.5, -4 * x + 3.5), 0, 1)
  b = np.clip(np.minimum(4 * x + 0.5, -4 * x + 2.5), 0, 1)
  return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """Normalised input (S, S, 3) -> uint8 RGB (S, S, 3); uint8 input is RGB already."""
  if image.dtype == np.uint8:
    return image
  # On rows with the statistics tiled along them (see preprocess.finish_from_resized).
  rows = np.asarray(image, np.float32).reshape(image.shape[0], -1)
  w = image.shape[1]
  rgb = np.clip(rows * np.tile(preprocess.IMAGENET_STD, w) + np.tile(preprocess.IMAGENET_MEAN, w),
                0, 1)
  return (rgb * 255 + 0.5).astype(np.uint8).reshape(image.shape)


def resize_map(amap: np.ndarray, size: int) -> np.ndarray:
  """(H, W) float map -> (size, size) float32, PIL bilinear."""
  return np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(
      (size, size), Image.Resampling.BILINEAR))


def overlay_rgb(rgb: np.ndarray, amap: np.ndarray, lo: float, hi: float,
                alpha: float = ALPHA) -> np.ndarray:
  """uint8 RGB (S, S, 3) + map (any square size) on the scale [lo, hi] -> uint8 RGB (S, S, 3)."""
  m = resize_map(amap, rgb.shape[0]) if amap.shape[0] != rgb.shape[0] else amap
  colours = jet((m - lo) / max(hi - lo, 1e-12)).astype(np.float32)
  return (rgb.astype(np.float32) * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float,
            alpha: float = ALPHA) -> np.ndarray:
  """Normalised input (S, S, 3) + map (256, 256) -> uint8 RGB (S, S, 3): the map resized
  (PIL bilinear) onto the centre-cropped input, jet colours on the scale [lo, hi]."""
  return overlay_rgb(to_rgb(image), amap, lo, hi, alpha)


def colorbar(width: int = 256, height: int = 14) -> np.ndarray:
  """uint8 RGB (height, width, 3): the jet scale from lo (left) to hi (right)."""
  return np.repeat(jet(np.linspace(0.0, 1.0, width))[None], height, axis=0)


@dataclasses.dataclass
class Shot:
  """One kept test image, at gallery size: input, ground truth, map.

  Until it is drawn (its class closed, or the shot shown) it holds its rows at input size
  (`raw`) and no tiles: most images offered while a class streams by are pushed out again by
  higher-ranked ones, and drawing tiles is most of what the gallery costs.
  """
  score: float
  label: int
  name: str
  defect: str
  rgb: np.ndarray | None = None   # uint8 (TILE, TILE, 3)
  mask: np.ndarray | None = None  # uint8 (TILE, TILE) 0/255, None without masks
  amap: np.ndarray | None = None  # float32 (TILE, TILE)
  raw: tuple | None = None  # (image (S, S, 3) as `add` got it, mask (H, W) or None, map)


class Gallery:
  """Per class, while the batches stream by: the k most and k least anomalous test images, the
  k highest-scored normal and the k lowest-scored anomalous ones (the false-positive and miss
  candidates once the threshold is known), and the range of every map of the class.

  Host memory, whatever the size of the test set: at most 4k images at input size per class
  neither closed (`close`) nor written and dropped (`drop`), 4k small tiles per closed class.
  """

  def __init__(self, k: int, tile: int = TILE):
    self.k, self.tile = int(k), int(tile)
    self._heaps: dict = {}
    self._range: dict = {}
    self._count = itertools.count()  # ties in score: first come first kept

  def add(self, key, images, masks, maps, scores, labels, names, defects) -> None:
    """images (B, S, S, 3) normalised, or uint8 RGB crops; masks (B, H, W) or None; maps
    (B, 256, 256); the rest (B,). key: (dataset, class)."""
    maps = np.asarray(maps)
    self._widen(key, float(maps.min()), float(maps.max()))
    for i, score in enumerate(np.asarray(scores, np.float64)):
      # Copies of the rows, so that the batch's arrays are not held alive by a kept image.
      self._offer(key, float(score), int(labels[i]), lambda i=i, score=score: Shot(
          float(score), int(labels[i]), str(names[i]), str(defects[i]), raw=(
              np.array(images[i]), None if masks is None else np.array(masks[i]),
              np.array(maps[i]))))

  def close(self, key) -> None:
    """The class is complete: draws the tiles of the images it keeps, drops their rows.

    `export` closes the class itself, `sections` and `write` draw the images they show;
    calling it when the last image of a class is in bounds memory by the classes still
    streaming. Another thread may close a class while `add` feeds others.
    """
    for shot in self._kept(key):
      self._draw(shot)

  def _widen(self, key, lo: float, hi: float) -> None:
    old_lo, old_hi = self._range.get(key, (np.inf, -np.inf))
    self._range[key] = (min(old_lo, lo), max(old_hi, hi))

  def _offer(self, key, score: float, label: int, make_shot) -> None:
    """Keeps the image where it ranks among the kept ones; make_shot() builds its tiles, only
    when some section takes it."""
    heaps = self._heaps.setdefault(key, {s: [] for s, _ in SECTIONS})
    # Priorities: each heap keeps its k largest; "least" and "miss" keep the lowest scores.
    wants = {"most": score, "least": -score}
    wants["fp" if label == 0 else "miss"] = score if label == 0 else -score
    shot = None
    for section, prio in wants.items():
      heap = heaps[section]
      if len(heap) < self.k or prio > heap[0][0]:
        shot = shot or make_shot()
        entry = (prio, next(self._count), shot)
        (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)

  def _kept(self, key) -> list[Shot]:
    seen: dict[int, Shot] = {}
    for heap in self._heaps.get(key, {}).values():
      for _, _, shot in heap:
        seen.setdefault(id(shot), shot)
    return list(seen.values())

  def export(self, key) -> dict[str, np.ndarray]:
    """Every image kept for `key`, once, and the map range, as flat arrays of fixed dtypes
    (what another process's `absorb` takes back: the gallery of several processes)."""
    self.close(key)
    shots, t = self._kept(key), self.tile
    text = json.dumps([[s.name, s.defect] for s in shots]).encode()
    lo, hi = self._range.get(key, (np.inf, -np.inf))
    return {"score": np.array([s.score for s in shots], np.float64),
            "label": np.array([s.label for s in shots], np.int32),
            "has_mask": np.array([s.mask is not None for s in shots], np.uint8),
            "rgb": np.array([s.rgb for s in shots], np.uint8).reshape(-1),
            "mask": np.array([np.zeros((t, t), np.uint8) if s.mask is None else s.mask
                              for s in shots], np.uint8).reshape(-1),
            "amap": np.array([s.amap for s in shots], np.float32).reshape(-1),
            "text": np.frombuffer(text, np.uint8), "range": np.array([lo, hi], np.float64)}

  def absorb(self, key, arrays: dict[str, np.ndarray]) -> None:
    """Takes the images and the range of another gallery's `export(key)`."""
    self._widen(key, *arrays["range"].tolist())
    n, t = len(arrays["score"]), self.tile
    rgb, mask = arrays["rgb"].reshape(n, t, t, 3), arrays["mask"].reshape(n, t, t)
    amap = arrays["amap"].reshape(n, t, t)
    text = json.loads(arrays["text"].tobytes().decode())
    for i in range(n):
      score, label = float(arrays["score"][i]), int(arrays["label"][i])
      self._offer(key, score, label, lambda i=i, score=score, label=label: Shot(
          score, label, text[i][0], text[i][1], rgb[i],
          mask[i] if arrays["has_mask"][i] else None, amap[i]))

  def drop(self, key) -> None:
    """Forgets the images kept for `key` (its page is written); its map range stays."""
    self._heaps.pop(key, None)

  def _draw(self, shot: Shot) -> None:
    """Draws the shot's tiles from its rows, once."""
    if shot.raw is None:
      return
    t = self.tile
    image, mask, amap = shot.raw
    shot.rgb = np.asarray(Image.fromarray(to_rgb(image)).resize((t, t), Image.Resampling.BILINEAR))
    if mask is not None:
      shot.mask = np.asarray(Image.fromarray(((mask > 0.5) * 255).astype(np.uint8)).resize(
          (t, t), Image.Resampling.NEAREST))
    shot.amap = resize_map(amap, t)
    shot.raw = None

  def keys(self) -> list:
    return list(self._heaps)

  def scale(self, key) -> tuple[float, float]:
    """(lo, hi): the range of every map of the class."""
    return self._range[key]

  def sections(self, key, threshold: float | None) -> list[tuple[str, str, list[Shot]]]:
    """[(section, title, shots)] in page order. Without a threshold the two mistake sections
    are the highest-scored normal and lowest-scored anomalous images, so titled."""
    heaps = self._heaps.get(key, {s: [] for s, _ in SECTIONS})
    out = []
    for section, title in SECTIONS:
      shots = [e[2] for e in heaps[section]]
      high_first = section in ("most", "fp")
      shots.sort(key=lambda s: s.score, reverse=high_first)
      if threshold is None and section in ("fp", "miss"):
        title = ("Highest-scored normal images" if section == "fp"
                 else "Lowest-scored anomalous images")
      elif section == "fp":
        shots = [s for s in shots if s.score > threshold]
      elif section == "miss":
        shots = [s for s in shots if s.score <= threshold]
      for shot in shots:  # only the images shown are drawn
        self._draw(shot)
      out.append((section, title, shots))
    return out

  def write(self, key, folder: str | Path, threshold: float | None,
            scale: tuple[float, float] | None = None, *, decided_by: str = "F1-optimal",
            scale_source: str = "the range of this class's maps") -> dict:
    """Writes one JPEG panel per shown image into `folder`. -> {"scale": (lo, hi),
    "scale_source", "threshold", "decided_by", "sections": [{"section", "title", "images":
    [{"file", "score", "label", "name", "defect"}]}]}. scale: None for the class's range."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):  # an earlier evaluation's panels
      old.unlink()
    lo, hi = scale or self.scale(key)
    written: dict[int, str] = {}
    sections = []
    for section, title, shots in self.sections(key, threshold):
      images = []
      for shot in shots:
        if id(shot) not in written:
          path = folder / f"{len(written):03d}.jpg"
          Image.fromarray(panel(shot, lo, hi)).save(path, quality=JPEG_QUALITY)
          written[id(shot)] = str(path)
        images.append({"file": written[id(shot)], "score": shot.score, "label": shot.label,
                       "name": shot.name, "defect": shot.defect})
      sections.append({"section": section, "title": title, "images": images})
    return {"scale": (float(lo), float(hi)), "scale_source": scale_source,
            "threshold": threshold, "decided_by": decided_by, "sections": sections}


def panel(shot: Shot, lo: float, hi: float) -> np.ndarray:
  """uint8 RGB (TILE, 3 TILE or 2 TILE, 3): input | ground truth (when masks exist) | map."""
  tiles = [shot.rgb]
  if shot.mask is not None:
    tiles.append(np.repeat(shot.mask[..., None], 3, axis=-1))
  tiles.append(overlay_rgb(shot.rgb, shot.amap, lo, hi))
  gap = np.full((shot.rgb.shape[0], 4, 3), 255, np.uint8)
  return np.concatenate(list(itertools.chain.from_iterable((t, gap) for t in tiles))[:-1], 1)
