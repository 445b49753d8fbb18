"""config.data -> the samples a run trains and evaluates on.

  config.data.train = "mvtec,visa"   ->  specs(config.data, "train")
    -> [{"name": "mvtec", "root": ..., "categories": [...] | None}, ...]
    -> read(specs, "train")          the union of the datasets' samples, in the given order
    -> training_source(config, ...)  the samples, or (few-shot) the augmented support set
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from inpformer_jax.data import fewshot
from inpformer_jax.data import preprocess
from inpformer_jax.data import readers
from inpformer_jax.data.records import Sample
from inpformer_jax.settings import ConfigError


def specs(data_config, which: str) -> list[dict]:
  """config.data.train / .test ('mvtec,visa') -> [{"name", "root", "categories"}] checked."""
  names = [n.strip() for n in getattr(data_config, which).split(",") if n.strip()]
  if not names:
    raise ConfigError(f"config.data.{which} is empty: name at least one dataset")
  out = []
  for name in names:
    if name not in data_config.roots:
      raise ConfigError(f"config.data.{which} names {name!r}, which has no "
                        f"config.data.roots.{name}; known: {', '.join(data_config.roots)}")
    root = data_config.roots[name]
    if not root or not os.path.isdir(root):
      raise ConfigError(
          f"dataset root for {name!r} not found: {root!r} (config.data.roots.{name}). "
          f"Download the dataset and pass --config.data.roots.{name}=/path/to/it "
          f"(or set $INPFORMER_DATA)")
    cats = data_config.categories.get(name, "") or ""
    out.append({"name": name, "root": root,
                "categories": [c.strip() for c in cats.split(",") if c.strip()] or None})
  return out


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


def training_source(config, samples: list[Sample]) -> list[Sample] | np.ndarray:
  """The samples, or (few-shot) the float32 (k*C*22, S, S, 3) augmented support set."""
  if config.setting != "few_shot":
    return samples
  shots = fewshot.select_shots(samples, config.few_shot.shots, config.seed)
  logging.info("few-shot: %d shots: %s", len(shots), [Path(s.image_path).name for s in shots])
  return fewshot.support_set(shots, preprocess.Preprocessing(config.data.resize, config.data.crop),
                             seed=config.seed, augment=config.few_shot.augment)
