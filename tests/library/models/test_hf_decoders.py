"""Llama-family decoders (Llama, Qwen2, Mistral) against transformers, through golden fixtures
(tests/fixtures/decoder_references.py wrote them with torch; versions in
tests/fixtures/versions.json under "decoders"). No PyTorch here."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hyperlora_jax import lora, peft
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import DecoderLM, generate, rope_frequencies
from hyperlora_jax.models import CheckpointError
from tests.fixtures.decoder_references import MAX_LEN, MESSAGES, TEXTS

from tests.repo_paths import FIXTURES

TOLERANCE = 1e-5  # Relative to the largest absolute value, as the issue asks.
DECODERS = ("hf_llama", "hf_llama_bare", "hf_qwen2", "hf_mistral")


@pytest.fixture(scope="module")
def outputs():
  with np.load(os.path.join(FIXTURES, "hf_decoder_outputs.npz")) as f:
    return dict(f)


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _forward(name, outputs, **overrides):
  """The fixture's output on the real (unpadded) tokens: logits, or the bare model's hidden
  states; `overrides` change the loaded architecture."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name), **overrides)
  got = model.apply(
    variables,
    jnp.asarray(outputs["input_ids"]),
    jnp.asarray(outputs["attention_mask"]),
    return_hidden=name == "hf_llama_bare",
  )
  real = outputs["attention_mask"].astype(bool)
  return np.asarray(got)[real], outputs[f"{name}_output"][real]


def test_the_architecture_comes_from_each_checkpoints_config():
  """GQA, head_dim, rotary scaling, tying and biases as each family's config.json states them."""
  archs = {name: hf.read_checkpoint(os.path.join(FIXTURES, name))[:2] for name in DECODERS}
  assert {name for name, _ in archs.values()} == {"llama"}
  common = {
    "vocab_size": 360,
    "width": 32,
    "depth": 2,
    "num_heads": 4,
    "head_dim": 8,
    "mlp_dim": 40,
    "rms_norm_eps": 1e-6,
    "mlp_bias": False,
    "out_bias": False,
    "sliding_window": None,
  }
  assert archs["hf_llama"][1] == {
    **common,
    "num_kv_heads": 2,
    "rope_theta": 500000.0,
    "tie_embeddings": False,
    "qkv_bias": False,
    "rope_scaling": (
      ("rope_type", "llama3"),
      ("factor", 8.0),
      ("high_freq_factor", 4.0),
      ("low_freq_factor", 1.0),
      ("original_max_position_embeddings", 16.0),
    ),
  }
  assert archs["hf_llama_bare"][1] == {
    **common,
    "num_kv_heads": 4,
    "rope_theta": 10000.0,
    "rope_scaling": (),
    "tie_embeddings": True,
    "qkv_bias": True,
    "out_bias": True,
    "mlp_bias": True,
  }
  assert archs["hf_qwen2"][1] == {
    **common,
    "num_kv_heads": 2,
    "rope_theta": 10000.0,
    "tie_embeddings": True,
    "qkv_bias": True,
    "rope_scaling": (("rope_type", "linear"), ("factor", 2.0)),
  }
  assert archs["hf_mistral"][1] == {
    **common,
    "num_kv_heads": 2,
    "rope_theta": 10000.0,
    "rope_scaling": (),
    "tie_embeddings": False,
    "qkv_bias": False,
    "sliding_window": 4,
  }


@pytest.mark.parametrize("name", DECODERS)
def test_each_decoder_computes_the_references_logits(name, outputs):
  """LlamaForCausalLM (GQA, llama3 rotary), LlamaModel (biases everywhere, no prefix),
  Qwen2ForCausalLM (tied, q/k/v biases, linear rotary, sharded), MistralForCausalLM (a
  4-token window on 12-token inputs): transformers' outputs on the real tokens, to 1e-5."""
  got, want = _forward(name, outputs)
  assert got.shape == want.shape and got.shape[0] == int(outputs["attention_mask"].sum())
  assert _relative_error(got, want) <= TOLERANCE


@pytest.mark.parametrize(
  "name, change",
  [
    ("hf_llama", {"rope_scaling": ()}),  # Llama 3's scaled frequencies ignored.
    ("hf_llama", {"rope_theta": 10000.0}),  # The checkpoint's rope_theta ignored.
    ("hf_mistral", {"sliding_window": None}),  # Mistral's window ignored.
    ("hf_mistral", {"sliding_window": 5}),  # Off by one in the window.
    ("hf_qwen2", {"rope_scaling": ()}),  # Linear scaling ignored.
  ],
)
def test_the_checks_see_a_wrong_architecture(name, change, outputs):
  """The comparison can fail: each plausible mistake misses the reference by far more than 1e-5."""
  got, want = _forward(name, outputs, **change)
  assert _relative_error(got, want) > 1e-3


def test_llama3_frequencies_follow_the_reference_formula():
  """Llama 3.1's rule, computed here in NumPy: the highest frequency (wavelength 6.3, between
  the 4 and 16 token bounds) is blended, the others (wavelengths > 16) divided by the factor."""
  inv = 1.0 / 500000.0 ** (np.arange(0, 8, 2) / 8)
  wavelength = 2 * np.pi / inv
  smooth = (16 / wavelength[0] - 1.0) / (4.0 - 1.0)
  want = np.concatenate([[(1 - smooth) * inv[0] / 8 + smooth * inv[0]], inv[1:] / 8])
  scaling = (
    ("rope_type", "llama3"),
    ("factor", 8.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 16.0),
  )
  np.testing.assert_allclose(rope_frequencies(8, 500000.0, scaling), want, rtol=1e-6)


def test_tied_models_use_the_embedding_as_their_head():
  """Qwen2 saved no lm_head (tied): the head is the embedding table; the loader drops nothing."""
  model, variables, dropped = hf.load_causal_lm(os.path.join(FIXTURES, "hf_qwen2"))
  assert model.tie_embeddings and "lm_head" not in variables["params"] and dropped == []
  tensors, _ = hf.read_tensors(os.path.join(FIXTURES, "hf_qwen2"))
  assert "lm_head.weight" not in tensors and "model.layers.0.self_attn.q_proj.bias" in tensors
  assert "model.layers.0.self_attn.o_proj.bias" not in tensors  # Qwen2: no bias on o.


def _load_fixture(name="hf_llama"):
  return hf.load_causal_lm(os.path.join(FIXTURES, name))


def test_greedy_generation_with_the_cache_matches_transformers_and_a_full_recompute(outputs):
  """Left-padded prompts: the cached decoder's tokens are transformers' `generate` tokens, and
  those of recomputing the whole sequence (no cache) for every new token."""
  model, variables, _ = _load_fixture()
  prompt, mask = jnp.asarray(outputs["prompt_ids"]), jnp.asarray(outputs["prompt_mask"])
  steps = outputs["generated"].shape[1]
  apply = jax.jit(lambda *a: model.apply(variables, *a[:2], cache=a[2]))
  tokens = np.asarray(generate(apply, model, prompt, mask, steps))
  np.testing.assert_array_equal(tokens, outputs["generated"])
  assert int(mask.sum()) < mask.size  # One prompt is padded.
  length = prompt.shape[1] + steps
  full = jax.jit(lambda ids, real: model.apply(variables, ids[None], real[None])[0])  # One shape, one compile.
  for row in range(prompt.shape[0]):
    sequence = list(np.asarray(prompt[row])[np.asarray(mask[row]).astype(bool)])
    for step in range(steps):
      n = len(sequence)
      logits = full(jnp.asarray(sequence + [0] * (length - n)), jnp.arange(length) < n)  # Right-padded.
      sequence.append(int(jnp.argmax(logits[n - 1])))
      assert sequence[-1] == tokens[row, step]


def test_generation_stops_at_the_end_of_text_token(outputs):
  """Once a sequence emits eos, the rest of its tokens are pad; the other sequence goes on."""
  model, variables, _ = _load_fixture()
  apply = lambda *a: model.apply(variables, *a[:2], cache=a[2])
  free = outputs["generated"]
  eos = int(free[0, 1])
  assert eos not in free[1] and eos != free[0, 0]
  tokens = np.asarray(
    generate(
      apply,
      model,
      jnp.asarray(outputs["prompt_ids"]),
      jnp.asarray(outputs["prompt_mask"]),
      free.shape[1],
      eos_id=eos,
      pad_id=-1,
    )
  )
  np.testing.assert_array_equal(tokens[0], list(free[0, :2]) + [-1] * (free.shape[1] - 2))
  np.testing.assert_array_equal(tokens[1], free[1])


def test_the_tokenizer_gives_the_references_ids_and_chat_text(outputs):
  """tokenizer.json read with the tokenizers library: begin-of-text, unicode, whitespace runs,
  unseen words and truncation as transformers' tokenizer; the chat template as its
  apply_chat_template renders it."""
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  ids = tokenizer(TEXTS, MAX_LEN)
  np.testing.assert_array_equal(ids, outputs["tokenizer_ids"])
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2) and (ids[:, 0] == 0).all()
  assert (ids == tokenizer.pad_id).any() and not (ids[-1] == tokenizer.pad_id).any()  # Padded; truncated.
  assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True) == str(outputs["chat_text"])
  assert tokenizer.decode(tokenizer.encode(TEXTS[3])) == TEXTS[3]
  assert tokenizer.encode("Eat", add_special_tokens=False) == tokenizer.encode("Eat")[1:]


def test_a_tokenizer_without_a_chat_template_says_so(tmp_path):
  directory = tmp_path / "tok"
  directory.mkdir()
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURES, "hf_llama", f), directory / f)
  tokenizer = hf.Tokenizer.from_directory(str(directory))
  with pytest.raises(ValueError, match="no chat template"):
    tokenizer.apply_chat_template(MESSAGES)
  # tokenizer_config.json's own chat_template (transformers 4 wrote it there).
  config = json.loads((directory / "tokenizer_config.json").read_text())
  (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ eos_token }}!"}))
  assert hf.Tokenizer.from_directory(str(directory)).apply_chat_template(MESSAGES) == "<|end_of_text|>!"


def test_an_exported_adapter_attaches_to_the_reference_and_loads_back(outputs):
  """The fixture adapter was written by `peft.save_peft` with `hf.module_namer("llama")`;
  `peft.PeftModel.from_pretrained` attached it to LlamaForCausalLM (the script fails on
  missing keys): loaded back, the project's adapted logits are the reference's."""
  directory = os.path.join(FIXTURES, "hf_llama_adapter")
  adapter, config = peft.load_peft(directory)
  assert set(adapter) == {f"block_{i}/{m}" for i in range(2) for m in ("attn/query", "attn/value", "mlp/down")}
  assert adapter["block_0/mlp/down"]["a"].shape == (40, 2) and adapter["block_0/mlp/down"]["b"].shape == (2, 32)
  assert "model.layers.1.mlp.down_proj" in config["target_modules"]
  model, variables, _ = _load_fixture()
  adapted = lora.apply(
    model,
    variables,
    adapter,
    jnp.asarray(outputs["input_ids"]),
    jnp.asarray(outputs["attention_mask"]),
    scale=peft.scale_from_config(config),
  )
  real = outputs["attention_mask"].astype(bool)
  want = outputs["hf_llama_adapted_output"][real]
  assert _relative_error(np.asarray(adapted)[real], want) <= TOLERANCE
  assert _relative_error(want, outputs["hf_llama_output"][real]) > 0.1


def test_module_names_are_the_references():
  name = hf.module_namer("llama")
  assert name("block_1/attn/out") == "model.layers.1.self_attn.o_proj"
  assert name("block_0/mlp/gate") == "model.layers.0.mlp.gate_proj"
  assert name("block_0/mlp_norm") == "model.layers.0.post_attention_layernorm"
  assert name("lm_head") == "lm_head" and name("embed") == "model.embed_tokens"
  assert hf.decoder_module_name("block_0/attn/query", prefix="") == "layers.0.self_attn.q_proj"
  assert name("block_0/attn/rotary") is None


def test_a_transformers_4_config_gives_the_same_architecture():
  """transformers 4.x writes rope_theta and rope_scaling at the top level (5.x: rope_parameters)."""
  config = hf.read_config(os.path.join(FIXTURES, "hf_llama"))
  parameters = config.pop("rope_parameters")
  old = {**config, "rope_theta": parameters.pop("rope_theta"), "rope_scaling": parameters}
  assert hf.architecture(old) == hf.architecture(hf.read_config(os.path.join(FIXTURES, "hf_llama")))


@pytest.mark.parametrize("name, same_as", [("hf_llama_v4", "hf_llama"), ("hf_qwen2_v4", "hf_qwen2")])
def test_checkpoints_transformers_4_wrote_load_with_its_logits(name, same_as):
  """Checkpoints saved by transformers 4.57 (`--parts decoders_v4`; versions.json's
  "decoders_v4"): config.json in 4.x's layout (rope_theta and rope_scaling at the top level, no
  rope_parameters; Qwen2's use_sliding_window and max_window_layers) gives the architecture 5.x's
  config of the same model gives, also with the window Qwen2.5's hub configs state beside
  use_sliding_window=false (not applied), and the logits transformers 4 computed."""
  with np.load(os.path.join(FIXTURES, "hf_decoder_v4_outputs.npz")) as f:
    outputs = dict(f)
  config = hf.read_config(os.path.join(FIXTURES, name))
  assert "rope_parameters" not in config and "rope_theta" in config and config["transformers_version"].startswith("4.")
  expected = hf.architecture(hf.read_config(os.path.join(FIXTURES, same_as)))
  assert hf.architecture(config) == expected
  if config["model_type"] == "qwen2":
    assert config["use_sliding_window"] is False and hf.architecture({**config, "sliding_window": 131072}) == expected
  got, want = _forward(name, outputs)
  assert _relative_error(got, want) <= TOLERANCE


def test_a_transformers_4_llama_generates_the_tokens_transformers_4_generates():
  with np.load(os.path.join(FIXTURES, "hf_decoder_v4_outputs.npz")) as f:
    outputs = dict(f)
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama_v4"))
  tokens = generate(
    lambda *a: model.apply(variables, *a[:2], cache=a[2]),
    model,
    jnp.asarray(outputs["prompt_ids"]),
    jnp.asarray(outputs["prompt_mask"]),
    max_new_tokens=outputs["generated"].shape[1],
  )
  np.testing.assert_array_equal(tokens, outputs["generated"])


@pytest.mark.parametrize(
  "change, message",
  [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "lacks \\['factor'\\]"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
  ],
)
def test_what_the_decoder_cannot_run_is_refused_by_name(change, message):
  config = {**hf.read_config(os.path.join(FIXTURES, "hf_llama")), **change}
  with pytest.raises(CheckpointError, match=message):
    hf.architecture(config)


def test_a_missing_or_misshapen_tensor_is_named_with_its_shard(tmp_path):
  directory = tmp_path / "qwen"
  shutil.copytree(os.path.join(FIXTURES, "hf_qwen2"), directory)
  with open(directory / hf.INDEX_FILE) as f:
    shard = json.load(f)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  tensors = load_file(str(directory / shard))
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :31]
  save_file(tensors, str(directory / shard))
  with pytest.raises(CheckpointError, match=rf"up_proj.weight \({shard}\): shape \(40, 31\).*expects \(32, 40\)"):
    hf.load_causal_lm(str(directory))


def test_bfloat16_weights_give_the_float32_logits_closely(outputs):
  """Frozen weights in bfloat16 (as on accelerators): every weight is bf16, the logits float32
  and within bf16's precision of the reference."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama"), dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  logits = model.apply(variables, jnp.asarray(outputs["input_ids"]), jnp.asarray(outputs["attention_mask"]))
  real = outputs["attention_mask"].astype(bool)
  assert logits.dtype == jnp.float32
  assert 1e-5 < _relative_error(np.asarray(logits)[real], outputs["hf_llama_output"][real]) < 5e-2


def test_padding_and_remat_leave_the_real_tokens_unchanged():
  """Right padding changes no real token's logits; rematerialized blocks give the same logits
  and gradients."""
  model, variables, _ = _load_fixture()
  ids = jnp.asarray([[0, 5, 9, 17, 4, 2, 2]])
  mask = jnp.asarray([[1, 1, 1, 1, 1, 0, 0]])
  padded = jax.jit(model.apply)(variables, ids, mask)
  np.testing.assert_allclose(padded[:, :5], jax.jit(model.apply)(variables, ids[:, :5]), rtol=1e-5, atol=1e-6)
  remat = DecoderLM(
    **{
      **{
        f: getattr(model, f)
        for f in (
          "vocab_size",
          "width",
          "depth",
          "num_heads",
          "num_kv_heads",
          "head_dim",
          "mlp_dim",
          "rope_theta",
          "rope_scaling",
        )
      },
      "remat": True,
    }
  )
  loss = lambda m: lambda v: jnp.sum(m.apply(v, ids, mask)[0, :5, :3])
  np.testing.assert_allclose(
    jax.jit(jax.grad(loss(remat)))(variables)["params"]["block_0"]["mlp"]["up"]["kernel"],
    jax.jit(jax.grad(loss(model)))(variables)["params"]["block_0"]["mlp"]["up"]["kernel"],
    rtol=1e-5,
    atol=1e-6,
  )


def _plain_attention(q, k, v, allowed):
  """Grouped-query attention written out per query head, for autodiff to differentiate:
  q [B, T, H, hd], k, v [B, S, K, hd], allowed bool [B, T, S] -> [B, T, H, hd]."""
  groups = q.shape[2] // k.shape[2]
  heads = []
  for h in range(q.shape[2]):
    logits = jnp.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // groups]) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    heads.append(jnp.einsum("bts,bsd->btd", weights, v[:, :, h // groups]))
  return jnp.stack(heads, axis=2)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_the_attention_backward_is_the_derivative_of_plain_attention(window, recompute):
  """`llama.attend`'s hand-written backward, keeping the weights or recomputing them, against
  autodiff of attention written per head (6 query heads over 2 key/value heads, T = 5 queries
  over S = 7 keys as with a cache, head width 4 != either, right padding, a sliding window): a
  wrong transpose, group, scale or softmax derivative shows."""
  from hyperlora_jax.models.llama import attend, attention_mask_for

  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (2, 5, 6, 4))
  k, v = (jax.random.normal(key, (2, 7, 2, 4)) for key in keys[1:3])
  key_mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])
  allowed = attention_mask_for(jnp.arange(2, 7), jnp.arange(7), key_mask, window)  # [B, 1, T, S]
  bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
  probe = jax.random.normal(keys[3], (2, 5, 6, 4))
  ours = lambda q, k, v: jnp.sum(attend(q, k, v, bias, recompute=recompute) * probe)
  plain = lambda q, k, v: jnp.sum(_plain_attention(q, k, v, allowed[:, 0]) * probe)
  np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-5)
  for got, want in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(plain, argnums=(0, 1, 2))(q, k, v)):
    assert float(jnp.max(jnp.abs(want))) > 1e-2  # Every input matters.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gemma2", [False, True])
def test_a_decoder_recomputing_its_attention_weights_computes_the_same_numbers(gemma2):
  """`DecoderLM(recompute_attention=True)` against the default, float32 on the CPU: the same
  loss and the same gradient of every weight, bit for bit, over left-padded rows (whose first
  queries have no key to attend: rows of the float32 minimum, where weights recomputed from a
  log-sum-exp would be 1, not 1 / S) and packed rows (segment ids), under jit; a bfloat16
  model's likewise; and with Gemma 2's capped logits and query scale (the capped attention
  recomputed by `jax.checkpoint`)."""
  from hyperlora_jax.models.llama import DecoderLM

  ids = jax.random.randint(jax.random.key(0), (3, 9), 0, 64)
  mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 9])
  probe = jax.random.normal(jax.random.key(1), (3, 9, 64))
  for dtype in (jnp.float32, jnp.bfloat16):
    arch = dict(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, dtype=dtype)
    if gemma2:
      arch.update(attention_softcap=50.0, query_pre_attn_scalar=8.0)
    kept, recomputed = DecoderLM(**arch), DecoderLM(**arch, recompute_attention=True)
    variables = kept.init(jax.random.key(2), ids, mask)
    loss = lambda model: jax.jit(jax.value_and_grad(lambda v: jnp.sum(model.apply(v, ids, mask) * probe)))
    (value, grads), (value_again, grads_again) = loss(kept)(variables), loss(recomputed)(variables)
    assert value == value_again
    chex.assert_trees_all_equal(grads, grads_again)
    assert float(jnp.max(jnp.abs(grads["params"]["block_0"]["attn"]["key"]["kernel"]))) > 0  # Attention matters.


def test_an_image_run_given_a_decoder_checkpoint_says_what_it_is():
  from configs import default
  from experiments.runner import backbone as backbone_lib

  config = default.get_config()
  config.pretrain.checkpoint = os.path.join(FIXTURES, "hf_llama")
  with pytest.raises(CheckpointError, match="pretrain.checkpoint: .*hf_llama holds a decoder language model"):
    backbone_lib.with_checkpoint_architecture(config, log=lambda _: None)


@pytest.mark.parametrize("name", ["hf_llama", "hf_qwen2", "hf_mistral"])
def test_a_saved_decoder_is_the_checkpoint_it_was_loaded_from(name, tmp_path):
  """`hf.save_causal_lm` inverts the loader: every tensor of the transformers checkpoint comes
  back under its name, bit for bit, and config.json gives the same architecture (the fixture
  script also loads such a directory with transformers and compares logits)."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  hf.save_causal_lm(str(tmp_path / "out"), model, variables)
  original, _ = hf.read_tensors(os.path.join(FIXTURES, name))
  saved = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(saved) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(saved[key], value)
  assert hf.read_checkpoint(str(tmp_path / "out"))[:2] == hf.read_checkpoint(os.path.join(FIXTURES, name))[:2]
  scaling = hf.read_config(str(tmp_path / "out"))["rope_scaling"] or {}
  if "original_max_position_embeddings" in scaling:  # transformers 4 refuses 16.0 there.
    assert isinstance(scaling["original_max_position_embeddings"], int)
