"""Every data fault of a run, found before its first training step and reported together.

  splits = validate.validate_run(config, mode)   # {'train': Split, 'test': Split}, as needed

lists the train split (unless mode='eval' or zero-shot) and the test split (unless
mode='train') with the readers collecting their faults instead of stopping at the first one,
then reads the header and the last bytes of every image and mask (no pixel decoding), in
threads. A fault is any of:

  * a layout fault of the readers: a missing folder, an empty class, a defect image without its
    mask, a mask without its image, a file that is not an image inside an image folder, ...;
  * a file PIL cannot identify (empty, or not an image despite its extension);
  * a truncated file: a PNG that does not end with its IEND chunk, a JPEG without the EOI
    marker (FFD9) at the end, the usual result of an interrupted download or copy;
  * a mask whose size (in the headers) differs from its image's.

All of them go into one DataFaults, one line each; without faults the caller gets the splits
(samples and grain source) and lists nothing again. With `data.source='array_record'`,
`prepare` decoded every file already: only the record counts are compared (the manifest, the
samples file and the shards' lengths), from JSON.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import PIL
from PIL import Image

from inpformer_jax import errors
from inpformer_jax.data import datasets
from inpformer_jax.data import prepared
from inpformer_jax.data import readers
from inpformer_jax.data.folder import Fault
from inpformer_jax.data.records import Sample

MAX_LISTED = 30  # fault lines in the message; the count covers them all
# A truncated file lacks its end marker; a few writers pad after it, so look at the last KiB.
TAIL_BYTES = 1024
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC, the last 8 bytes of a PNG
JPEG_END = b"\xff\xd9"  # EOI; byte stuffing keeps it out of the entropy-coded data
# Threads overlap the disk waits of a cold cache (Real-IAD: 80-94 s -> 54-65 s on 2 busy
# cores); warm, the header parsing holds the GIL: no gain, no loss (benchmarks/validate_data.py).
WORKERS = 16
CHUNK = 256  # files per task: one future per file would cost as much as the reads


class DataFaults(errors.UserError):
  """Every data fault found: `faults` lists (path, message); the message shows them all."""

  def __init__(self, faults: Sequence[Fault], where: Sequence[str]):
    self.faults = list(faults)
    self.where = list(where)
    super().__init__(format_faults(self.faults, self.where))


def format_faults(faults: Sequence[Fault], where: Sequence[str]) -> str:
  lines = [f"{len(faults)} data fault(s) in {', '.join(where)}; fix them and rerun"]
  lines += [f"  {message}" for _, message in faults[:MAX_LISTED]]
  if len(faults) > MAX_LISTED:
    lines.append(f"  ... and {len(faults) - MAX_LISTED} more")
  return "\n".join(lines)


@dataclasses.dataclass
class _Part:
  """One dataset of one split: its samples and faults."""
  name: str
  which: str
  split: str
  samples: list[Sample]
  faults: list[Fault]


def check_file(path: str) -> tuple[tuple[int, int] | None, str | None]:
  """-> ((width, height) from the header, what is wrong with the file: None if nothing)."""
  try:
    with open(path, "rb") as f:
      with Image.open(f) as img:
        kind, size = img.format, img.size
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - TAIL_BYTES))
      tail = f.read()
  except FileNotFoundError:
    return None, f"{path}: the file is gone (deleted while listing?); restore it or rerun"
  except PIL.UnidentifiedImageError:
    return None, (f"{path}: not an image (PIL cannot identify it); replace or delete the file "
                  "(a non-image file with an image extension?)")
  # A damaged header raises OSError, SyntaxError, ValueError, ... depending on the plugin.
  except Exception as e:  # noqa: BLE001
    return None, (f"{path}: not a readable image ({type(e).__name__}: {e}); replace or delete "
                  "the file")
  end = {"PNG": (PNG_END, "a PNG ends with its IEND chunk"),
         "JPEG": (JPEG_END, "a JPEG ends with the EOI marker FFD9")}.get(kind)
  if end is not None and end[0] not in tail:
    return size, (f"{path}: truncated ({end[1]}, this file does not); replace it (an "
                  "interrupted download or copy?)")
  return size, None


def _map(fn, items: list, workers: int) -> list:
  if workers <= 1 or len(items) <= CHUNK:
    return [fn(x) for x in items]
  chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return [r for rs in pool.map(lambda c: [fn(x) for x in c], chunks) for r in rs]


def check_samples(samples: Sequence[Sample], workers: int = WORKERS) -> list[Fault]:
  """Faults of the samples' files: unreadable, truncated, a mask not of its image's size."""
  paths = list(dict.fromkeys(p for s in samples for p in (s.image_path, s.mask_path) if p))
  checked = dict(zip(paths, _map(check_file, paths, workers)))
  faults = [(p, problem) for p, (_, problem) in checked.items() if problem]
  for s in samples:
    if s.mask_path is None:
      continue
    isz, msz = checked[s.image_path][0], checked[s.mask_path][0]
    if isz and msz and isz != msz:
      faults.append((s.mask_path, (
          f"{s.mask_path}: the mask is {msz[0]}x{msz[1]} but its image {s.image_path} is "
          f"{isz[0]}x{isz[1]}; a mask must have its image's size (was one of them resized?)")))
  return faults


def _each_spec(data_config, which: str):
  """-> (name, root, categories or None, the reader's other options) per dataset."""
  for spec in datasets.specs(data_config, which):
    spec = dict(spec)
    yield spec.pop("name"), spec.pop("root"), spec.pop("categories", None), spec


def _listed(data_config, which: str, split: str) -> list[_Part]:
  parts = []
  for name, root, cats, spec in _each_spec(data_config, which):
    faults: list[Fault] = []
    # Sizes are compared below, from the headers read once for all the checks.
    samples = readers.read_dataset(name, root, cats or None, split, check_sizes=False,
                                   faults=faults, **spec)
    parts.append(_Part(name, which, split, samples, faults))
  return parts


def _record_faults(data_config, which: str, split: str) -> list[_Part]:
  """Record counts of each dataset's build: manifest, samples file and shards must agree."""
  parts = []
  for name, _, cats, spec in _each_spec(data_config, which):
    build_dir, manifest = prepared.find(data_config.tfds_dir, name, data_config.resize, cats,
                                        **spec)
    faults = _count_faults(build_dir, manifest, split)
    parts.append(_Part(name, which, split, [], faults))
  return parts


def _count_faults(build_dir: str, manifest: dict, split: str) -> list[Fault]:
  fix = "prepare it again (python -m inpformer_jax.data.prepare ...)"
  samples_path = prepared.samples_file(build_dir, split)
  info_path = os.path.join(build_dir, "dataset_info.json")
  try:
    with open(samples_path) as f:
      n_samples = len(json.load(f))
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    return [(build_dir, f"{build_dir}: {type(e).__name__}: {e}; {fix}")]
  shards = next((s for s in info.get("splits", []) if s.get("name") == split), None)
  if shards is None:
    return [(info_path, f"{info_path}: no split {split!r}; {fix}")]
  lengths = [int(n) for n in shards.get("shardLengths", [])]
  faults = []
  for i in range(len(lengths)):
    shard = os.path.join(build_dir, f"{info['name']}-{split}.{info.get('fileFormat')}-"
                         f"{i:05d}-of-{len(lengths):05d}")
    if not os.path.isfile(shard):
      faults.append((shard, f"{shard}: shard missing; {fix}"))
  n_manifest = manifest.get("num_records", {}).get(split)
  if not n_manifest == n_samples == sum(lengths):
    faults.append((build_dir, (
        f"{build_dir}: {split} records disagree: {n_manifest} in {prepared.MANIFEST}, "
        f"{n_samples} in {os.path.basename(samples_path)}, {sum(lengths)} in the shards; {fix}")))
  return faults


def _collect(data_config, which: str, split: str | None, workers: int) -> list[_Part]:
  split = split or which
  datasets.check_source(data_config)
  if data_config.source == "array_record":
    return _record_faults(data_config, which, split)
  parts = _listed(data_config, which, split)
  t0 = time.perf_counter()
  files = _file_faults([s for p in parts for s in p.samples], workers)
  for p in parts:
    p.faults += [f for s in p.samples for f in files.get(s.image_path, ())]
  n = sum(len(p.samples) for p in parts)
  logging.info("data: checked the files of %d %s images in %.1f s", n, split,
               time.perf_counter() - t0)
  return parts


def _file_faults(samples: list[Sample], workers: int) -> dict[str, list[Fault]]:
  """check_samples's faults by the image path of their sample (a mask's goes to its image)."""
  owner = {p: s.image_path for s in samples for p in (s.image_path, s.mask_path) if p}
  out: dict[str, list[Fault]] = {}
  for f in check_samples(samples, workers):
    out.setdefault(owner[f[0]], []).append(f)
  return out


def _splits(data_config, parts: list[_Part]) -> dict[str, datasets.Split]:
  faults = [f for p in parts for f in p.faults]
  if faults:
    raise DataFaults(faults, [f"{p.name} {p.split}" for p in parts if p.faults])
  out = {}
  for which in dict.fromkeys(p.which for p in parts):
    ps = [p for p in parts if p.which == which]
    if data_config.source == "files":
      out[which] = datasets.files_split(
          data_config, datasets.union(*(p.samples for p in ps)), ps[0].split)
    else:  # the records are opened (and counted against their samples) by read_split
      out[which] = datasets.read_split(data_config, which, ps[0].split)
  return out


def validate_split(data_config, which: str, split: str | None = None, *,
                   workers: int = WORKERS) -> datasets.Split:
  """datasets.read_split, checked: DataFaults names every fault of the split's data."""
  return _splits(data_config, _collect(data_config, which, split, workers))[which]


def validate_run(config, mode: str, *, workers: int = WORKERS) -> dict[str, datasets.Split]:
  """The splits a run reads, checked once before training: {'train': ..., 'test': ...}.

  'train' unless mode == 'eval' or config.setting == 'zero_shot', 'test' unless
  mode == 'train'. Raises DataFaults naming every fault of both splits together.
  """
  whiches = [w for w, wanted in (("train", mode != "eval" and config.setting != "zero_shot"),
                                 ("test", mode != "train")) if wanted]
  parts = [p for w in whiches for p in _collect(config.data, w, None, workers)]
  return _splits(config.data, parts)
