#!/usr/bin/env bash
# The GPU benchmark suite (benchmarks/gpu_suite.py) as one prepared run of at most 8 minutes.
#
#   bash benchmarks/gpu_suite.sh --fetch_wheels  # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine (device tool:
#       run(command="bash benchmarks/gpu_suite.sh", carry=[".whl", "demo_data"], timeout_s=540))
#   bash benchmarks/gpu_suite.sh --dry_run       # here: the same rows, tiny model, CPU
#
# The GPU machine has no network; its python3 has jax (CUDA), flax, optax, orbax, torch (CUDA)
# and timm but not grain and ml_collections, nor grain's array-record and portpicker: those
# travel as wheels in .whl/ (ignored by .gitignore), at the versions of the project's venv.
# Results: ${OUT:-gpu_suite_out}/gpu_suite.{md,json} and the whole log in gpu_suite.log.
# Then, with demo_data carried (`make demo` writes it; the GPU machine has no scikit-image to
# write it), benchmarks/eval_loop.py: the evaluation command's images/s next to forward-only,
# ViT-S/14-reg with random weights at 224 px, batch 32, in the same log.
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version of each wheel the GPU machine lacks (grain's and ml_collections' requirements
# that are not already there; see /work/.library/device/KINDS.md for its packages).
WHEELS=(grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 portpicker==1.6.0)
# The whole script stays within 8 minutes: the suite's rows get SUITE_S, the hard stop is
# TIMEOUT_S (installing the wheels takes seconds).
SUITE_S=340
TIMEOUT_S=390
EVAL_LOOP_S=75
EVAL_LOOP=(benchmarks/eval_loop.py --data demo_data --config "configs/demo.py:encoder=random_dinov2"
           --config.eval.batch_size=32)

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
    if [ -d demo_data ]; then  # the eval-loop step's code path: a small random ViT, one round
      "$py" benchmarks/eval_loop.py --data demo_data --config configs/demo.py:encoder=random \
        --repeats 1 --forward_batches 2
    fi
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
      --out "$out" 2>&1 | tee -a "$out/gpu_suite.log" || true
    if [ -d demo_data ]; then
      timeout -k 5 "$EVAL_LOOP_S" python3 "${EVAL_LOOP[@]}" --repeats 3 2>&1 \
        | grep -v '^eval:' | tee -a "$out/gpu_suite.log" || true
    else
      echo "eval loop skipped: carry demo_data (make demo writes it)" | tee -a "$out/gpu_suite.log"
    fi
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh [--fetch_wheels | --dry_run [gpu_suite.py flags]]" >&2
    exit 2
    ;;
esac
