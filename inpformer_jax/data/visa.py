"""VisA reader, in the `1cls` layout made by the spot-diff split script (SPEC §9).

  <root>/<class>/train/good/*.JPG   <root>/<class>/test/{good,bad}/*.JPG
  <root>/<class>/ground_truth/bad/<stem>.png       (mask has the image's stem, no suffix)
Usage: read_visa('/data/VisA_pytorch/1cls', split='train')
"""

from __future__ import annotations

from typing import Sequence

from inpformer_jax.data import folder
from inpformer_jax.data.records import Sample

VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)


def read_visa(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
              dataset: str = "visa", masks_required: bool = True, check_sizes: bool = True,
              verify: bool = False, faults: list[folder.Fault] | None = None) -> list[Sample]:
  """Samples of VisA (1cls layout); categories None: all 12 classes."""
  return folder.read_layout(root, categories, split, dataset=dataset, known_classes=VISA_CLASSES,
                            good="good", mask_suffix="", masks_required=masks_required,
                            check_sizes=check_sizes, verify=verify, faults=faults)
