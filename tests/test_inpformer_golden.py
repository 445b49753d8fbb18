"""INP-Former against the official code's own outputs (../shared/golden/inpformer_dev.npz).

Every array group of the fixture is checked: encoder, fusion, INPs, bottleneck, decoder
blocks and attention, en/de, distance, every map stage, scores, zero-shot, losses, mining
factors, gradients, two optimiser steps and the lr schedule. The weights go through the
same conversion table users run (weights_conversion/inpformer_mapping.py), and once through
an official-format model.pth written with torch.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from inpformer_jax import anomaly_map as am
from inpformer_jax import losses
from inpformer_jax import optim
from inpformer_jax.models import factory
from inpformer_jax.models.vit import DinoViT

GOLDEN = Path(os.environ.get("INPFORMER_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))
NPZ = GOLDEN / "inpformer_dev.npz"

pytestmark = pytest.mark.skipif(not NPZ.exists(), reason=f"golden fixture not found at {NPZ}")

FWD_RTOL = 1e-5   # forward activations: max|diff| / max|ref|
MAP_ATOL = 1e-5   # maps and scores
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30)


def _close_rel(a, ref, tol, what):
  assert np.shape(a) == np.shape(ref), (what, np.shape(a), np.shape(ref))
  r = _rel(a, ref)
  assert r <= tol, f"{what}: relative max diff {r:.3e} > {tol}"


def _close_abs(a, ref, tol, what):
  assert np.shape(a) == np.shape(ref), (what, np.shape(a), np.shape(ref))
  d = np.abs(np.asarray(a, np.float64) - np.asarray(ref, np.float64)).max()
  assert d <= tol, f"{what}: abs max diff {d:.3e} > {tol}"


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def golden():
  z = np.load(NPZ)
  meta = json.loads((GOLDEN / "inpformer_dev.json").read_text())
  return z, meta


@pytest.fixture(scope="module")
def converted(golden):
  from weights_conversion import inpformer_mapping
  z, meta = golden
  sd = {k: z[f"sd/{k}"] for k in meta["state_dict_keys"]}
  params, arch = inpformer_mapping.convert_inpformer_state_dict(sd)
  import ml_collections
  enc = arch["encoder"]
  cfg = ml_collections.ConfigDict(dict(
      encoder="custom", width=enc["width"], depth=enc["depth"], num_heads=enc["num_heads"],
      num_registers=enc["num_register_tokens"], num_inps=arch["num_inps"],
      num_decoder_blocks=arch["num_decoder_blocks"], decoder_heads=arch["num_heads"]))
  model = factory.build_model(cfg)
  return model, jax.tree.map(jnp.asarray, params), sd


@pytest.fixture(scope="module")
def forward(golden, converted):
  z, _ = golden
  model, params, _ = converted
  x = jnp.asarray(nhwc(z["input/images"]))
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  out, state = fn(params, x)
  return x, out, state["intermediates"]


def test_state_dict_key_count(golden):
  _, meta = golden
  assert len(meta["state_dict_keys"]) == 315


def test_encoder(golden, converted, forward):
  z, _ = golden
  model, params, _ = converted
  x, _, _ = forward
  enc = model.encoder
  v = {"params": params["encoder"]}
  pe = enc.apply(v, x.shape[1] // 14, method=DinoViT.interpolated_pos_embed)
  _close_rel(pe, z["enc/pos_embed_interp"], FWD_RTOL, "pos_embed_interp")
  t0 = enc.apply(v, x, method=DinoViT.prepare_tokens)
  _close_rel(t0, z["enc/tokens0"], FWD_RTOL, "tokens0")
  layers = enc.apply(v, x, layers=tuple(range(2, 10)))
  for i, out in zip(range(2, 10), layers):
    _close_rel(out, z[f"enc/layer{i:02d}"], FWD_RTOL, f"layer{i:02d}")


def test_inps_bottleneck_decoder(golden, forward):
  z, _ = golden
  _, out, inter = forward
  _close_rel(out["fused"], z["fused/encoder_mean"], FWD_RTOL, "fused")
  _close_rel(out["inps"], z["inp/tokens"], FWD_RTOL, "inps")
  _close_rel(inter["bottleneck"][0], z["bottleneck/out"], FWD_RTOL, "bottleneck")
  blocks = inter["decoder_blocks"][0]
  assert len(blocks) == 8
  for j, blk in enumerate(blocks):
    _close_rel(blk, z[f"dec/block{j}"], FWD_RTOL, f"decoder block {j}")
  _close_rel(inter["decoder_0"]["attn"]["attn"][0], z["dec/block0_attn"], FWD_RTOL, "attn0")
  # the extractor input is the INP parameter repeated over the batch
  q_in = np.broadcast_to(np.asarray(z["sd/prototype_token"]), z["inp/extractor_query_in"].shape)
  np.testing.assert_array_equal(q_in, z["inp/extractor_query_in"])


def test_outputs_distance(golden, forward):
  z, _ = golden
  _, out, _ = forward
  for g in range(2):
    _close_rel(out["en"][g], nhwc(z[f"out/en{g}"]), FWD_RTOL, f"en{g}")
    _close_rel(out["de"][g], nhwc(z[f"out/de{g}"]), FWD_RTOL, f"de{g}")
  _close_abs(out["distance"], z["out/distance"], MAP_ATOL, "distance")
  np.testing.assert_array_equal(np.asarray(out["cluster_index"]), z["out/cluster_index"])
  _close_abs(out["coherence_loss"], z["out/gather_loss"], LOSS_ATOL, "gather loss")


def test_map_stages_and_scores(golden, forward):
  z, _ = golden
  x, out, _ = forward
  s = x.shape[1]
  st = am.map_stages(out["en"], out["de"], s)
  for g in range(2):
    _close_abs(st["group_full"][g], z[f"map/group{g}_full"][:, 0], MAP_ATOL, f"group{g}_full")
  _close_abs(st["full"], z["map/full"][:, 0], MAP_ATOL, "map full")
  _close_abs(st["resized"], z["map/resized256"][:, 0], MAP_ATOL, "resized256")
  _close_abs(st["smoothed"], z["map/smoothed256"][:, 0], MAP_ATOL, "smoothed256 (staged)")
  _close_abs(am.gaussian_kernel_2d(), z["map/gaussian_kernel"][0, 0], 1e-7, "gaussian kernel")
  amap = am.anomaly_map(out["en"], out["de"], s)
  _close_abs(amap, z["map/smoothed256"][:, 0], MAP_ATOL, "smoothed256 (fused K)")
  _close_abs(am.image_score(amap, 0.01), z["score/top1pct"], MAP_ATOL, "top1% score")
  _close_abs(am.image_score(amap, 0.0), z["score/max"], MAP_ATOL, "max score")
  zs = am.zero_shot_map(out["distance"], s)
  _close_abs(zs, z["zs/smoothed256"][:, 0], MAP_ATOL, "zero-shot map")
  _close_abs(am.image_score(zs), z["zs/score_top1pct"], MAP_ATOL, "zero-shot score")


def test_losses_and_factors(golden, forward):
  z, _ = golden
  _, out, _ = forward
  total, parts = losses.inpformer_loss(out)
  _close_abs(total, z["train/loss_total"], LOSS_ATOL, "loss total")
  _close_abs(parts["reconstruction"], z["train/loss_rec"], LOSS_ATOL, "loss rec")
  _close_abs(parts["coherence"], z["train/loss_gather"], LOSS_ATOL, "loss gather")
  for g in range(2):
    f = losses.soft_mining_factor(out["en"][g], out["de"][g], 3.0)
    _close_rel(f, nhwc(z[f"train/hm_factor{g}"]), FWD_RTOL, f"hm factor {g}")


def _flax_grad(grads, torch_key):
  """Gradient of the official parameter `torch_key` from our trainable grads tree."""
  from weights_conversion import inpformer_mapping
  inverse = {tk: (path, kind) for path, (tk, kind) in inpformer_mapping.trainable_mapping().items()}
  path, kind = inverse[torch_key]
  node = grads
  for p in path.split("/"):
    node = node[p]
  node = np.asarray(node)
  return node.T if kind == "linear" else node


def _loss_fn(model, encoder_params, x, which="total"):
  def fn(trainable):
    out = model.apply({"params": factory.merge_params(encoder_params, trainable)}, x)
    total, parts = losses.inpformer_loss(out)
    return total if which == "total" else parts["coherence"]
  return fn


def test_gradients(golden, converted, forward):
  z, _ = golden
  model, params, _ = converted
  x, _, _ = forward
  enc, trainable = factory.split_params(params)
  grads = jax.jit(jax.grad(_loss_fn(model, enc, x)))(trainable)
  names = [k[5:] for k in z.files if k.startswith("grad/") and k != "grad/global_norm"]
  assert len(names) >= 15
  for name in names:
    _close_rel(_flax_grad(grads, name), z[f"grad/{name}"], GRAD_RTOL, f"grad {name}")
  _close_rel(optax.global_norm(grads), z["grad/global_norm"], GRAD_RTOL, "grad global norm")
  # the encoder gets no gradient at all
  full = jax.grad(lambda p: losses.inpformer_loss(model.apply({"params": p}, x))[0])(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(full["encoder"]))


def test_coherence_only_gradients(golden, converted, forward):
  z, _ = golden
  model, params, _ = converted
  x, _, _ = forward
  enc, trainable = factory.split_params(params)
  grads = jax.jit(jax.grad(_loss_fn(model, enc, x, "coherence")))(trainable)
  names = [k[len("grad_gather_only/"):] for k in z.files if k.startswith("grad_gather_only/")]
  assert names
  for name in names:
    _close_rel(_flax_grad(grads, name), z[f"grad_gather_only/{name}"], GRAD_RTOL,
               f"coherence grad {name}")
  # the coherence loss reaches only the extractor and the INP parameter
  for key in ("bottleneck_0", "decoder_0"):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[key]))


def test_two_optimizer_steps(golden, converted, forward):
  """Two clip(0.1) + StableAdamW steps from sd/*, each with a fresh forward/backward.

  Adam's first steps are sign-like (m / sqrt(v) ~ sign(g)), so an element whose true gradient
  is zero up to float32 noise (below 1e-4 of the tensor's largest) (e.g. the key bias of a softmax attention, which is shift
  invariant, or directions removed by the decoder's q/k normalisation) moves by +-lr in
  either direction in both implementations. Those elements are compared against that
  bound; every element with a gradient above the noise floor must match to 1e-5.
  """
  z, meta = golden
  model, params, _ = converted
  x, _, _ = forward
  enc, trainable = factory.split_params(params)
  c = meta["constants"]["optimizer"]
  tx = optax.chain(
      optim.clip_by_global_norm_torch(meta["constants"]["clip_norm"]),
      optim.stable_adamw(c["lr"], c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"],
                         c["amsgrad"]))
  loss_grad = jax.jit(jax.value_and_grad(_loss_fn(model, enc, x)))
  state = tx.init(trainable)
  conditioned = {}
  for step in (1, 2):
    loss, grads = loss_grad(trainable)
    # Step 2 is evaluated at parameters whose noise-floor elements moved +-lr in an
    # implementation-dependent direction (see above); measured effect on the loss ~4e-6 and
    # on the gradient norm ~2e-4, hence the looser step-2 bounds.
    _close_abs(loss, z[f"opt/step{step}_loss"], LOSS_ATOL if step == 1 else 1e-5,
               f"step{step} loss")
    _close_rel(optax.global_norm(grads), z[f"opt/step{step}_preclip_norm"],
               GRAD_RTOL if step == 1 else 1e-3, f"step{step} pre-clip norm")
    updates, state = tx.update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    names = [k[len(f"opt/step{step}/"):] for k in z.files if k.startswith(f"opt/step{step}/")]
    assert len(names) >= 7
    for name in names:
      g = np.abs(_flax_grad(grads, name))
      ok = g > 1e-4 * g.max()
      conditioned[name] = conditioned.get(name, True) & ok
      mask = conditioned[name]
      assert mask.mean() >= 0.5, name
      ours, ref = _flax_grad(trainable, name), z[f"opt/step{step}/{name}"]
      # At step 2 m mixes two gradients that can nearly cancel, which amplifies their 1e-4
      # relative noise; so the bound is 1e-5 of max|param| or 1% of one step (lr), whichever
      # is larger.
      tol = max(FWD_RTOL * np.abs(ref).max(), 1e-2 * c["lr"])
      d = np.abs(ours - ref)[mask].max()
      assert d <= tol, f"step{step} param {name}: max diff {d:.3e} > {tol:.3e}"
      # noise-floor elements: bounded by the per-step learning rate
      assert np.abs(ours - ref)[~mask].max(initial=0.0) <= 2 * step * c["lr"] * 1.01


def test_lr_schedule(golden):
  z, _ = golden
  sched = optim.warm_cosine_schedule(1e-3, 1e-4, 250, 100)
  lrs = np.asarray(jax.vmap(sched)(jnp.arange(260)))
  _close_abs(lrs, z["sched/lr"], 1e-9, "lr schedule")
  assert lrs[0] == 0.0


def test_official_pth_roundtrip(golden, converted, tmp_path):
  """An official-format model.pth written with torch -> load_official_checkpoint and the
  conversion CLI -> the official maps and scores."""
  torch = pytest.importorskip("torch")
  import inpformer_jax
  from weights_conversion import convert_inpformer
  z, meta = golden
  sd = {k: torch.from_numpy(np.array(z[f"sd/{k}"])) for k in meta["state_dict_keys"]}
  pth = tmp_path / "model.pth"
  torch.save(sd, pth)
  x = jnp.asarray(nhwc(z["input/images"]))
  out_dir = tmp_path / "converted"
  assert convert_inpformer.main(["--input", str(pth), "--output", str(out_dir)]) == 0
  for source in (pth, out_dir):
    model, params = inpformer_jax.load_official_checkpoint(source, image_size=x.shape[1])
    out = jax.jit(model.apply)({"params": params}, x)
    amap = am.anomaly_map(out["en"], out["de"], x.shape[1])
    _close_abs(amap, z["map/smoothed256"][:, 0], MAP_ATOL, f"map via {source.name}")
    _close_abs(am.image_score(amap), z["score/top1pct"], MAP_ATOL, f"score via {source.name}")


def test_strict_conversion_errors(golden):
  from weights_conversion import inpformer_mapping
  from weights_conversion.dinov2_mapping import ConversionError
  z, meta = golden
  sd = {k: z[f"sd/{k}"] for k in meta["state_dict_keys"]}
  bad = dict(sd)
  del bad["decoder.3.attn.kv.bias"]
  bad["decoder.9.extra.weight"] = np.zeros(3, np.float32)
  bad["bottleneck.0.fc1.weight"] = np.zeros((5, 5), np.float32)
  with pytest.raises(ConversionError) as e:
    inpformer_mapping.convert_inpformer_state_dict(bad)
  msg = str(e.value)
  assert "decoder.3.attn.kv.bias" in msg and "bottleneck.0.fc1.weight" in msg
  no_enc = {k: v for k, v in sd.items() if k != "encoder.blocks.5.ls1.gamma"}
  with pytest.raises(ConversionError, match="blocks.5.ls1.gamma"):
    inpformer_mapping.convert_inpformer_state_dict(no_enc)
