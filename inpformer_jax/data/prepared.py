"""Prepared ArrayRecord datasets: what `prepare` stored, found again from the config.

  python -m inpformer_jax.data.prepare --dataset mvtec --manual_dir D --data_dir T
  python -m inpformer_jax.main ... --config.data.source=array_record --config.data.tfds_dir=T

Beside the shards of each build (`<T>/<builder>/<config>/<version>/`) `prepare` writes a
manifest, `inpformer.json` (reader, stored side, encoding, classes, reader options) and the
`Sample` records of each split in record order (`samples_<split>.json`): record i IS sample i.
The trainer needs those records without the original files -- for the class of every test
image, few-shot selection and the union of several datasets -- and without opening the
shards, so this module reads JSON only (no TensorFlow Datasets import).

`open_split` picks, for one dataset of the config, a build with the config's side, the
config's reader options and every class the config names (a build of all classes serves any
subset: its records are selected per class, in the config's class order, which is the order
the file readers return them in), and returns the samples with their record source.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

from inpformer_jax.data import sources
from inpformer_jax.data import readers
from inpformer_jax.data.records import Sample
from inpformer_jax.settings import ConfigError

MANIFEST = "inpformer.json"
SPLITS = ("train", "test")
# TFDS builder name (the folder under data_dir) of every reader.
BUILDER_NAMES = {"mvtec": "mvtec_ad", "visa": "visa", "realiad": "real_iad", "demo": "demo",
                 "folder": "folder", "mpdd": "mpdd", "btad": "btad"}


def builder_name(dataset: str) -> str:
  """A reader name or alias ('mvtec', 'mvtec_ad', ...) -> its TFDS builder name."""
  return BUILDER_NAMES[readers.canonical_name(dataset)]


def options_key(reader_kwargs: dict[str, Any]) -> dict[str, str]:
  """Reader options as stored in the manifest (JSON has no tuples; '256' == 256)."""
  return {k: "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
          for k, v in sorted(reader_kwargs.items()) if v is not None}


def samples_file(build_dir: str, split: str) -> str:
  return os.path.join(build_dir, f"samples_{split}.json")


def write_manifest(build_dir: str, *, reader: str, resize: int, encoding: str,
                   categories: Sequence[str] | None, reader_kwargs: dict[str, Any],
                   splits: dict[str, Sequence[Sample]]) -> None:
  """Called by `prepare` once the shards are complete; the manifest is written last."""
  for split, samples in splits.items():
    with open(samples_file(build_dir, split), "w") as f:
      json.dump([dataclasses.asdict(s) for s in samples], f)
  manifest = {"reader": readers.canonical_name(reader), "resize": int(resize),
              "encoding": encoding, "subset": bool(categories),
              "categories": readers.classes_of([s for v in splits.values() for s in v]),
              "reader_kwargs": options_key(reader_kwargs),
              "num_records": {k: len(v) for k, v in splits.items()}}
  tmp = os.path.join(build_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(build_dir, MANIFEST))


def builds(data_dir: str, dataset: str) -> list[tuple[str, dict]]:
  """(build dir, manifest) of every complete build of reader `dataset` under `data_dir`."""
  pattern = os.path.join(glob.escape(data_dir), builder_name(dataset), "*", "*", MANIFEST)
  out = []
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      out.append((os.path.dirname(path), json.load(f)))
  return out


def _prepare_command(dataset, data_dir, resize, categories, reader_kwargs) -> str:
  cmd = (f"python -m inpformer_jax.data.prepare --dataset {readers.canonical_name(dataset)} "
         f"--manual_dir <the {dataset} root> --data_dir {data_dir} --resize {resize}")
  if categories:
    cmd += f" --categories {','.join(categories)}"
  return cmd + "".join(f" --{k} {v}" for k, v in options_key(reader_kwargs).items())


def find(data_dir: str, dataset: str, resize: int, categories: Sequence[str] | None = None,
         *, layout: str | None = None, **reader_kwargs) -> tuple[str, dict]:
  """The build serving (dataset, side, classes, options) -> (build dir, manifest).

  layout: the reader a config's dataset NAME is read with (None: `dataset` names it): a
  `prepare --dataset <layout>` build serves NAME.
  Preference: a build of exactly these classes, then one of all classes; raw before png
  (same pixels, no decode). No match is a ConfigError that names the `prepare` command.
  """
  dataset = layout or dataset
  if not data_dir or not os.path.isdir(data_dir):
    raise ConfigError(f"config.data.tfds_dir={data_dir!r} is not a directory: pass the "
                      "--data_dir of python -m inpformer_jax.data.prepare")
  want = options_key(reader_kwargs)
  found = [(d, m) for d, m in builds(data_dir, dataset) if m["reader_kwargs"] == want]
  fix = _prepare_command(dataset, data_dir, resize, categories, reader_kwargs)

  def serves(m):
    return set(categories or ()) <= set(m["categories"]) if categories else not m["subset"]

  usable = [(d, m) for d, m in found if serves(m)]
  right_side = [(d, m) for d, m in usable if m["resize"] == resize]
  if right_side:
    exact = lambda m: list(categories or ()) == m["categories"]  # noqa: E731
    return min(right_side, key=lambda dm: (not exact(dm[1]), dm[1]["encoding"] != "raw"))
  if usable:
    sides = sorted({m["resize"] for _, m in usable})
    raise ConfigError(f"{dataset} is prepared in {data_dir} with stored side {sides}, but "
                      f"config.data.resize={resize}: prepare it at that side ({fix}) or set "
                      f"--config.data.resize={sides[0]}")
  what = f"classes {','.join(categories)}" if categories else "all classes"
  raise ConfigError(f"no prepared {dataset} ({what}, options {want or 'none'}) in "
                    f"config.data.tfds_dir={data_dir}: run {fix}")


def open_split(data_dir: str, dataset: str, split: str, *, resize: int,
               categories: Sequence[str] | None = None, layout: str | None = None,
               **reader_kwargs) -> tuple[list[Sample], Any]:
  """-> (the samples of `split` in file-reader order, a grain source of their records).

  Test splits carry masks and metadata (`with_masks`), training splits the images only.
  With a layout the samples' dataset is `dataset` (the config's name), as from the files.
  """
  build_dir, manifest = find(data_dir, dataset, resize, categories, layout=layout,
                             **reader_kwargs)
  with open(samples_file(build_dir, split)) as f:
    stored = [Sample(**dict(d, dataset=dataset) if layout else d) for d in json.load(f)]
  source = sources.ArrayRecordSource(build_dir, split, with_masks=split == "test")
  if len(source) != len(stored):
    raise ConfigError(f"{build_dir}: {len(source)} {split} records but {len(stored)} samples "
                      f"in {samples_file(build_dir, split)}; prepare it again")
  if categories and list(categories) != manifest["categories"]:
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(stored):
      by_class.setdefault(s.category, []).append(i)
    rows = [i for c in categories for i in by_class.get(c, [])]
    return [stored[i] for i in rows], sources.SubsetSource(source, rows)
  return stored, source
