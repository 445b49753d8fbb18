r"""The GPU benchmark suite: ViT-B/14-reg at 392 px, JAX in bfloat16 against the PyTorch reference.

  python benchmarks/gpu_suite.py --out DIR           # on a GPU (benchmarks/gpu_suite.sh runs it)
  python benchmarks/gpu_suite.py --dry_run --out DIR # the same code paths, tiny model, CPU

Rows (each in a fresh process: its own peak memory, and a crash or timeout loses only it):
  JAX train step, bfloat16, batch 16, with and without the feature cache: steps/s, minutes
    for the official recipe's 45,200 steps, MFU (the compiled step's FLOPs / step time /
    --peak_tflops), compile seconds (benchmarks/gpu_suite_rows.py).
  JAX inference, bfloat16, batch 64, cuDNN attention (--attention): images/s.
  JAX feature-cache build (feature_cache.build_feature_cache): images/s.
  PyTorch reference (tests/torch_reference, benchmarks/torch_reference/bench.py) on the same
    device: train step at batch 16 and inference at batch 64, float32 (TF32 off, PyTorch's
    default) and bfloat16 autocast; the JAX rows' ratios to them.
Peak memory: jax's peak_bytes_in_use of device 0, torch.cuda.max_memory_allocated; '-' on
the CPU. Results: a markdown table on stdout and in OUT/gpu_suite.md, all numbers in
OUT/gpu_suite.json, both rewritten after every row (a timeout keeps the rows done).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bfloat16 dense matmul TFLOP/s of one H200 as measured on this workplace's machines (an
# 8192^3 product through PyTorch: 769-798 on random data; /work/.library/device/KINDS.md).
H200_BF16_TFLOPS = 790.0
# No new row starts with less than this left of --budget_s (a ViT-B compile alone takes ~1 min).
MIN_ROW_S = 30.0
# A JAX row that fails with --attention (cuDNN refusing a shape, say) runs once more with this.
FALLBACK_ATTENTION = "auto"
ATTENTION_NAMES = {"auto": "XLA", "xla": "XLA", "cudnn": "cuDNN", "explicit": "explicit"}

# (key, label, kind, dtype label). kind: which measurement and which torch rows it is compared
# with: train rows with the torch train rows, inference with torch inference.
ROWS = (
    ("train", "JAX train step, no cache", "train", "bf16"),
    ("train_cached", "JAX train step, feature cache", "train", "bf16"),
    ("infer", "JAX inference", "infer", "bf16"),
    ("torch_train_fp32", "PyTorch train step", "torch_train", "fp32"),
    ("torch_train_bf16", "PyTorch train step", "torch_train", "bf16 autocast"),
    ("torch_infer_fp32", "PyTorch inference", "torch_infer", "fp32"),
    ("torch_infer_bf16", "PyTorch inference", "torch_infer", "bf16 autocast"),
    ("cache_build", "JAX feature-cache build", "cache", "bf16"),
)
COLUMNS = ("measurement", "dtype", "batch", "images/s", "steps/s", "ms/step", "recipe min",
           "MFU", "peak GiB", "compile s", "vs torch fp32", "vs torch bf16")


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="gpu_suite_out", help="folder for gpu_suite.json/.md")
  ap.add_argument("--dry_run", action="store_true",
                  help="CPU rehearsal: tiny ViT at 56 px, batch 2, 2 timed steps, explicit "
                       "attention, torch on the CPU (every row, none of the figures mean anything)")
  ap.add_argument("--variant", default="base", help="small | base | large (tiny: dry run)")
  ap.add_argument("--image_size", type=int, default=392)
  ap.add_argument("--batch", type=int, default=16, help="train and cache-build batch")
  ap.add_argument("--infer_batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=20, help="timed train steps (JAX and torch)")
  ap.add_argument("--infer_steps", type=int, default=10, help="timed inference batches")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--attention", default="cudnn", help="JAX encoder attention_impl "
                  "(cudnn | xla | explicit | auto), as gpu_suite_rows.py")
  ap.add_argument("--cache_images", type=int, default=512, help="images of the timed cache build")
  ap.add_argument("--torch_device", default="cuda", help="where the PyTorch reference runs")
  ap.add_argument("--peak_tflops", type=float, default=H200_BF16_TFLOPS,
                  help="the device's peak bf16 TFLOP/s for MFU (default: one H200's dense bf16 "
                       "matmul rate as measured with the device tool, see its KINDS.md)")
  ap.add_argument("--budget_s", type=float, default=400.0,
                  help="wall seconds for all rows; a row still running then is stopped")
  ap.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="rows to run, in order")
  return ap


def apply_dry_run(a) -> None:
  a.variant, a.image_size, a.batch, a.infer_batch = "tiny", 56, 2, 2
  a.steps, a.infer_steps, a.warmup, a.cache_images = 2, 2, 1, 256
  # 'explicit' (the CPU's fast attention) is not XLA's, so the train rows' FLOP count takes
  # the path that cuDNN attention takes on a GPU (gpu_suite_rows.train_row).
  a.attention, a.torch_device = "explicit", "cpu"


def commands(a, attention: str) -> dict[str, list[str]]:
  """Row key -> the command line of its process (JAX rows with this encoder attention)."""
  py = sys.executable
  jax_args = ["--variant", a.variant, "--image_size", str(a.image_size), "--batch", str(a.batch),
              "--infer_batch", str(a.infer_batch), "--steps", str(a.steps), "--infer_steps",
              str(a.infer_steps), "--warmup", str(a.warmup), "--attention", attention,
              "--cache_images", str(a.cache_images)]
  rows = py, str(ROOT / "benchmarks" / "gpu_suite_rows.py")
  out = {k: [*rows, k, *jax_args] for k in ("train", "train_cached", "infer", "cache_build")}
  for mode, batch, steps in (("train", a.batch, a.steps), ("infer", a.infer_batch,
                                                           a.infer_steps)):
    torch = [py, "-m", "benchmarks.torch_reference.bench", "--device", a.torch_device,
             "--variant", a.variant, "--image-size", str(a.image_size), "--mode", mode,
             "--batch", str(batch), "--steps", str(steps), "--warmup", str(a.warmup)]
    out[f"torch_{mode}_fp32"] = torch
    out[f"torch_{mode}_bf16"] = [*torch, "--amp"]
  return out


def row_env(a, cache_dir: str) -> dict[str, str]:
  """The rows' environment: one persistent compilation cache for all of them (the programs
  they share, the recipe's init, compile once; cache_build relies on it), and in a dry run
  XLA without most optimisations (the CPU compiles dominate it; no figure there counts)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if a.dry_run:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return env


def run_row(cmd: list[str], timeout: float, env: dict[str, str]) -> dict:
  """The last JSON line the row's process prints, or {"error": ...}."""
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       check=False, env=env)
  except subprocess.TimeoutExpired as e:
    tail = (e.stderr or b"")[-2000:]
    sys.stderr.write(tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
    return {"error": f"timeout after {timeout:.0f} s"}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith("{"):
      out = json.loads(line)
      out["wall_s"] = time.perf_counter() - t0
      return out
  sys.stderr.write(p.stderr[-4000:])
  last = (p.stderr.strip().splitlines() or ["no output"])[-1]
  return {"error": f"exit {p.returncode}: {last[:300]}"}


def derive(results: dict, a) -> dict:
  """Row key -> {column: value}: the table's numbers from the rows' raw results."""
  torch_ips = {k: results.get(k, {}).get("images_per_sec") for k, *_ in ROWS
               if k.startswith("torch")}
  table = {}
  for key, label, kind, dtype in ROWS:
    r = results.get(key)
    if r is None:
      continue
    batch = a.infer_batch if kind in ("infer", "torch_infer") else a.batch
    if r.get("attention"):
      failed = f"; {a.attention} failed" if r.get("attention_error") else ""
      label = f"{label} ({ATTENTION_NAMES.get(r['attention'], r['attention'])} attention{failed})"
    cells = {"measurement": label, "dtype": dtype, "batch": batch}
    if "error" in r:
      cells["images/s"] = r["error"]
      table[key] = cells
      continue
    ips = r["images_per_sec"]
    cells["images/s"] = ips
    recipe = results_recipe_steps(results)
    if kind in ("train", "torch_train"):
      steps_per_s = ips / batch
      cells.update({"steps/s": steps_per_s, "ms/step": 1e3 / steps_per_s,
                    "recipe min": recipe / steps_per_s / 60 if recipe else None})
    if kind == "train" and r.get("flops_compiled"):
      hidden = max(0.0, (r.get("flops_lowered_xla_attention") or 0.0)
                   - (r.get("flops_lowered") or 0.0))
      cells["MFU"] = (r["flops_compiled"] + hidden) / r["step_s"] / (a.peak_tflops * 1e12)
    if r.get("peak_bytes") is not None:
      cells["peak GiB"] = r["peak_bytes"] / 2**30
    if r.get("compile_s") is not None:
      cells["compile s"] = r["compile_s"]
    ref = "torch_train" if kind in ("train", "torch_train") else "torch_infer"
    if kind in ("train", "infer") or dtype != "fp32" and kind.startswith("torch"):
      for col, tk in (("vs torch fp32", f"{ref}_fp32"), ("vs torch bf16", f"{ref}_bf16")):
        if torch_ips.get(tk) and tk != key:
          cells[col] = ips / torch_ips[tk]
    table[key] = cells
  return table


def results_recipe_steps(results: dict) -> int | None:
  """The recipe's step count, as the JAX train rows report it (None until one has run)."""
  for k in ("train", "train_cached"):
    if results.get(k, {}).get("recipe_steps"):
      return results[k]["recipe_steps"]
  return None


def fmt(value, col: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, str):
    return value
  if col == "MFU":
    return f"{100 * value:.1f}%" if value >= 1e-3 else f"{100 * value:.1g}%"
  if col.startswith("vs "):
    return f"{value:.2f}x"
  if col in ("batch",):
    return str(value)
  return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown(table: dict, header: str) -> str:
  lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if c in ("measurement", "dtype") else "---:" for c in COLUMNS)
           + "|"]
  for cells in table.values():
    lines.append("| " + " | ".join(fmt(cells.get(c), c) for c in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def header(a, results: dict) -> str:
  device = next((r["device"] for r in results.values() if r.get("device")), "?")
  gpu = next((r["gpu"] for r in results.values() if r.get("gpu")), None)
  steps = results_recipe_steps(results)
  what = "CPU dry run of a tiny model (the figures mean nothing)" if a.dry_run else "GPU suite"
  return (f"{what}: ViT-{a.variant} at {a.image_size} px, JAX on {device}, PyTorch on "
          f"{gpu or a.torch_device}; {a.steps} timed train steps, {a.infer_steps} inference "
          f"batches after {a.warmup} warm-up; MFU against {a.peak_tflops:g} TFLOP/s; recipe min "
          f"= {f'{steps:,}' if steps else '?'} steps / steps/s.")


def main(argv=None):
  a = parser().parse_args(argv)
  if a.dry_run:
    apply_dry_run(a)
  keys = [k for k in a.rows.split(",") if k]
  known = {k for k, *_ in ROWS}
  if not keys or not set(keys) <= known:
    raise SystemExit(f"--rows: unknown {sorted(set(keys) - known)}; choose from {sorted(known)}")
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  cmds, fallback, results = commands(a, a.attention), commands(a, FALLBACK_ATTENTION), {}
  deadline = time.monotonic() + a.budget_s
  print(f"gpu_suite: {len(keys)} rows, budget {a.budget_s:.0f} s", flush=True)
  with tempfile.TemporaryDirectory() as cache_dir:
    env = row_env(a, cache_dir)
    for key in keys:
      left = deadline - time.monotonic()
      if left < MIN_ROW_S:
        results[key] = {"error": "skipped: --budget_s spent"}
      else:
        print(f"--- {key}: {' '.join(cmds[key])}", flush=True)
        results[key] = run_row(cmds[key], left, env)
        left = deadline - time.monotonic()
        if ("error" in results[key] and fallback[key] != cmds[key] and left >= MIN_ROW_S
            and not results[key]["error"].startswith("timeout")):
          print(f"    {json.dumps(results[key])}\n    again with XLA attention", flush=True)
          failed = results[key]["error"]
          results[key] = run_row(fallback[key], left, env)
          results[key]["attention_error"] = f"{a.attention}: {failed}"
      print(f"    {json.dumps(results[key])}", flush=True)
      table = derive(results, a)
      md = markdown(table, header(a, results))
      (out / "gpu_suite.md").write_text(md)
      (out / "gpu_suite.json").write_text(json.dumps(
          {"args": vars(a), "rows": results, "table": table}, indent=2))
  print()
  print(md, end="")


if __name__ == "__main__":
  main()
