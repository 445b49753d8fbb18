#!/usr/bin/env bash
# The GPU benchmark suite (benchmarks/gpu_suite.py) as one prepared run of at most 8 minutes.
#
#   bash benchmarks/gpu_suite.sh --fetch_wheels  # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine (device tool:
#       run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540))
#   bash benchmarks/gpu_suite.sh --dry_run       # here: the same rows, tiny model, CPU
#
# The GPU machine has no network; its python3 has jax (CUDA), flax, optax, orbax, torch (CUDA)
# and timm but not grain and ml_collections, nor grain's array-record and portpicker: those
# travel as wheels in .whl/ (ignored by .gitignore), at the versions of the project's venv.
# Results: ${OUT:-gpu_suite_out}/gpu_suite.{md,json} and the whole log in gpu_suite.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version of each wheel the GPU machine lacks (grain's and ml_collections' requirements
# that are not already there; see /work/.library/device/KINDS.md for its packages).
WHEELS=(grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 portpicker==1.6.0)
# The whole script stays within 8 minutes: the suite's rows get SUITE_S, the hard stop is
# TIMEOUT_S (installing the wheels takes seconds).
SUITE_S=400
TIMEOUT_S=450

case "${1:-}" in
  --fetch_wheels)
    rm -rf .whl && mkdir -p .whl
    for w in "${WHEELS[@]}"; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$w"
    done
    ls -l .whl && du -sh .whl
    ;;
  --dry_run)
    py=.venv/bin/python
    [ -x "$py" ] || py=python3
    "$py" benchmarks/gpu_suite.py --dry_run --out "${OUT:-gpu_suite_out}" "${@:2}"
    ;;
  "")
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu_suite.sh --fetch_wheels' first and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    out="${OUT:-gpu_suite_out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
      2>&1 | tee "$out/gpu_suite.log" || true
    timeout -k 10 "$TIMEOUT_S" python3 benchmarks/gpu_suite.py --budget_s "$SUITE_S" \
      --out "$out" 2>&1 | tee -a "$out/gpu_suite.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh [--fetch_wheels | --dry_run [gpu_suite.py flags]]" >&2
    exit 2
    ;;
esac
