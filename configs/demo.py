r"""The embedded demo: train and evaluate on the generated demo dataset, on a CPU, in minutes.

  python -m inpformer_jax.main --config configs/demo.py --workdir demo_workdir

`make demo` first writes the dataset (`python -m inpformer_jax.data.demo --out demo_data`):
four texture classes from scikit-image's sample photographs with pasted defects (MVTec
layout). The model is a small ViT (width 64, 10 blocks, 8x8 patches at 112 px) with a RANDOM
encoder unless --config.model.encoder_weights names real weights, so the numbers show that the
whole pipeline works, not INP-Former's accuracy (which comes from the pretrained DINOv2).
Tiny smoke run: --config configs/demo.py:runlocal=True
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.data.train = "demo"
  c.data.test = "demo"
  c.model.encoder = "custom"
  c.model.encoder_weights = "random"
  c.model.width = 64
  c.model.depth = 10  # target layers 2..9
  c.model.num_heads = 2
  c.model.num_registers = 0
  c.data.resize = 128
  c.data.crop = 112
  c.data.num_workers = 0  # the images are small; worker processes would cost more than they save.
  c.train.batch_size = 8
  c.train.epochs = 10  # 160 images / 8 = 20 steps per epoch -> 200 steps.
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.optim.warmup_steps = 20
  c.eval.batch_size = 8
  c.eval.num_overlays = 2
  if a.runlocal:
    common.apply_runlocal(c)
  return c
