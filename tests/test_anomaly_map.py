"""Anomaly maps and image scores (inpformer_jax/anomaly_map.py) against the official code's
own outputs (the golden fixture): every map stage, the fused map, the scores, the zero-shot
map; `maps_and_scores` as the composition of the model and these; the mask resize."""

import jax.numpy as jnp
import numpy as np
import pytest

from inpformer_jax import anomaly_map as am
from tests.helpers import MAP_ATOL, close_abs


def test_map_stages_and_scores(golden, golden_forward):
  z, _ = golden
  x, out, _ = golden_forward
  s = x.shape[1]
  st = am.map_stages(out["en"], out["de"], s)
  for g in range(2):
    close_abs(st["group_full"][g], z[f"map/group{g}_full"][:, 0], MAP_ATOL, f"group{g}_full")
  close_abs(st["full"], z["map/full"][:, 0], MAP_ATOL, "map full")
  close_abs(st["resized"], z["map/resized256"][:, 0], MAP_ATOL, "resized256")
  close_abs(st["smoothed"], z["map/smoothed256"][:, 0], MAP_ATOL, "smoothed256 (staged)")
  close_abs(am.gaussian_kernel_2d(), z["map/gaussian_kernel"][0, 0], 1e-7, "gaussian kernel")
  amap = am.anomaly_map(out["en"], out["de"], s)
  close_abs(amap, z["map/smoothed256"][:, 0], MAP_ATOL, "smoothed256 (fused K)")
  close_abs(am.image_score(amap, 0.01), z["score/top1pct"], MAP_ATOL, "top1% score")
  close_abs(am.image_score(amap, 0.0), z["score/max"], MAP_ATOL, "max score")
  zs = am.zero_shot_map(out["distance"], s)
  close_abs(zs, z["zs/smoothed256"][:, 0], MAP_ATOL, "zero-shot map")
  close_abs(am.image_score(zs), z["zs/score_top1pct"], MAP_ATOL, "zero-shot score")


@pytest.mark.parametrize("map_kind,top_ratio,want_map,want_score", [
    ("reconstruction", 0.01, "map/smoothed256", "score/top1pct"),
    ("reconstruction", 0.0, "map/smoothed256", "score/max"),
    ("inp_distance", 0.01, "zs/smoothed256", "zs/score_top1pct"),
])
def test_maps_and_scores_is_the_composition(golden, golden_model, golden_forward, map_kind,
                                            top_ratio, want_map, want_score):
  """model.apply -> anomaly_map (zero_shot_map for 'inp_distance') -> image_score, exactly;
  and so the official maps and scores."""
  z, _ = golden
  model, params, _ = golden_model
  x, _, _ = golden_forward
  s = x.shape[1]
  got = am.maps_and_scores(model, params, x, image_size=s, map_kind=map_kind,
                           top_ratio=top_ratio)
  assert set(got) == {"anomaly_map", "score"}
  out = model.apply({"params": params}, x)
  amap = (am.zero_shot_map(out["distance"], s) if map_kind == "inp_distance"
          else am.anomaly_map(out["en"], out["de"], s))
  np.testing.assert_array_equal(np.asarray(got["anomaly_map"]), np.asarray(amap))
  np.testing.assert_array_equal(np.asarray(got["score"]),
                                np.asarray(am.image_score(amap, top_ratio)))
  assert got["anomaly_map"].shape == (x.shape[0], am.MAP_SIZE, am.MAP_SIZE)
  close_abs(got["anomaly_map"], z[want_map][:, 0], MAP_ATOL, f"{map_kind} map")
  close_abs(got["score"], z[want_score], MAP_ATOL, f"{map_kind} score (top {top_ratio})")


def test_maps_and_scores_rejects_unknown_map_kind(golden_model):
  model, params, _ = golden_model
  with pytest.raises(ValueError, match="map_kind='distance'"):
    am.maps_and_scores(model, params, jnp.zeros((1, 112, 112, 3)), image_size=112,
                       map_kind="distance")


@pytest.mark.parametrize("side", [112, 392, 300, 256, 100])
def test_resize_masks_to_map_matches_torch_nearest(side):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(side)
  masks = (rng.random((3, side, side)) > 0.5).astype(np.float32)
  masks[1] = np.arange(side)[:, None] * side + np.arange(side)[None]  # every pixel distinct
  got = am.resize_masks_to_map(masks)
  want = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None], size=am.MAP_SIZE,
                                         mode="nearest")[:, 0].numpy()
  assert got.shape == (3, am.MAP_SIZE, am.MAP_SIZE)
  np.testing.assert_array_equal(got, want)
