"""The sample record every reader returns and every pipeline consumes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a dataset split.

  image_path: absolute path of the image file.
  mask_path: absolute path of its ground-truth mask, or None (normal image, or a test set
    without masks -- then `has_mask` is False and pixel metrics are skipped for the class).
  label: 0 normal, 1 anomalous.
  dataset: 'mvtec' | 'visa' | 'realiad' | 'folder' | 'demo' | a user name.
  category: the product class ('bottle', ...).
  defect: 'good' or the defect type ('crack', 'bad', Real-IAD anomaly_class, ...).
  has_mask: whether pixel ground truth exists for this sample's class (normal images of a
    class with masks count as having an all-zero mask).
  """
  image_path: str
  mask_path: str | None
  label: int
  dataset: str
  category: str
  defect: str = "good"
  has_mask: bool = True
