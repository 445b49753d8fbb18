"""Serving: one inferencer, and the command lines built on it.

  inferencer.py   load once (`loading.load`), then images -> maps, scores; files in batches
  predict.py      python -m inpformer_jax.deploy.predict: maps, overlays, decisions, tables
  calibrate.py    python -m inpformer_jax.deploy.calibrate: thresholds -> calibration.json
  calibration.py  the threshold definitions (FPR on normal images, F1-optimal)
  export.py       python -m inpformer_jax.deploy.export: jax.export of the same forward
  flags.py        the flags every one of these command lines shares
"""
