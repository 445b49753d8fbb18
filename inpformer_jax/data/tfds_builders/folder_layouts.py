"""TFDS builders of the MVTec-layout readers: `demo`, `folder` (any such folder), `mpdd`, `btad`.

python -m inpformer_jax.data.prepare --dataset folder --manual_dir /data/my_parts \
    --data_dir /data/tfds [--resize 448]
"""

from inpformer_jax.data.tfds_builders import common

_LAYOUT = """\
  Pass the folder holding <class>/train/good, <class>/test/<defect> and (for pixel metrics)
  <class>/ground_truth/<defect> as --manual_dir.
  """


class Demo(common.AnomalyBuilder):
  """The generated demo dataset (python -m inpformer_jax.data.demo), pre-resized."""

  READER = "demo"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "  Write it with python -m inpformer_jax.data.demo --out DIR.\n"


class Folder(common.AnomalyBuilder):
  """Any dataset in MVTec layout (the users' own parts), pre-resized."""

  READER = "folder"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _LAYOUT


class Mpdd(common.AnomalyBuilder):
  """MPDD (6 classes of metal parts), pre-resized."""

  READER = "mpdd"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "  Download MPDD from https://github.com/stepanje/MPDD and extract it.\n" + _LAYOUT)


class Btad(common.AnomalyBuilder):
  """BTAD (3 products), pre-resized."""

  READER = "btad"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "  Download BTAD (BTech_Dataset_transformed) and extract it.\n" + _LAYOUT)
