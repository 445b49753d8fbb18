"""config.data -> the samples a run trains and evaluates on, and where their pixels come from.

  config.data.train = "mvtec,visa"   ->  specs(config.data, "train")
    -> [{"name": "mvtec", "root": ..., "categories": [...] | None}, ...]
    -> read_split(config.data, "train")  Split: the union of the datasets' samples, in the
                                         given order, and one grain source of their images
    -> training_source(config, split)    that source, or (few-shot) the augmented support set

`config.data.source` says where the pixels come from: 'files' (the readers list the image
files under `config.data.roots`) or 'array_record' (the shards `prepare` wrote under
`config.data.tfds_dir`, found by `prepared.open_split`). Both give the same samples in the same
order, record i being sample i, so every pipeline gives the same batches from either.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


from inpformer_jax.data import fewshot
from inpformer_jax.data import prepared
from inpformer_jax.data import preprocess
from inpformer_jax.data import readers
from inpformer_jax.data import realiad
from inpformer_jax.data import sources
from inpformer_jax.data.records import Sample
from inpformer_jax.settings import ConfigError
from inpformer_jax.settings import comma_list


SOURCES = ("files", "array_record")
# config.data.layouts values: the readers a dataset NAME can be read with.
LAYOUTS = tuple(readers.READERS)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of the config's datasets.

  samples: the Sample records (metadata: class, label, mask presence, path) in order.
  source: a grain source (`inpformer_jax.data.sources`) of their images: record i is
    samples[i]; test splits carry masks.
  """
  samples: list[Sample]
  source: Any


def specs(data_config, which: str) -> list[dict]:
  """config.data.train / .test ('mvtec,visa') -> [{"name", "root", "categories", "layout",
  and the reader's options}] checked; every key but name/root/categories goes to the reader.

  layout: config.data.layouts.NAME, else NAME if it is a reader name, else detected from the
  root (`readers.detect_layout`). Options: Real-IAD's config.data.realiad fields where they
  differ from the reader's defaults (so that a default `prepare` build matches), and, reading
  files, masks_required (config.data.masks.NAME, default True).
  With records (`data.source='array_record'`) the roots are not needed and not checked.
  """
  names = comma_list(getattr(data_config, which))
  if not names:
    raise ConfigError(f"config.data.{which} is empty: name at least one dataset")
  out = []
  for name in names:
    if name not in data_config.roots:
      raise ConfigError(f"config.data.{which} names {name!r}, which has no "
                        f"config.data.roots.{name}; known: {', '.join(data_config.roots)}")
    root = data_config.roots[name]
    if data_config.source == "files" and (not root or not os.path.isdir(root)):
      raise ConfigError(
          f"dataset root for {name!r} not found: {root!r} (config.data.roots.{name}). "
          f"Download the dataset and pass --config.data.roots.{name}=/path/to/it "
          f"(or set $INPFORMER_DATA)")
    cats = data_config.categories.get(name, "") or ""
    layout = layout_of(data_config, name)
    out.append({"name": name, "root": root,
                "categories": comma_list(cats) or None,
                "layout": layout, **_reader_options(data_config, name, layout)})
  return out


def layout_of(data_config, name: str) -> str:
  """The reader name of dataset `name`: config.data.layouts.NAME, its own name, or detected."""
  given = data_config.layouts.get(name, "")
  if given:
    if given not in LAYOUTS:
      raise ConfigError(f"config.data.layouts.{name}={given!r}; choose one of "
                        f"{', '.join(LAYOUTS)}")
    return given
  if name.lower() in readers.READERS or name.lower() in readers.ALIASES:
    return readers.canonical_name(name)
  root = data_config.roots[name]
  found = readers.detect_layout(root) if root and os.path.isdir(root) else None
  if found is None:
    hint = (" (it holds split_csv/: the VisA download; make its 1cls layout with the "
            "spot-diff prepare_data.py and point at that)"
            if root and os.path.isdir(os.path.join(root, "split_csv")) else "")
    raise ConfigError(
        f"cannot tell the layout of dataset {name!r} (config.data.roots.{name}={root!r}){hint}: "
        f"no <class>/train/ or <class>/test/ folders and no realiad_jsons/; pass "
        f"--config.data.layouts.{name}=one of {'|'.join(LAYOUTS)}")
  return found


def _reader_options(data_config, name: str, layout: str) -> dict:
  if layout != "realiad":
    if data_config.source != "files":
      return {}  # a prepared build's samples say which classes have masks
    return {"masks_required": bool(data_config.masks.get(name, True))}
  if data_config.masks.get(name, True) is False:
    raise ConfigError(f"config.data.masks.{name}=False: a Real-IAD layout has a mask for "
                      "every anomalous image; drop it")
  ri = data_config.realiad
  if str(ri.resolution) not in realiad.RESOLUTIONS:
    raise ConfigError(f"config.data.realiad.resolution={ri.resolution!r}; choose one of "
                      f"{', '.join(realiad.RESOLUTIONS)} (the realiad_<resolution>/ folders)")
  views = tuple(v.strip().upper() for v in ri.views.split(",") if v.strip())
  bad = [v for v in views if v not in realiad.VIEWS]
  if bad:
    raise ConfigError(f"config.data.realiad.views={ri.views!r}: {bad} are not camera views; "
                      f"give some of {','.join(realiad.VIEWS)}, or '' for all")
  defaults = {"resolution": realiad.DEFAULT_RESOLUTION, "views": (),
              "jsons": realiad.DEFAULT_JSONS}
  options = {"resolution": str(ri.resolution), "views": views, "jsons": ri.jsons}
  return {k: v for k, v in options.items() if v != defaults[k]}


def union(*sample_lists: Sequence[Sample]) -> list[Sample]:
  """Concatenate datasets into one training/evaluation list (order kept, duplicates refused)."""
  out = [s for samples in sample_lists for s in samples]
  dup = [p for p, n in collections.Counter(s.image_path for s in out).items() if n > 1]
  if dup:
    raise ValueError(f"{len(dup)} images appear twice in the union, e.g. {dup[0]}: the same "
                     "dataset (or category) is listed twice in the config")
  return out


def read(dataset_specs: Sequence[Mapping[str, Any]], split: str) -> list[Sample]:
  """The union of the specs' samples of `split`; an empty result is a ConfigError.

  Extra keys of a spec go to `readers.read_dataset` (e.g. Real-IAD's resolution or views).
  """
  lists = []
  for spec in dataset_specs:
    spec = dict(spec)
    name, root = spec.pop("name"), spec.pop("root")
    lists.append(readers.read_dataset(name, root, spec.pop("categories", None) or None, split,
                                      **spec))
  samples = union(*lists)
  if not samples:
    raise ConfigError(f"no {split} images found under {[s['root'] for s in dataset_specs]} "
                      f"(categories {[s['categories'] for s in dataset_specs]})")
  return samples


def check_source(data_config) -> None:
  if data_config.source not in SOURCES:
    raise ConfigError(f"config.data.source={data_config.source!r}; choose one of "
                      f"{', '.join(SOURCES)}")


def files_split(data_config, samples: Sequence[Sample], split: str) -> Split:
  """Listed image files as a Split: their grain source reads masks for the test split."""
  return Split(list(samples), sources.PathSource(samples, data_config.resize,
                                                 with_masks=split == "test"))


def read_split(data_config, which: str, split: str | None = None) -> Split:
  """The datasets named by config.data.<which> ('train' | 'test'), split `split` (= which)."""
  split = split or which
  dataset_specs = specs(data_config, which)
  check_source(data_config)
  if data_config.source == "files":
    return files_split(data_config, read(dataset_specs, split), split)
  parts = []
  for spec in dataset_specs:
    spec = dict(spec)
    name, _ = spec.pop("name"), spec.pop("root")
    parts.append(prepared.open_split(data_config.tfds_dir, name, split,
                                     resize=data_config.resize, **spec))
  samples = union(*(p[0] for p in parts))
  source = parts[0][1] if len(parts) == 1 else sources.ConcatSource(*(p[1] for p in parts))
  return Split(samples, source)


def training_source(config, split: Split):
  """The split's image source, or (few-shot) an ArraySource of the float32 (k*C*22, S, S, 3)
  augmented support set, its shots read from the same source."""
  if config.setting != "few_shot":
    return split.source
  shots = fewshot.select_shots(split.samples, config.few_shot.shots, config.seed)
  logging.info("few-shot: %d shots: %s", len(shots), [Path(s.image_path).name for s in shots])
  position = {s.image_path: i for i, s in enumerate(split.samples)}
  images = [preprocess.finish_from_resized(split.source[position[s.image_path]]["image"],
                                           config.data.crop) for s in shots]
  return sources.ArraySource(fewshot.expand_shots(images, seed=config.seed,
                                                  augment=config.few_shot.augment))
