"""TFDS builder `visa`: VisA in the common 1cls layout, as ArrayRecord shards.

python -m inpformer_jax.data.prepare --dataset visa --manual_dir /data/VisA_pytorch/1cls \
    --data_dir /data/tfds [--resize 448]
"""

from inpformer_jax.data.tfds_builders import common


class Visa(common.AnomalyBuilder):
  """VisA (12 classes) images and masks, pre-resized."""

  READER = "visa"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download VisA from https://github.com/amazon-science/spot-diff (licence CC BY 4.0), convert
  it to the 1cls layout with the split script shipped there (<class>/train/good,
  <class>/test/{good,bad}, <class>/ground_truth/bad), and pass that folder as --manual_dir.
  """
