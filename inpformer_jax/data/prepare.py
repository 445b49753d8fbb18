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

import argparse
import logging
import sys
import time

from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax.data import prepared
from inpformer_jax.data import tfds_builders


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m inpformer_jax.data.prepare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True,
                 help=f"a reader name ({', '.join(prepared.BUILDER_NAMES)}) or a builder "
                 f"name ({', '.join(sorted(tfds_builders.BUILDERS))})")
  p.add_argument("--manual_dir", required=True, help="the extracted dataset root")
  p.add_argument("--data_dir", required=True, help="where the ArrayRecord shards are written")
  p.add_argument("--resize", type=int, default=448,
                 help="stored side; must equal the training config's data.resize")
  p.add_argument("--encoding", default="png", choices=("png", "raw"),
                 help="png: lossless, small; raw: uint8 bytes, no decode when reading")
  p.add_argument("--categories", default="",
                 help="comma-separated classes (default: all classes of the dataset)")
  p.add_argument("--resolution", default=None,
                 help="Real-IAD only: the image folder realiad_<resolution> (default 1024)")
  p.add_argument("--views", default=None, help="Real-IAD only: e.g. C1,C3 (default: all 5)")
  p.add_argument("--jsons", default=None,
                 help="Real-IAD only: the split-JSON folder (default realiad_jsons)")
  return p


def prepare(args: argparse.Namespace) -> str:
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


def _main(args: argparse.Namespace) -> int:
  prepare(args)
  return 0


def main(argv=None) -> int:
  return cli.run(_main, parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
