"""The official INP-Former `model.pth` -> our params: the conversion table, its strictness and
the command line (weights_conversion/convert_inpformer.py).

An official-format model.pth is written with torch from the golden fixture's `sd/*`; loaded
directly and through the CLI's params directory (`loading.load`), it must give the official
maps and scores of the fixture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inpformer_jax import anomaly_map as am
from inpformer_jax import checkpoint
from inpformer_jax import loading
from inpformer_jax.conversion import ConversionError
from inpformer_jax.conversion import inpformer as inpformer_conversion
from tests.helpers import MAP_ATOL, close_abs, nhwc
from weights_conversion import convert_inpformer


def _lines(msg: str, label: str) -> str:
  """The lines of a conversion error that list `label` ('missing keys', ...)."""
  return "\n".join(line for line in msg.splitlines() if line.strip().startswith(label))


def test_official_pth_roundtrip(golden, golden_state_dict, tmp_path):
  """An official-format model.pth written with torch -> loading.load and the conversion
  CLI -> the official maps and scores."""
  torch = pytest.importorskip("torch")
  z, _ = golden
  pth = tmp_path / "model.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in golden_state_dict.items()}, pth)
  x = jnp.asarray(nhwc(z["input/images"]))
  out_dir = tmp_path / "converted"
  assert convert_inpformer.main(["--input", str(pth), "--output", str(out_dir)]) == 0
  # refuses to overwrite
  assert convert_inpformer.main(["--input", str(pth), "--output", str(out_dir)]) == 2
  _, meta = checkpoint.load_params(out_dir)
  assert meta["kind"] == inpformer_conversion.META_KIND
  for source in (pth, out_dir):
    loaded = loading.load(source, image_size=x.shape[1])
    assert loaded.source["kind"] == ("torch_file" if source == pth else "params_dir")
    out = jax.jit(loaded.model.apply)({"params": loaded.params}, x)
    amap = am.anomaly_map(out["en"], out["de"], x.shape[1])
    close_abs(amap, z["map/smoothed256"][:, 0], MAP_ATOL, f"map via {source.name}")
    close_abs(am.image_score(amap), z["score/top1pct"], MAP_ATOL, f"score via {source.name}")


def test_strict_conversion_errors(golden_state_dict):
  sd = golden_state_dict
  bad = dict(sd)
  del bad["decoder.3.attn.kv.bias"]
  bad["decoder.9.extra.weight"] = np.zeros(3, np.float32)
  bad["bottleneck.0.fc1.weight"] = np.zeros((5, 5), np.float32)
  with pytest.raises(ConversionError) as e:
    inpformer_conversion.convert(bad)
  msg = str(e.value)
  assert "'decoder.3.attn.kv.bias'" in _lines(msg, "missing keys")
  assert "unexpected keys (1): ['decoder.9.extra.weight']" in msg
  assert ("wrong shape (1): ['bottleneck.0.fc1.weight (5, 5) -> bottleneck_0/fc1/kernel: "
          "(5, 5), expected (96, 384)']") in msg
  no_enc = {k: v for k, v in sd.items() if k != "encoder.blocks.5.ls1.gamma"}
  with pytest.raises(ConversionError,
                     match=r"missing keys \(1\): \['encoder.blocks.5.ls1.gamma'\]"):
    inpformer_conversion.convert(no_enc)


def test_cli_errors_are_one_message(golden_state_dict, tmp_path, capsys):
  """Exit status 2 and an 'error: ...' message naming the problem, no traceback: a state
  dict that does not convert, a missing input."""
  torch = pytest.importorskip("torch")
  bad = tmp_path / "bad.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in golden_state_dict.items()
              if k != "decoder.0.norm1.weight"}, bad)
  for src, named in ((bad, "missing keys (1): ['decoder.0.norm1.weight']"),
                     (tmp_path / "nope.pth", f"{tmp_path / 'nope.pth'} does not exist")):
    capsys.readouterr()
    assert convert_inpformer.main(["--input", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert named in err, err
  assert not (tmp_path / "out").exists()
