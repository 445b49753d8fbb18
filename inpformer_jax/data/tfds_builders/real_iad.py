"""TFDS builder `real_iad`: Real-IAD (every view image is a sample), as ArrayRecord shards.

python -m inpformer_jax.data.prepare --dataset real_iad --manual_dir /data/Real-IAD \
    --data_dir /data/tfds [--resize 448]
"""

from inpformer_jax.data.tfds_builders import common


class RealIad(common.AnomalyBuilder):
  """Real-IAD (30 classes, 5 views) images and masks, pre-resized."""

  READER = "realiad"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Request Real-IAD at https://realiad4ad.github.io/Real-IAD/ , extract the image folders
  (realiad_1024/<class>/..., or realiad_256/512/raw) and the split JSONs
  (realiad_jsons/...), and pass the folder holding them as --manual_dir.
  """
