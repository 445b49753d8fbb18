"""Writes a dataset as pre-resized ArrayRecord shards (TFDS format, no TensorFlow needed).

python -m inpformer_jax.data.prepare --dataset real_iad --manual_dir /data/Real-IAD \
    --data_dir /data/tfds [--resize 448] [--encoding png|raw] [--categories audiojack,pcb] \
    [--resolution 1024] [--views C1,C2]

Then train with --config.data.source=array_record --config.data.tfds_dir=/data/tfds: the run
reads the same images, in the same order, as from the files (`prepared.open_split`), minus the
JPEG/PNG decode and the resize of the full-size originals. --dataset takes every reader name:
mvtec, visa, realiad, demo, folder (any MVTec-layout folder), mpdd, btad.

A user mistake (a missing --manual_dir, a dataset that does not read, an option for another
dataset) is one `error: ...` line and exit status 2; `--verbose` adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import time

from absl import flags

from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax.data import prepared
from inpformer_jax.data import tfds_builders


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("dataset", None, f"a reader name ({', '.join(prepared.BUILDER_NAMES)}) "
                      f"or a builder name ({', '.join(sorted(tfds_builders.BUILDERS))})",
                      flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "the extracted dataset root", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "where the ArrayRecord shards are written",
                      flag_values=fv)
  flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"], flag_values=fv)
  flags.DEFINE_integer("resize", 448, "stored side; must equal the training config's "
                       "data.resize", flag_values=fv)
  flags.DEFINE_enum("encoding", "png", ("png", "raw"), "png: lossless, small; raw: uint8 "
                    "bytes, no decode when reading", flag_values=fv)
  flags.DEFINE_string("categories", "", "comma-separated classes (default: all classes of the "
                      "dataset)", flag_values=fv)
  flags.DEFINE_string("resolution", None, "Real-IAD only: the image folder "
                      "realiad_<resolution> (default 1024)", flag_values=fv)
  flags.DEFINE_string("views", None, "Real-IAD only: e.g. C1,C3 (default: all 5)",
                      flag_values=fv)
  flags.DEFINE_string("jsons", None, "Real-IAD only: the split-JSON folder (default "
                      "realiad_jsons)", flag_values=fv)


def prepare(args: flags.FlagValues) -> str:
  """Writes the shards `args` ask for -> their build directory."""
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  cls = tfds_builders.builder_class(args.dataset)
  reader_kwargs = {}
  for key in ("resolution", "views", "jsons"):
    value = getattr(args, key)
    if value is None:
      continue
    if cls is not tfds_builders.RealIad:
      raise errors.UserError(f"--{key} applies to --dataset real_iad only, not {args.dataset}: "
                             f"drop --{key}")
    reader_kwargs[key] = tuple(value.split(",")) if key == "views" else value
  categories = [c for c in args.categories.split(",") if c] or None
  t0 = time.time()
  path = tfds_builders.prepare(cls, manual_dir=args.manual_dir, data_dir=args.data_dir,
                               resize=args.resize, categories=categories,
                               encoding=args.encoding, **reader_kwargs)
  print(f"prepared {cls.name} at {path} in {time.time() - t0:.1f} s")
  return path


def _main(args: flags.FlagValues) -> int:
  prepare(args)
  return 0


def main(argv=None) -> int:
  return cli.run_flags(_main, _define, argv, prog="python -m inpformer_jax.data.prepare",
                       doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
