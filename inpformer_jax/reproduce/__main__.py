r"""Reproduce the paper's tables with one command, and compare with the paper's numbers.

  python -m inpformer_jax.reproduce --tables=S9,S12,S13 --workdir=W \
      --config_overrides=data.roots.mvtec=/data/mvtec_anomaly_detection
  python -m inpformer_jax.reproduce --tables=all --workdir=W --dry_run   # the plan, no training

For each table, the runs it needs (dataset, setting, encoder, image size, shots; one run
serves several tables), each in W/<run key>/ (resumed when it holds a checkpoint, skipped when
finished), then W/comparison.{md,csv,json}: per table, per class and mean, ours next to the
paper's with the difference, flagged past --tolerance. --dry_run lists the runs, their steps,
the images they read and their time on these devices from a measured step rate (cached in
W/step_rates.json). Parts of tables that are other methods' numbers are listed with that
reason. docs/reproduce.md says what each table needs and how to read the differences.
"""

from __future__ import annotations

import os
import sys

from inpformer_jax import allocator

if __name__ == "__main__":
  allocator.use_tcmalloc()  # re-executes this command under tcmalloc, before JAX is imported

from absl import flags
from absl import logging
import jax

from inpformer_jax import cli
from inpformer_jax import xla_flags
from inpformer_jax.reproduce import compare as compare_lib
from inpformer_jax.reproduce import plan as plan_lib
from inpformer_jax.reproduce import run as run_lib
from inpformer_jax.reproduce import tables as tables_lib

# The config files do `from configs import common`: the repository root must be importable
# (as for inpformer_jax.main).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("tables", None, "comma-separated table names (S1..S17) or 'all'",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "one folder for every run, the rates and the comparison",
                      flag_values=fv)
  flags.mark_flags_as_required(["tables", "workdir"], flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the plan and its time estimate; train nothing",
                    flag_values=fv)
  flags.DEFINE_string("paper", None, "another table file of the same layout (default: the "
                      "paper's, shipped in the package)", flag_values=fv)
  flags.DEFINE_float("tolerance", compare_lib.DEFAULT_TOLERANCE,
                     "flag |ours - paper| above this many points", flag_values=fv)
  flags.DEFINE_multi_string("config_overrides", [], "FIELD=VALUE for every run's config, e.g. "
                            "data.roots.mvtec=/data/mvtec_anomaly_detection", flag_values=fv)
  flags.DEFINE_list("only", None, "run only these run keys now (the rest is left for later)",
                    flag_values=fv)
  flags.DEFINE_bool("runlocal", False, "every run with the config files' tiny runlocal model "
                    "(a CPU rehearsal; the tables' encoder and image size are not applied)",
                    flag_values=fv)
  flags.DEFINE_string("rates", None, "step rates from this file (the layout of "
                      f"W/{plan_lib.RATES_FILE}) instead of measuring", flag_values=fv)
  flags.DEFINE_integer("measure_steps", plan_lib.MEASURED_STEPS,
                       "timed train steps per measured rate (0: measure none, estimate from "
                       "the cached or --rates rates and the authors' GPU figure)",
                       flag_values=fv)


def _main(fv: flags.FlagValues) -> int:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  xla_flags.configure_cpu_flags()  # before JAX creates its CPU backend
  paper = tables_lib.load_paper(fv.paper)
  names = tables_lib.select(paper, fv.tables)
  maps = tables_lib.map_tables(paper, names)
  for m in maps:
    runs = sorted({s.run.key for s in m.sections})
    print(f"{m.name}: {', '.join(runs) if runs else 'no run'}", flush=True)
    for note in m.not_ours:
      print(f"  not reproduced: {note}")
  planned = plan_lib.plan(tables_lib.runs_of(maps), fv.config_overrides, runlocal=fv.runlocal)
  if fv.dry_run:
    # The plan at once (cached rates only), then again once the missing rates are measured:
    # measuring big models on a CPU takes minutes each.
    rates = plan_lib.estimate(planned, fv.workdir, rates_file=fv.rates, measure_steps=0)
    print(plan_lib.describe(planned, rates, names), flush=True)
    missing = {p.rate_key for p in planned if p.seconds is None}
    if missing and not fv.rates and fv.measure_steps > 0:
      print(f"\nmeasuring {len(missing)} step rate(s) on {jax.devices()[0].device_kind}, cheapest "
            f"first (each is kept in {fv.workdir}/{plan_lib.RATES_FILE} as it is measured; "
            "--measure_steps=0: none)", flush=True)
      rates = plan_lib.estimate(planned, fv.workdir, measure_steps=fv.measure_steps)
      print(plan_lib.describe(planned, rates, names), flush=True)
    return 0
  run_lib.execute(planned, fv.workdir, only=fv.only)
  cmp = compare_lib.compare(maps, fv.workdir, fv.tolerance)
  paths = compare_lib.write(cmp, fv.workdir)
  print(compare_lib.to_markdown(cmp), flush=True)
  print(f"comparison: {', '.join(map(str, paths))}", flush=True)
  return 0


def main(argv=None) -> int:
  return cli.run_flags(_main, define, argv, prog="python -m inpformer_jax.reproduce", doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
