"""Runlocal runs for engine tests: tiny datasets in the real layouts, configs pointed at them,
and comparisons of two runs' metrics rows and parameters.

Images are 40 px: runlocal resizes to 32 and crops 28 (2 x 2 patches of the tiny ViT).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from inpformer_jax import loading
from tests.conftest import jax_options

CLASSES = ("bottle", "cable")
ROW_KEYS = ("loss", "reconstruction", "coherence", "grad_norm", "lr")
SIZE = 40


def _image(rng, base):
  return np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _defect(rng, base):
  x = _image(rng, base)
  m = np.zeros((SIZE, SIZE), np.uint8)
  r, c = rng.integers(4, SIZE - 16, 2)
  m[r:r + 12, c:c + 12] = 255
  x[m > 0] = 255 - x[m > 0]
  return x, m


def make_mvtec_like(root, *, defect="crack", mask_suffix="_mask", ext=".png", n_train=4,
                    seed=0, classes=CLASSES):
  """<root>/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>}."""
  rng = np.random.default_rng(seed)
  for c in classes:
    base = rng.integers(40, 215, 3)
    for sub, n in (("train/good", n_train), ("test/good", 2)):
      os.makedirs(f"{root}/{c}/{sub}", exist_ok=True)
      for i in range(n):
        Image.fromarray(_image(rng, base)).save(f"{root}/{c}/{sub}/{i:03d}{ext}")
    os.makedirs(f"{root}/{c}/test/{defect}", exist_ok=True)
    os.makedirs(f"{root}/{c}/ground_truth/{defect}", exist_ok=True)
    for i in range(2):
      x, m = _defect(rng, base)
      Image.fromarray(x).save(f"{root}/{c}/test/{defect}/{i:03d}{ext}")
      Image.fromarray(m).save(f"{root}/{c}/ground_truth/{defect}/{i:03d}{mask_suffix}.png")
  return str(root)


def make_realiad_like(root, seed=2, classes=CLASSES):
  """<root>/realiad_1024/<class>/{OK,NG}/... + realiad_jsons/realiad_jsons/<class>.json."""
  rng = np.random.default_rng(seed)
  os.makedirs(f"{root}/realiad_jsons/realiad_jsons", exist_ok=True)
  for c in classes:
    base = rng.integers(40, 215, 3)
    spec = {"train": [], "test": []}
    for split, n in (("train", 4), ("test", 2)):
      for i in range(n):
        rel = f"OK/S{split[:2]}{i:02d}/{c}_{i:04d}_OK_C1_0.jpg"
        os.makedirs(os.path.dirname(f"{root}/realiad_1024/{c}/{rel}"), exist_ok=True)
        Image.fromarray(_image(rng, base)).save(f"{root}/realiad_1024/{c}/{rel}")
        spec[split].append({"category": c, "anomaly_class": "OK", "image_path": rel,
                            "mask_path": None})
    for i in range(2):
      rel = f"NG/QS/S9{i:02d}/{c}_{i:04d}_NG_QS_C1_0"
      os.makedirs(os.path.dirname(f"{root}/realiad_1024/{c}/{rel}"), exist_ok=True)
      x, m = _defect(rng, base)
      Image.fromarray(x).save(f"{root}/realiad_1024/{c}/{rel}.jpg")
      Image.fromarray(m).save(f"{root}/realiad_1024/{c}/{rel}.png")
      spec["test"].append({"category": c, "anomaly_class": "QS", "image_path": rel + ".jpg",
                           "mask_path": rel + ".png"})
    with open(f"{root}/realiad_jsons/realiad_jsons/{c}.json", "w") as f:
      json.dump(spec, f)
  return str(root)


def make_all(base) -> dict[str, str]:
  """{"mvtec", "visa", "realiad"} roots under `base` (a pathlib.Path)."""
  return {"mvtec": make_mvtec_like(base / "mvtec"),
          "visa": make_mvtec_like(base / "visa", defect="bad", mask_suffix="", ext=".JPG",
                                  seed=1),
          "realiad": make_realiad_like(base / "realiad")}


def local_config(get_config, arg, data, **over):
  """A runlocal config pointed at the tiny datasets (only their classes); over: 'a.b' -> v."""
  c = get_config(",".join(filter(None, ["runlocal=True", arg])))
  for name, root in data.items():
    c.data.roots[name] = root
    c.data.categories[name] = ",".join(CLASSES)
  for key, value in over.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def cli_flags(config_file: str, data, **over) -> list[str]:
  """The same runlocal config as command-line flags of `python -m inpformer_jax.main`."""
  flags = ["--config", f"{config_file}:runlocal=True"]
  for name, root in data.items():
    flags += [f"--config.data.roots.{name}={root}",
              f"--config.data.categories.{name}={','.join(CLASSES)}"]
  return flags + [f"--config.{k}={v}" for k, v in over.items()]


def assert_same_rows(a, b, tol=1e-6, keys=ROW_KEYS):
  """Two runs' train_metrics.jsonl rows: same steps, values within tol (relative above 1)."""
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for k in keys:
      assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


def final_params(workdir):
  """The trainable params of a workdir's newest checkpoint (numpy)."""
  return jax.device_get(loading.trained_state(workdir)[0]["params"])


def update_vector(initial, final) -> np.ndarray:
  """final - initial of every leaf, as one vector."""
  return np.concatenate([np.ravel(np.asarray(b) - np.asarray(a))
                         for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(final))])


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module", autouse=True)
def fast_compile_module():
  """`conftest.fast_compile` for a whole module of runlocal runs (import it into the module):
  tiny models, so compiling is the cost."""
  with jax_options(jax_disable_most_optimizations=True):
    yield

