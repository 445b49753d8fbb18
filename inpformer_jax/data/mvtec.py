"""MVTec AD reader (SPEC §9): `<root>/<class>/{train/good, test/<defect>, ground_truth/<defect>}`.

Masks are `ground_truth/<defect>/<stem>_mask.png`. Usage:
  samples = read_mvtec('/data/mvtec_anomaly_detection', split='test')
"""

from __future__ import annotations

from typing import Sequence

from inpformer_jax.data import folder
from inpformer_jax.data.records import Sample

MVTEC_CLASSES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
    "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)


def read_mvtec(root: str, categories: Sequence[str] | None = None, split: str = "test", *,
               dataset: str = "mvtec", masks_required: bool = True, check_sizes: bool = True,
               verify: bool = False, faults: list[folder.Fault] | None = None) -> list[Sample]:
  """Samples of MVTec AD; categories None: all 15 classes (in the paper's order)."""
  return folder.read_layout(root, categories, split, dataset=dataset, known_classes=MVTEC_CLASSES,
                            good="good", mask_suffix="_mask", masks_required=masks_required,
                            check_sizes=check_sizes, verify=verify, faults=faults)
