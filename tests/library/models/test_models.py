"""The MLP-Mixer and CLIP backbones, LoRA on them, and the `.npz` checkpoint loader."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import benchmarks
from hyperlora_jax import lora, models
from experiments.runner import backbone as backbone_lib, pretrain
from experiments.runner.settings import backbone_settings
from hyperlora_jax.models import CLIP, Mixer, ViT, clip as clip_lib, npz


def _images(n=3, size=8, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _perturbed(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ---------------------------------------------------------------- MLP-Mixer


def test_mixer_shapes_and_lora_targets_on_its_mlps():
  model = Mixer(num_classes=5, patch_size=4, width=16, depth=2, tokens_mlp_dim=6, channels_mlp_dim=24)
  x = _images()
  params = model.init(jax.random.key(1), x)
  chex.assert_shape(model.apply(params, x), (3, 5))
  chex.assert_shape(model.apply(params, x, return_features=True), (3, 16))
  targets = lora.find_targets(model, params, x, target_regex=benchmarks.LORA_TARGETS["mixer"])
  # Token mixing acts on [B, C, T] (T = 4 patches), channel mixing on [B, T, C].
  assert targets == {
    "MixerBlock_0/token_mixing/Dense_0": (4, 6),
    "MixerBlock_0/channel_mixing/Dense_0": (16, 24),
    "MixerBlock_1/token_mixing/Dense_0": (4, 6),
    "MixerBlock_1/channel_mixing/Dense_0": (16, 24),
  }
  factors = _perturbed(lora.init_lora(jax.random.key(2), targets, 2), 3)
  factored = lora.apply(model, params, factors, x, scale=2.0)
  merged = model.apply(lora.merge(params, factors, 2.0), x)
  np.testing.assert_allclose(factored, merged, atol=1e-5)


# ---------------------------------------------------------------- CLIP


def _clip():
  return CLIP(
    num_classes=3,
    class_names=("zero", "one", "two"),
    prompt_template="a photo of the digit {}",
    patch_size=4,
    width=16,
    depth=1,
    num_heads=2,
    text_width=16,
    text_depth=1,
    text_heads=2,
    vocab_size=64,
    max_len=8,
    embed_dim=8,
  )


def test_tokenize_is_deterministic_padded_and_truncated():
  tokens = clip_lib.tokenize(["A photo of the digit ONE", "one", "a b c d e f g h i j"], 50, 7)
  chex.assert_shape(tokens, (3, 7))
  assert (tokens[:, 0] == clip_lib.START_ID).all()
  assert tokens[1, 1] == tokens[0, 6] and (tokens[1, 2:] == clip_lib.PAD_ID).all()  # Case-insensitive.
  assert (tokens[2] != clip_lib.PAD_ID).all() and tokens.max() < 50  # Truncated to 7.
  np.testing.assert_array_equal(
    tokens, clip_lib.tokenize(["a photo of the digit one", "one", "a b c d e f g h i j"], 50, 7)
  )


def test_clip_zero_shot_logits_are_scaled_cosines_with_the_class_prompts():
  model, x = _clip(), _images()
  params = model.init(jax.random.key(1), x)
  logits = model.apply(params, x)
  chex.assert_shape(logits, (3, 3))
  prompts = clip_lib.tokenize(
    ["a photo of the digit zero", "a photo of the digit one", "a photo of the digit two"], 64, 8
  )
  image = model.apply(params, x, method=CLIP.encode_image)
  text = model.apply(params, jnp.asarray(prompts), method=CLIP.encode_text)
  np.testing.assert_allclose(jnp.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(logits, np.exp(np.log(1 / 0.07)) * image @ text.T, rtol=1e-5, atol=1e-5)
  chex.assert_shape(model.apply(params, x, return_features=True), (3, 8))
  assert "head" not in params["params"] and not models.has_head("clip")


def test_lora_on_both_clip_towers_changes_the_zero_shot_logits():
  model, x = _clip(), _images()
  params = model.init(jax.random.key(1), x)
  targets = lora.find_targets(model, params, x, target_regex=benchmarks.LORA_TARGETS["clip"])
  assert sorted(targets) == [
    f"{t}_tower/encoder/block_0/attn/{p}" for t in ("image", "text") for p in ("query", "value")
  ]
  base = model.apply(params, x)
  factors = lora.init_lora(jax.random.key(2), targets, 2)
  np.testing.assert_allclose(lora.apply(model, params, factors, x, scale=1.0), base, atol=1e-6)
  for tower in ("image", "text"):  # Each tower's adapter alone moves the logits.
    moved = {p: (_perturbed(f, 5) if p.startswith(tower) else f) for p, f in factors.items()}
    assert float(jnp.abs(lora.apply(model, params, moved, x, scale=1.0) - base).max()) > 1e-3


def test_contrastive_loss_treats_same_class_captions_as_positives():
  model, x = _clip(), _images(4)
  params = model.init(jax.random.key(1), x)
  captions = jnp.asarray(clip_lib.tokenize(["zero", "one", "zero", "two"], 64, 8))
  loss = pretrain.contrastive_loss(model)
  labels_matching = jnp.array([0, 1, 0, 2])
  value = loss(params, (x + 1) * 127.5, labels_matching, captions)
  assert np.isfinite(float(value)) and float(value) > 0
  # With every example of one class, every caption is a positive: the loss is log(B) minus
  # the entropy-matched term, i.e. exactly 0 only if ... it equals CE to the uniform target.
  uniform = loss(params, (x + 1) * 127.5, jnp.zeros(4, jnp.int32), captions)
  logits = model.apply(params, x, captions)
  expected = 0.5 * (-jax.nn.log_softmax(logits, 1).mean(1).mean() - jax.nn.log_softmax(logits.T, 1).mean(1).mean())
  np.testing.assert_allclose(uniform, expected, rtol=1e-5)


# ---------------------------------------------------------------- .npz checkpoints


def _vit():
  return ViT(num_classes=5, patch_size=4, width=16, depth=2, num_heads=2, mlp_ratio=2.0)


def test_vit_npz_round_trip_gives_the_same_model(tmp_path):
  model, x = _vit(), _images()
  params = model.init(jax.random.key(1), x)["params"]
  path = str(tmp_path / "vit.npz")
  npz.save_npz(path, "vit", params, num_heads=2)
  flat = npz.read_npz(path)
  assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (16, 2, 8)
  assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (2, 8, 16)
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in flat
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  loaded = npz.from_npz("vit", flat, abstract)
  assert "head" not in loaded
  restored = {**loaded, "head": params["head"]}
  np.testing.assert_allclose(model.apply({"params": restored}, x), model.apply({"params": params}, x), atol=1e-6)


def test_big_vision_vit_layout_loads_with_a_patch_only_position_table():
  model, x = _vit(), _images()
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flat = _big_vision_arrays("tok")
  loaded = npz.from_npz("vit", flat, abstract)
  np.testing.assert_array_equal(loaded["pos_embedding"][0, 0], 0.0)  # The class token has no position.
  np.testing.assert_array_equal(loaded["pos_embedding"][:, 1:], flat["pos_embedding"])
  q = flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"]
  np.testing.assert_array_equal(loaded["encoder"]["block_1"]["attn"]["query"]["kernel"][:, 8:], q[:, 1, :])
  np.testing.assert_array_equal(
    loaded["encoder"]["block_0"]["norm2"]["scale"], flat["Transformer/encoderblock_0/LayerNorm_1/scale"]
  )
  np.testing.assert_array_equal(
    loaded["encoder"]["block_0"]["mlp"]["fc2"]["kernel"], flat["Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"]
  )


def test_mixer_npz_round_trip(tmp_path):
  model, x = Mixer(num_classes=5, width=16, depth=1, tokens_mlp_dim=6, channels_mlp_dim=24), _images()
  params = model.init(jax.random.key(1), x)["params"]
  path = str(tmp_path / "mixer.npz")
  npz.save_npz(path, "mixer", params)
  loaded = npz.from_npz("mixer", npz.read_npz(path), jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  chex.assert_trees_all_equal(loaded, {k: v for k, v in params.items() if k != "head"})


def test_npz_that_does_not_fit_is_reported_by_name(tmp_path):
  model, x = _vit(), _images()
  params = model.init(jax.random.key(1), x)["params"]
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flat = npz.to_npz_arrays("vit", params, num_heads=2)
  missing = {k: v for k, v in flat.items() if k != "Transformer/encoderblock_1/LayerNorm_2/scale"}
  with pytest.raises(npz.CheckpointError, match="missing encoder/block_1/norm2/scale"):
    npz.from_npz("vit", missing, abstract)
  wrong = {**flat, "embedding/kernel": np.zeros((16, 16, 3, 16), np.float32)}
  with pytest.raises(npz.CheckpointError, match=r"embedding/kernel: shape \(16, 16, 3, 16\)"):
    npz.from_npz("vit", wrong, abstract)
  extra = {**flat, "Transformer/encoderblock_2/LayerNorm_0/scale": np.zeros(16, np.float32)}
  with pytest.raises(npz.CheckpointError, match="unused arrays.*encoderblock_2"):
    npz.from_npz("vit", extra, abstract)
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(npz.CheckpointError, match="cannot read"):
    npz.read_npz(str(tmp_path / "bad.npz"))


def test_the_image_backbone_step_uses_the_npz_checkpoint(smoke_config, tmp_path):
  arch = {k: v for k, v in smoke_config.model.to_dict().items() if k != "name"}
  model = ViT(num_classes=3, **arch)
  params = model.init(jax.random.key(4), _images(1, 16))["params"]
  path = str(tmp_path / "ckpt.npz")
  npz.save_npz(path, "vit", params, num_heads=arch["num_heads"])
  smoke_config.pretrain.npz_path = path
  smoke_config.pretrain.cache_dir = str(tmp_path / "cache")
  backbone = backbone_lib.image_backbone(backbone_settings(smoke_config), log=lambda _: None)
  assert backbone.info == {"source": path} and not os.path.exists(tmp_path / "cache")  # Nothing pretrained.
  assert backbone.tokenizer is None and backbone.preprocess is models.preprocess_images
  chex.assert_trees_all_close(backbone.variables["params"], {k: v for k, v in params.items() if k != "head"})


def _big_vision_arrays(pool: str, seed: int = 0) -> dict:
  """A 2-block, 16-wide, 2-head ViT in big_vision's layout for `pool` ("tok": a class token
  without a position; "gap": no class token; "map": a MAPHead), with a pre-logits layer and a
  head (both not loaded)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.5 * rng.normal(size=s)).astype(np.float32)
  flat = {
    "embedding/kernel": r(4, 4, 3, 16),
    "embedding/bias": r(16),
    "pos_embedding": r(1, 4, 16),
    "Transformer/encoder_norm/scale": 1 + r(16),
    "Transformer/encoder_norm/bias": r(16),
    "pre_logits/kernel": r(16, 16),
    "pre_logits/bias": r(16),
    "head/kernel": r(16, 7),
    "head/bias": r(7),
  }
  blocks = [f"Transformer/encoderblock_{i}/" for i in range(2)]
  prefixes = blocks + (["MAPHead_0/"] if pool == "map" else [])
  for pre in prefixes:
    norms = ("LayerNorm_0",) if pre == "MAPHead_0/" else ("LayerNorm_0", "LayerNorm_1")
    for ln in norms:
      flat[pre + ln + "/scale"], flat[pre + ln + "/bias"] = 1 + r(16), r(16)
    for proj in ("query", "key", "value"):
      flat[pre + f"MultiHeadDotProductAttention_0/{proj}/kernel"] = r(16, 2, 8)
      flat[pre + f"MultiHeadDotProductAttention_0/{proj}/bias"] = r(2, 8)
    flat[pre + "MultiHeadDotProductAttention_0/out/kernel"] = r(2, 8, 16)
    flat[pre + "MultiHeadDotProductAttention_0/out/bias"] = r(16)
    flat[pre + "MlpBlock_0/Dense_0/kernel"], flat[pre + "MlpBlock_0/Dense_0/bias"] = r(16, 32), r(32)
    flat[pre + "MlpBlock_0/Dense_1/kernel"], flat[pre + "MlpBlock_0/Dense_1/bias"] = r(32, 16), r(16)
  if pool == "map":
    flat["MAPHead_0/probe"] = r(1, 1, 16)
  if pool == "tok":
    flat["cls"] = r(1, 1, 16)
  return flat


def _layer_norm(x, scale, bias, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _map_head_by_hand(flat: dict, tokens: np.ndarray) -> np.ndarray:
  """big_vision's MAPHead in NumPy on the per-head arrays as stored: [B, T, D] -> [B, D]."""
  a = "MAPHead_0/MultiHeadDotProductAttention_0/"
  probe = np.broadcast_to(flat["MAPHead_0/probe"], (tokens.shape[0], 1, 16))
  q = np.einsum("bqd,dhk->bqhk", probe, flat[a + "query/kernel"]) + flat[a + "query/bias"]
  k = np.einsum("btd,dhk->bthk", tokens, flat[a + "key/kernel"]) + flat[a + "key/bias"]
  v = np.einsum("btd,dhk->bthk", tokens, flat[a + "value/kernel"]) + flat[a + "value/bias"]
  logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum("bhqt,bthk->bqhk", weights, v)
  y = np.einsum("bqhk,hkd->bqd", attended, flat[a + "out/kernel"]) + flat[a + "out/bias"]
  m = "MAPHead_0/MlpBlock_0/"
  hidden = _gelu_tanh(
    _layer_norm(y, flat["MAPHead_0/LayerNorm_0/scale"], flat["MAPHead_0/LayerNorm_0/bias"]) @ flat[m + "Dense_0/kernel"]
    + flat[m + "Dense_0/bias"]
  )
  return (y + hidden @ flat[m + "Dense_1/kernel"] + flat[m + "Dense_1/bias"])[:, 0]


@pytest.mark.parametrize("pool", ["gap", "map"])
def test_big_vision_gap_and_map_checkpoints_pool_as_big_vision_does(pool):
  """No class token; the patch-only positions used as they are; the feature is the mean of the
  tokens' final states (gap) or a MAPHead computed by hand from the per-head arrays (map)."""
  flat = _big_vision_arrays(pool)
  assert npz.npz_pool(flat) == pool and npz.dropped_arrays(flat) == [
    "head/bias",
    "head/kernel",
    "pre_logits/bias",
    "pre_logits/kernel",
  ]
  model, x = ViT(num_classes=5, patch_size=4, width=16, depth=2, num_heads=2, mlp_ratio=2.0, pool=pool), _images()
  params = npz.from_npz("vit", flat, jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  assert "cls" not in params and params["pos_embedding"].shape == (1, 4, 16)
  variables = {"params": {**params, "head": {"kernel": np.zeros((16, 5), np.float32), "bias": np.zeros(5, np.float32)}}}
  hidden = np.asarray(model.apply(variables, x, return_hidden=True))
  features = np.asarray(model.apply(variables, x, return_features=True))
  expected = hidden.mean(axis=1) if pool == "gap" else _map_head_by_hand(flat, hidden)
  np.testing.assert_allclose(features, expected, rtol=2e-4, atol=2e-5)
  again = npz.from_npz(
    "vit", npz.to_npz_arrays("vit", params, num_heads=2), jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  )
  chex.assert_trees_all_close(again, params)  # The exporter writes big_vision's layout back.


def test_a_pooling_mismatch_names_the_checkpoints_pooling_and_the_runner_sets_it(smoke_config, tmp_path):
  flat = _big_vision_arrays("map")
  model, x = _vit(), _images()
  with pytest.raises(npz.CheckpointError, match=r"missing cls.*pooling is 'map'.*set model.pool='map'"):
    npz.from_npz("vit", flat, jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  path = str(tmp_path / "map.npz")
  np.savez(path, **flat)
  smoke_config.pretrain.npz_path = path
  logs = []
  config = backbone_lib.with_checkpoint_architecture(smoke_config, logs.append)
  assert config.model.pool == "map" and "model.pool='map'" in logs[0]
  assert "pool" not in smoke_config.model  # The caller's config is not changed.
