"""Reproduce the paper's tables with one command (`python -m inpformer_jax.reproduce`).

  tables.py   the table file (paper_tables.json, a copy of the supplementary S1-S17) -> runs
  plan.py     each run's config, steps, images read, time from a measured step rate
  run.py      the runs, in-process, each in WORKDIR/<run key>/, resumable, finished ones skipped
  compare.py  ours vs the paper per class and mean, differences, flags: md / csv / json
  __main__.py the command line (docs/reproduce.md)
"""
