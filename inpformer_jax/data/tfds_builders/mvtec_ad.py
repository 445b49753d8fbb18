"""TFDS builder `mvtec_ad`: MVTec AD from a manual download, as ArrayRecord shards.

python -m inpformer_jax.data.prepare --dataset mvtec_ad --manual_dir /data/mvtec \
    --data_dir /data/tfds [--resize 448]
"""

from inpformer_jax.data.tfds_builders import common


class MvtecAd(common.AnomalyBuilder):
  """MVTec AD (15 classes) images and masks, pre-resized."""

  READER = "mvtec"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (licence
  CC BY-NC-SA 4.0), extract it, and pass the folder holding <class>/train/good,
  <class>/test/<defect>, <class>/ground_truth/<defect> as --manual_dir.
  """
