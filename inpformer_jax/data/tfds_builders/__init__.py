"""TFDS builders writing ArrayRecord shards without TensorFlow, one per reader: `mvtec_ad`,
`visa`, `real_iad`, `demo`, `folder`, `mpdd`, `btad`.

Build with `python -m inpformer_jax.data.prepare`; the trainer finds the builds through their
manifests (`prepared.open_split`); `source(...)` opens one build directly as a
`sources.ArrayRecordSource` for `pipeline.train_dataset(source=...)` / `eval_batches(source=...)`.
"""

from __future__ import annotations

import os
from typing import Sequence

from inpformer_jax import errors
from inpformer_jax.data import prepared
from inpformer_jax.data import sources
from inpformer_jax.data.tfds_builders.common import (AnomalyBuilder, config_name, make_config,
                                                     prepare)
from inpformer_jax.data.tfds_builders.folder_layouts import Btad, Demo, Folder, Mpdd
from inpformer_jax.data.tfds_builders.mvtec_ad import MvtecAd
from inpformer_jax.data.tfds_builders.real_iad import RealIad
from inpformer_jax.data.tfds_builders.visa import Visa
from inpformer_jax.settings import ConfigError

# Builder name (prepared.BUILDER_NAMES: TFDS's snake_case of the class name) -> builder.
BUILDERS = {cls.name: cls for cls in (MvtecAd, Visa, RealIad, Demo, Folder, Mpdd, Btad)}


def builder_class(name: str) -> type[AnomalyBuilder]:
  """A builder or reader name ('mvtec_ad', 'mvtec', 'folder', ...) -> its builder."""
  if name in BUILDERS:
    return BUILDERS[name]
  try:
    return BUILDERS[prepared.builder_name(name)]
  except ValueError:
    raise ConfigError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)} or a "
                     "reader name (mvtec, realiad)") from None


def builder_dir(data_dir: str, name: str, resize: int = 448,
                categories: Sequence[str] | None = None, encoding: str = "png",
                **reader_kwargs) -> str:
  """Where `prepare` wrote (name, config): <data_dir>/<name>/<config>/<version>."""
  cls = builder_class(name)
  config = config_name(resize, tuple(categories or ()), encoding, **reader_kwargs)
  path = os.path.join(data_dir, cls.name, config, str(cls.VERSION))
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise errors.MissingFileError(
        f"no prepared {cls.name} data at {path}; run python -m inpformer_jax.data.prepare "
        f"--dataset {cls.name} --manual_dir <dataset root> --data_dir {data_dir} "
        f"--resize {resize}" + ("" if encoding == "png" else f" --encoding {encoding}"))
  return path


def source(data_dir: str, name: str, split: str, *, resize: int = 448,
           categories: Sequence[str] | None = None, with_masks: bool = False,
           encoding: str = "png", **reader_kwargs):
  """A prepared split as a grain source (`sources.ArrayRecordSource`)."""
  path = builder_dir(data_dir, name, resize, categories, encoding, **reader_kwargs)
  return sources.ArrayRecordSource(path, split, with_masks=with_masks)


__all__ = ["AnomalyBuilder", "BUILDERS", "Btad", "Demo", "Folder", "Mpdd", "MvtecAd", "RealIad",
           "Visa", "builder_class",
           "builder_dir", "config_name", "make_config", "prepare", "source"]
