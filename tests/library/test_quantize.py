"""Frozen weights in 8 and 4 bits (`hyperlora_jax.quantize`): codes and scales against
independent formulas, the bytes held, layers computing on the dequantized weights (square and
non-square, Dense, DenseGeneral, Conv), LoRA and its gradients on a quantized backbone, the
backward keeping no float copy of a weight, and the error against the float model."""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import lora, peft, quantize
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import DecoderLM
from hyperlora_jax.tasks.common import frozen_tree
from tests.fixtures import quantized_references
from tests.repo_paths import FIXTURES


def _gaussian(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_int8_codes_are_the_rounded_ratio_to_each_output_channels_absmax_over_127():
  w = _gaussian((48, 20))  # Non-square: a transposed scale would have the wrong shape or values.
  q = quantize.quantize(w, "int8")
  absmax = np.abs(np.asarray(w)).max(axis=0)  # One scale per output channel (column).
  np.testing.assert_allclose(np.asarray(q.scales), (absmax / 127)[None], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.codes), np.round(np.asarray(w) / (absmax / 127)).astype(np.int8))
  error = np.abs(np.asarray(quantize.dequantize(q)) - np.asarray(w))
  assert np.all(error <= absmax / 127 / 2 + 1e-6)  # Round to nearest: half a step at most.


def test_nf4_picks_the_nearest_level_of_each_block_and_packs_two_per_byte():
  w = _gaussian((130, 7))  # 130 rows: blocks of 64, 64 and a short one of 2; an odd pair count.
  q = quantize.quantize(w, "nf4")
  assert q.codes.shape == (65, 7) and q.codes.dtype == jnp.uint8 and q.scales.shape == (3, 7)
  weights = np.asarray(w)
  absmax = np.stack([np.abs(weights[i : i + 64]).max(axis=0) for i in (0, 64, 128)])
  np.testing.assert_allclose(np.asarray(q.scales), absmax, rtol=1e-6)
  levels = np.asarray(quantize.NF4_LEVELS)
  scale = np.repeat(absmax, 64, axis=0)[:130]
  nearest = levels[np.abs(weights[..., None] / scale[..., None] - levels).argmin(-1)] * scale  # Brute force.
  np.testing.assert_allclose(np.asarray(quantize.dequantize(q)), nearest, rtol=1e-6, atol=1e-7)
  low, high = np.asarray(q.codes[1]) & 0xF, np.asarray(q.codes[1]) >> 4  # Rows 1 and 1 + 65.
  np.testing.assert_allclose(levels[low] * absmax[0], nearest[1], rtol=1e-6)
  np.testing.assert_allclose(levels[high] * absmax[1], nearest[66], rtol=1e-6)


def test_a_zero_block_stays_zero_and_the_dtype_is_the_weights():
  w = jnp.zeros((8, 3), jnp.bfloat16).at[:, 1].set(2.0)
  for kind in quantize.KINDS:
    back = quantize.dequantize(quantize.quantize(w, kind))
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(w, np.float32))


def test_bytes_held_are_one_byte_or_half_a_byte_per_weight_plus_the_scales():
  variables = {"params": {"dense": {"kernel": _gaussian((256, 96)), "bias": jnp.zeros(96)}}}
  full = quantize.tree_bytes(variables)
  assert full == (256 * 96 + 96) * 4
  int8 = quantize.quantize_tree(variables, "int8")
  nf4 = quantize.quantize_tree(variables, "nf4")
  assert quantize.tree_bytes(int8) == 256 * 96 + 96 * 4 + 96 * 4  # Codes, one scale per column, bias.
  assert quantize.tree_bytes(nf4) == 128 * 96 + 4 * 96 * 4 + 96 * 4  # Half a byte each, 4 blocks of 64.
  leaves = jax.tree.leaves(nf4)  # What a device would hold: the codes are uint8, not float.
  assert sorted(str(x.dtype) for x in leaves) == ["float32", "float32", "uint8"]


def test_quantize_tree_skips_the_head_embeddings_norms_and_biases():
  model = DecoderLM(vocab_size=64, width=32, depth=1, num_heads=2, mlp_dim=48)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  quantized = quantize.quantize_tree(variables, "nf4")
  names = set(quantize.quantized_layers(quantized))
  expected = {f"params/block_0/{m}/kernel" for m in ("attn/query", "attn/key", "attn/value", "attn/out")}
  expected |= {f"params/block_0/mlp/{m}/kernel" for m in ("gate", "up", "down")}
  assert names == expected  # Not lm_head, embed or the norms.


def test_an_unknown_kind_or_block_is_refused():
  with pytest.raises(ValueError, match="quantization kind must be one of"):
    quantize.quantize(jnp.ones((4, 4)), "int4")
  with pytest.raises(ValueError, match="block_size"):
    quantize.quantize_tree({"kernel": jnp.ones((4, 4))}, "int8", block_size=-1)


class _Layers(nn.Module):
  """Dense (square and not), DenseGeneral (an attention projection) and Conv."""

  @nn.compact
  def __call__(self, x):  # x [B, 6, 6, 8]
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.Dense(8, name="square")(x)
    x = nn.DenseGeneral((2, 5), name="heads")(x)  # [B, 6, 6, 2, 5]
    x = nn.DenseGeneral(12, axis=(-2, -1), name="merge")(x)
    return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_each_layer_computes_on_its_own_dequantized_weight(kind):
  model = _Layers()
  x = _gaussian((2, 6, 6, 8), seed=1)
  variables = model.init(jax.random.key(0), x)
  quantized = quantize.quantize_tree(variables, kind, skip_regex="$^")  # Every kernel, the head too.
  assert len(quantize.quantized_layers(quantized)) == 5
  dequantized = quantize.dequantize_tree(quantized)
  expected = model.apply(dequantized, x)  # The float model on the dequantized weights.
  np.testing.assert_allclose(
    np.asarray(quantize.apply(model, quantized, x)), np.asarray(expected), rtol=1e-5, atol=1e-5
  )
  assert not np.allclose(np.asarray(expected), np.asarray(model.apply(variables, x)), rtol=1e-3)  # It did quantize.


def _decoder():
  model = DecoderLM(vocab_size=96, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=160)
  ids = jax.random.randint(jax.random.key(3), (2, 12), 0, 96)
  return model, model.init(jax.random.key(0), ids), ids


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_lora_and_its_gradient_on_a_quantized_decoder_are_those_on_the_dequantized_one(kind):
  model, variables, ids = _decoder()
  quantized = quantize.quantize_tree(variables, kind)
  targets = lora.find_targets(model, quantized, ids, target_regex=r".*attn/(query|value)")
  adapter = jax.tree.map(lambda a: a + 0.03, lora.init_lora(jax.random.key(1), targets, 4))

  def loss(adapter, frozen):
    return jnp.mean(jax.nn.log_softmax(lora.apply(model, frozen, adapter, ids, scale=2.0))[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(adapter, quantized)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(adapter, quantize.dequantize_tree(quantized))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_the_backward_pass_keeps_the_codes_not_a_float_copy_of_the_weights(capsys):
  model, variables, ids = _decoder()
  quantized = quantize.quantize_tree(variables, "int8")
  targets = lora.find_targets(model, quantized, ids, target_regex=r".*attn/(query|value)")
  adapter = lora.init_lora(jax.random.key(1), targets, 4)
  kernel_shapes = {leaf.shape for leaf in quantize.quantized_layers(quantized).values()}

  def loss(adapter):
    return jnp.sum(lora.apply(model, quantized, adapter, ids, scale=2.0))

  jax.ad_checkpoint.print_saved_residuals(loss, adapter)  # Lines such as "i8[64,64] from a constant".
  saved = [re.match(r"(\w+)\[([\d,]*)\]", line).groups() for line in capsys.readouterr().out.splitlines()]
  shaped = [(kind, tuple(int(d) for d in dims.split(",") if d)) for kind, dims in saved]
  float_kernels = [s for s in shaped if s[1] in kernel_shapes and s[0] in ("f32", "bf16")]
  assert float_kernels == []  # Without `jax.checkpoint` every dequantized kernel is one.
  assert ("i8", (64, 64)) in shaped  # The codes are what is kept (of the layers the backward needs).


def test_the_quantized_decoders_error_against_the_float_one():
  """Stated in the module docstring: on Gaussian weights int8 (per channel) keeps about 0.7%
  relative error, nf4 (blocks of 64) about 9%; through a 2-block random decoder the logits move
  by about 2% and 25-30%."""
  w = _gaussian((512, 384))
  relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert relative(quantize.dequantize(quantize.quantize(w, "int8")), w) < 0.009
  assert 0.07 < relative(quantize.dequantize(quantize.quantize(w, "nf4")), w) < 0.11
  model, variables, ids = _decoder()
  logits = model.apply(variables, ids)
  errors = {
    kind: relative(quantize.apply(model, quantize.quantize_tree(variables, kind), ids), logits)
    for kind in quantize.KINDS
  }
  assert errors["int8"] < 0.05 and errors["int8"] * 4 < errors["nf4"] < 0.5


def test_frozen_tree_quantizes_after_the_cast_and_plans_abstractly():
  model, variables, ids = _decoder()
  frozen = frozen_tree(variables, dtype=jnp.bfloat16, quantization="nf4")
  weight = quantize.quantized_layers(frozen)["variables/params/block_0/mlp/up/kernel"]
  assert weight.dtype == "bfloat16" and weight.scales.dtype == jnp.float32
  abstract = jax.eval_shape(lambda v: frozen_tree(v, dtype=jnp.bfloat16, quantization="int8"), variables)
  again = frozen_tree(frozen["variables"], dtype=jnp.float32)  # A tree quantized already is left so.
  assert quantize.quantized_layers(again)["variables/params/block_0/mlp/up/kernel"] is weight
  assert quantize.tree_bytes(abstract) < quantize.tree_bytes(
    jax.eval_shape(lambda v: frozen_tree(v, dtype=jnp.bfloat16), variables)
  )


def test_merge_dequantizes_a_quantized_kernel():
  model, variables, ids = _decoder()
  quantized = quantize.quantize_tree(variables, "int8")
  targets = lora.find_targets(model, quantized, ids, target_regex=r".*attn/query")
  adapter = jax.tree.map(lambda a: a + 0.1, lora.init_lora(jax.random.key(1), targets, 2))
  merged = lora.merge(quantized, adapter, 0.5)
  np.testing.assert_allclose(
    np.asarray(quantize.apply(model, merged, ids)), np.asarray(lora.apply(model, quantized, adapter, ids, scale=0.5)),
    rtol=1e-4, atol=1e-4,
  )  # fmt: skip


def test_an_adapter_trained_on_the_4_bit_fixture_llama_is_an_adapter_of_the_float_reference():
  """Golden fixture (`make_reference_fixtures.py --parts quantized`): an adapter trained by the
  project on hf_llama held in nf4, exported with `peft.save_peft`, was attached by
  `peft.PeftModel.from_pretrained` to the float transformers model. Loaded back onto the float
  checkpoint here, it gives the reference's logits; the reference's next-token loss with it is
  lower (it learned the batch); training it again here gives the same adapter."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama"))
  outputs = np.load(os.path.join(FIXTURES, "hf_llama_nf4_outputs.npz"))
  ids = jnp.asarray(outputs["input_ids"])
  targets = lora.find_targets(model, variables, ids, target_regex=quantized_references.TARGETS)
  adapter, config = peft.load_peft(
    os.path.join(FIXTURES, "hf_llama_nf4_adapter"), paths=targets, module_name=hf.module_namer("llama")
  )
  adapted = lora.apply(model, variables, adapter, ids, jnp.ones_like(ids), scale=peft.scale_from_config(config))
  want = outputs["reference_adapted"]
  assert np.max(np.abs(np.asarray(adapted) - want)) <= 1e-5 * np.max(np.abs(want))

  def nll(logits):
    return -np.mean(
      np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, :-1])), outputs["input_ids"][:, 1:, None], -1)
    )

  assert nll(want) < nll(outputs["reference_plain"]) - 0.5
  again, _ = quantized_references.train_on_nf4(model, variables, ids)
  for path in adapter:
    for factor in ("a", "b"):
      np.testing.assert_allclose(np.asarray(again[path][factor]), adapter[path][factor], rtol=1e-3, atol=1e-4)
