"""The flags every serving command line shares, and how they turn into a loaded model."""

from __future__ import annotations

from typing import Callable

from absl import flags as absl_flags

from inpformer_jax import cli
from inpformer_jax import errors
from inpformer_jax import loading
from inpformer_jax import xla_flags


class FlagError(errors.UserError, ValueError):
  """A serving flag whose value cannot work; the message names the flag and the fix."""


def define(fv: absl_flags.FlagValues) -> None:
  """The shared model flags, on the FlagValues of one command line (`cli.run_flags`)."""
  absl_flags.DEFINE_string("checkpoint", None,
                           "training workdir, converted params dir or official model.pth",
                           flag_values=fv)
  absl_flags.mark_flag_as_required("checkpoint", flag_values=fv)
  absl_flags.DEFINE_integer("image_size", None,
                            "crop side (default: the checkpoint's config, or 392)", flag_values=fv)
  absl_flags.DEFINE_integer("resize", None, "resize side before the crop (default: config, or 448)",
                            flag_values=fv)
  absl_flags.DEFINE_bool("zero_shot", False,
                         "map = distance to the nearest INP (the zero-shot setting)",
                         flag_values=fv)
  absl_flags.DEFINE_string("calibration", None,
                           "a calibration.json elsewhere (default: beside the checkpoint)",
                           flag_values=fv)
  absl_flags.DEFINE_integer("batch_size", 8, "images per forward pass", flag_values=fv)
  absl_flags.DEFINE_bool("progress", True, "a progress bar on stderr (--noprogress: none)",
                         flag_values=fv)


def load(a: absl_flags.FlagValues) -> loading.Loaded:
  # The evaluation's XLA flags for the same forward, set before the model's first JAX call.
  xla_flags.configure_cpu_flags()
  return loading.load(a.checkpoint, image_size=a.image_size, resize=a.resize,
                      zero_shot=a.zero_shot, calibration=a.calibration)


def run(main: Callable[[absl_flags.FlagValues], int],
        define_tool: Callable[[absl_flags.FlagValues], None], argv=None, *, prog: str, doc: str,
        rest: str | None = None) -> int:
  """A serving command line: the shared flags, then the tool's (`cli.run_flags`)."""
  def define_all(fv):
    define(fv)
    define_tool(fv)
  return cli.run_flags(main, define_all, argv, prog=f"python -m {prog}", doc=doc, rest=rest)
