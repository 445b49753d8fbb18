"""The shared TFDS builder: a reader's splits as ArrayRecord shards, written without TensorFlow.

Each example holds the image resized by PIL to the config's resize size (uint8, PNG: lossless,
so `preprocess.finish_from_resized` on the decoded pixels reproduces `preprocess.load_image` bit
for bit), the mask resized the same way (zeros for normal images), and the sample's fields.
TFDS needs TensorFlow only to encode numpy images and to build `tf.data` pipelines; we hand it
PIL images (encoded with PIL) and read back through `tfds.data_source` (decoded with PIL), so
neither direction imports TensorFlow.

Records keep the reader's order (`disable_shuffling=True`): record i of a split is the i-th
`Sample` that `readers.read_dataset` returns, which makes the ArrayRecord and file pipelines give
the same batches for the same seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from PIL import Image

from inpformer_jax import errors
from inpformer_jax.data import prepared
from inpformer_jax.data import preprocess
from inpformer_jax.data import readers
from inpformer_jax.data.records import Sample

SPLITS = ("train", "test")
ENCODINGS = ("png", "raw")


@dataclasses.dataclass(eq=False)
class AnomalyConfig(tfds.core.BuilderConfig):
  """resize: stored side (the config's data.resize, 448 officially; crop happens at read time).

  categories: the classes to store (empty: every class the reader finds).
  reader_kwargs: sorted (key, value) pairs passed to `readers.read_dataset` (e.g. Real-IAD's
    resolution folder or view filter); part of the config name so different choices do not
    overwrite each other.
  encoding: 'png' (lossless, about 3x smaller than raw) or 'raw' (uint8 bytes: no decode at
    read time, for the fastest input pipelines; 602 kB per 448 image).
  """
  resize: int = 448
  categories: tuple[str, ...] = ()
  encoding: str = "png"
  reader_kwargs: tuple[tuple[str, Any], ...] = ()


def config_name(resize: int, categories: Sequence[str] = (), encoding: str = "png",
                **reader_kwargs) -> str:
  """A stable config (directory) name: resize448[-raw][-bottle+cable][-key_value...]."""
  if encoding not in ENCODINGS:
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
  name = f"resize{resize}" + ("" if encoding == "png" else f"-{encoding}")
  if categories:
    name += "-" + "+".join(categories)
  for k, v in prepared.options_key(reader_kwargs).items():
    name += f"-{k}_{v}"
  return name


def make_config(resize: int = 448, categories: Sequence[str] | None = None,
                encoding: str = "png", **reader_kwargs) -> AnomalyConfig:
  categories = tuple(categories or ())
  kw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                    for k, v in reader_kwargs.items() if v is not None))
  return AnomalyConfig(name=config_name(resize, categories, encoding, **dict(kw)),
                       version=tfds.core.Version("1.0.0"), resize=resize,
                       categories=categories, reader_kwargs=kw, encoding=encoding)


def _encode(sample: Sample, index: int, resize: int, encoding: str) -> dict[str, Any]:
  image = preprocess.resize_pil_only(sample.image_path, resize)
  if sample.mask_path is None:
    mask = np.zeros((resize, resize), np.uint8)
  else:
    mask = preprocess.resize_mask_pil_only(sample.mask_path, resize)
  return {
      "image": Image.fromarray(image, "RGB") if encoding == "png" else image,
      "mask": Image.fromarray(mask, "L"),
      "label": np.int32(sample.label),
      "has_mask": bool(sample.has_mask),
      "dataset": sample.dataset,
      "category": sample.category,
      "defect": sample.defect,
      "path": sample.image_path,
      "index": np.int64(index),
  }


class AnomalyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses set READER (a `readers.read_dataset` name) and their download notes."""

  READER = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Pre-resized uint8 images (PNG or raw) and PNG masks, reader order."}
  BUILDER_CONFIGS = [make_config(448)]

  @tfds_utils.classproperty
  @classmethod
  def url_infos(cls):
    # Nothing is downloaded (manual_dir only), so there are no checksums to look up; TFDS's
    # lookup would also need the `importlib_resources` backport for builders in a package.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resize
    if self.builder_config.encoding == "raw":
      image = tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, encoding="bytes")
    else:
      image = tfds.features.Image(shape=(r, r, 3), encoding_format="png")
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.READER} images and masks resized to {r}x{r} (PIL bilinear).",
        features=tfds.features.FeaturesDict({
            "image": image,
            "mask": tfds.features.Image(shape=(r, r, 1), encoding_format="png"),
            "label": np.int32,
            "has_mask": np.bool_,
            "dataset": tfds.features.Text(),
            "category": tfds.features.Text(),
            "defect": tfds.features.Text(),
            "path": tfds.features.Text(),
            "index": np.int64,
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    out = {}
    for split in SPLITS:
      samples = readers.read_dataset(self.READER, root, list(cfg.categories) or None, split,
                                     **dict(cfg.reader_kwargs))
      out[split] = self._generate_examples(samples)
    return out

  def _generate_examples(self, samples: Sequence[Sample]) -> Iterator[tuple[int, dict]]:
    # PIL decodes and resizes with the GIL released, so threads give a real speed-up; results
    # come back in order, keeping record i == samples[i].
    # Chunks bound the memory held by finished-but-unwritten examples.
    r, enc = self.builder_config.resize, self.builder_config.encoding
    threads = os.cpu_count() or 1
    chunk = 16 * threads
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for start in range(0, len(samples), chunk):
        idx = range(start, min(start + chunk, len(samples)))
        for i, example in zip(idx, pool.map(lambda i: _encode(samples[i], i, r, enc), idx)):
          yield i, example


def prepare(builder_cls, *, manual_dir: str, data_dir: str, resize: int = 448,
            categories: Sequence[str] | None = None, encoding: str = "png",
            **reader_kwargs) -> str:
  """Builds (or reuses) the ArrayRecord shards and their manifest; returns the build directory.

  The manifest (`prepared.write_manifest`) is written after the shards, from the same reader
  calls the builder made, so a build without one is incomplete and never used for training.
  """
  if not os.path.isdir(manual_dir):
    raise errors.MissingFileError(f"--manual_dir {manual_dir} does not exist: point it at the "
                                  f"extracted {builder_cls.READER} dataset root")
  config = make_config(resize, categories, encoding, **reader_kwargs)
  builder = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  path = os.fspath(builder.data_dir)
  kwargs = dict(config.reader_kwargs)
  splits = {split: readers.read_dataset(builder_cls.READER, manual_dir,
                                        list(config.categories) or None, split, **kwargs)
            for split in SPLITS}
  for split, samples in splits.items():
    stored = builder.info.splits[split].num_examples
    if stored != len(samples):
      raise ValueError(f"{path}: {stored} {split} records, but the reader now finds "
                       f"{len(samples)} images under {manual_dir}; delete {path} and prepare "
                       "again")
  prepared.write_manifest(path, reader=builder_cls.READER, resize=resize, encoding=encoding,
                          categories=config.categories, reader_kwargs=kwargs, splits=splits)
  return path
