"""One inferencer for predict, calibrate and any serving code (anomalib's deploy idiom).

  inferencer = Inferencer(loading.load("demo_workdir"), batch_size=8)
  maps, scores = inferencer(images)          # normalised (n <= batch_size, S, S, 3)
  for r in inferencer.run(files): ...        # image files -> preprocessed, batched, scored

Images go through exactly the evaluation preprocessing (`Loaded.preprocessing`) and the
evaluation forward (`anomaly_map.maps_and_scores`), in fixed-shape batches: a short batch is
zero-padded, so every call reuses one compiled program.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import os
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np
import tqdm

from inpformer_jax import anomaly_map
from inpformer_jax.data import preprocess
from inpformer_jax.deploy import flags
from inpformer_jax.loading import Loaded

_READ_ERRORS = (preprocess.ImageReadError, OSError, ValueError)


@dataclasses.dataclass
class Scored:
  """One input file: its normalised crop, map (256, 256) and score, or why it failed."""
  index: int
  path: str
  image: np.ndarray | None = None
  anomaly_map: np.ndarray | None = None
  score: float | None = None
  error: str | None = None


class Inferencer:
  """A loaded model with its jitted forward, placed on the default device."""

  def __init__(self, loaded: Loaded, *, batch_size: int = 8):
    if batch_size <= 0:
      raise flags.FlagError(f"--batch_size {batch_size}: must be positive")
    self.loaded, self.batch_size = loaded, batch_size
    self.params = jax.device_put(loaded.params)
    self._fn = anomaly_map.jit_maps_and_scores(loaded.model, **loaded.scoring)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images (n <= batch_size, S, S, 3) -> (maps (n, 256, 256), scores (n,))."""
    n = len(images)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"got {n} images for a batch of {self.batch_size}")
    if n < self.batch_size:
      images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]),
                                                images.dtype)])
    out = self._fn(self.params, images)
    return np.asarray(out["anomaly_map"])[:n], np.asarray(out["score"])[:n]

  def compilations(self) -> int:
    """How many programs the jitted forward holds: one per batch shape used."""
    return self._fn._cache_size()  # pylint: disable=protected-access

  def run(self, files: Sequence[str], *, progress: bool = True, desc: str = "predict",
          workers: int = 4) -> Iterator[Scored]:
    """Every file, in order: decoded in a thread pool (PIL releases the GIL) one batch ahead
    of the device; an unreadable file is a `Scored` with `error` set, the rest go on.

    At most batch_size + workers files are read ahead: host memory stays bounded whatever
    the number of files."""
    prep = self.loaded.preprocessing

    def read(path):
      try:
        return prep.image(path), None
      except _READ_ERRORS as e:
        return None, str(e)

    bar = tqdm.tqdm(total=len(files), desc=desc, unit="img", disable=not progress,
                    dynamic_ncols=True)
    ahead = self.batch_size + workers
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      futures = collections.deque(pool.submit(read, f) for f in files[:ahead])
      pending: list[Scored] = []
      for i in range(len(files)):
        image, err = futures.popleft().result()
        if i + ahead < len(files):
          futures.append(pool.submit(read, files[i + ahead]))
        pending.append(Scored(i, files[i], image=image, error=err))
        last = i == len(files) - 1
        if sum(r.error is None for r in pending) == self.batch_size or last:
          yield from self._score(pending)
          bar.update(len(pending))
          pending = []
    bar.close()

  def _score(self, batch: list[Scored]) -> list[Scored]:
    ok = [r for r in batch if r.error is None]
    if ok:
      maps, scores = self(np.stack([r.image for r in ok]))
      for r, m, s in zip(ok, maps, scores):
        r.anomaly_map, r.score = m, float(s)
    return batch


def expand_inputs(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
  """Files, folders (recursively, image extensions only) and globs -> (files, unmatched).

  Explicit file arguments are kept whatever their extension (a bad one is reported later).
  """
  files, unmatched = [], []
  for pat in patterns:
    if os.path.isdir(pat):
      found = _images_under(pat)
    elif os.path.isfile(pat):
      found = [pat]
    else:  # a glob: its files, and the images inside the folders it matches
      found = sorted(q for m in glob.glob(pat, recursive=True)
                     for q in ([m] if os.path.isfile(m) else _images_under(m)))
    if not found:
      unmatched.append(pat)
    files.extend(found)
  return list(dict.fromkeys(os.path.abspath(f) for f in files)), unmatched


def no_images_message(patterns: Sequence[str], flag: str) -> str:
  """Why `patterns` (given as `flag`) hold nothing to score, one reason each."""
  exts = ", ".join(preprocess.IMAGE_EXTENSIONS)
  return "; ".join(f"{flag} {p} holds no images (extensions read: {exts})" if os.path.isdir(p)
                   else f"{flag} {p}: no such file, folder or matching glob" for p in patterns)


def _images_under(folder: str) -> list[str]:
  return sorted(str(q) for q in Path(folder).rglob("*")
                if q.is_file() and q.suffix.lower() in preprocess.IMAGE_EXTENSIONS)


def relative_names(files: Sequence[str]) -> list[str]:
  """Paths relative to their common folder (keeps test/good/000 and test/crack/000 apart)."""
  if not files:
    return []
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return [os.path.relpath(f, root) for f in files]
