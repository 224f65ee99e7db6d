"""Settings the other fixtures leave at a loader's fallback, against transformers and peft through
golden fixtures (tests/fixtures/settings_references.py wrote them with torch; versions in
tests/fixtures/versions.json under "settings"). Each test names the plausible bug it catches."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hyperlora_jax import lora, peft, text
from hyperlora_jax.models import hf
from tests.fixtures.settings_references import PROMPTS, RESPONSES
from tests.library.models.test_hf_decoders import _relative_error

from tests.repo_paths import FIXTURES

TOLERANCE = 1e-5
PEFT_TARGETS = r"block_\d+/(attn/(query|value)|mlp/down)"


@pytest.fixture(scope="module")
def outputs():
  with np.load(os.path.join(FIXTURES, "hf_settings_outputs.npz")) as f:
    return dict(f)


def _logits(name, outputs, adapter=None, scale=1.0, **overrides):
  """(the project's logits on the real tokens, the model, its variables)."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name), **overrides)
  ids, mask = jnp.asarray(outputs["input_ids"]), jnp.asarray(outputs["attention_mask"])
  got = (
    model.apply(variables, ids, mask)
    if adapter is None
    else lora.apply(model, variables, adapter, ids, mask, scale=scale)
  )
  return np.asarray(got)[outputs["attention_mask"].astype(bool)], model, variables


def _want(outputs, key):
  return outputs[key][outputs["attention_mask"].astype(bool)]


@pytest.mark.parametrize(
  "name, fallback", [("hf_llama_eps", {"rms_norm_eps": 1e-6}), ("hf_qwen25", {"rope_theta": 10000.0})]
)
def test_rms_norm_eps_and_a_linear_scalings_rope_theta_come_from_the_checkpoint(name, fallback, outputs):
  """Llama 2/3's rms_norm_eps 1e-5, and Qwen2.5's linear scaling at rope_theta 1e6: a loader
  that used the fallback (1e-6; 10,000) would miss the reference by far more than 1e-5."""
  got, _, _ = _logits(name, outputs)
  assert _relative_error(got, _want(outputs, f"{name}_output")) <= TOLERANCE
  arch = hf.read_checkpoint(os.path.join(FIXTURES, name))[1]
  assert arch["rms_norm_eps"] == (1e-5 if name == "hf_llama_eps" else 1e-6)
  if name == "hf_qwen25":
    assert arch["rope_theta"] == 1e6 and arch["rope_scaling"] == (("rope_type", "linear"), ("factor", 2.0))
  wrong, _, _ = _logits(name, outputs, **fallback)
  assert _relative_error(wrong, _want(outputs, f"{name}_output")) > 1e-3


def test_mistral_sliding_window_null_is_full_attention_and_absent_is_the_default():
  """Mistral v0.2/v0.3 configs say `sliding_window: null`; it is full
  attention (a 4,096-token window is 3.6e-2 relative off past token 4,096). transformers: null -> None, absent -> 4096."""
  config = json.loads(open(os.path.join(FIXTURES, "hf_mistral", "config.json")).read())
  assert hf.decoder_arch({**config, "sliding_window": None})["sliding_window"] is None
  assert hf.decoder_arch({k: v for k, v in config.items() if k != "sliding_window"})["sliding_window"] == 4096
  assert hf.decoder_arch(config)["sliding_window"] == 4


def test_peft_rank_and_alpha_patterns_give_each_layer_its_own_scale(outputs):
  """peft's adapter with v_proj at rank 4, layer 1's q_proj at alpha 16 and down_proj at alpha 2
  loads with each layer's own scale (one lora_alpha / r for all is 0.33 relative off)."""
  directory = os.path.join(FIXTURES, "hf_llama_eps_peft_adapter")
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama_eps"))
  targets = lora.find_targets(model, variables, jnp.asarray(outputs["input_ids"]), target_regex=PEFT_TARGETS)
  adapter, config = peft.load_peft(directory, paths=targets, module_name=hf.module_namer("llama"))
  assert config["rank_pattern"] == {"v_proj": 4} and adapter["block_0/attn/value"]["a"].shape == (32, 4)
  got, _, _ = _logits("hf_llama_eps", outputs, adapter, peft.scale_from_config(config))
  assert _relative_error(got, _want(outputs, "peft_adapter_output")) <= TOLERANCE
  # The same factors under one scale are far off.
  names = {hf.module_namer("llama")(p): p for p in targets}
  raw = peft.from_peft_tensors(load_file(os.path.join(directory, peft.ADAPTER_WEIGHTS)), names)
  one_scale, _, _ = _logits("hf_llama_eps", outputs, raw, peft.scale_from_config(config))
  assert _relative_error(one_scale, _want(outputs, "peft_adapter_output")) > 1e-2
  assert peft.pattern_value({"layers.1.self_attn.q_proj": 16, "q_proj": 3}, "model.layers.1.self_attn.q_proj", 0) == 16
  assert peft.pattern_value({"q_proj": 3}, "model.layers.1.self_attn.kq_proj", 0) == 0  # Whole names only.


def test_exported_square_layers_and_embedding_attach_to_the_reference(outputs, tmp_path):
  """The project's export of the square q/k/v/o (a and b swapped would keep every shape) and the
  embedding table (as lora_A/B peft warned "missing adapter keys" and computed 5.05 away), with
  layer 0's k_proj at rank 3, attached by PeftModel.from_pretrained: the reference's logits are
  the project's. Written again today, the files are those peft read."""
  directory = os.path.join(FIXTURES, "hf_llama_eps_adapter")
  adapter, config = peft.load_peft(directory)
  assert adapter["embed"]["a"].shape == (400, 2) and adapter["block_0/attn/key"]["a"].shape == (32, 3)
  got, _, _ = _logits("hf_llama_eps", outputs, adapter, peft.scale_from_config(config))
  assert _relative_error(got, _want(outputs, "hf_llama_eps_adapted_output")) <= TOLERANCE
  tensors = load_file(os.path.join(directory, peft.ADAPTER_WEIGHTS))
  assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
  assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 400)
  swapped = {p: ({"a": f["b"].T, "b": f["a"].T} if p.startswith("block") else f) for p, f in adapter.items()}
  wrong, _, _ = _logits("hf_llama_eps", outputs, swapped, peft.scale_from_config(config))
  assert _relative_error(wrong, _want(outputs, "hf_llama_eps_adapted_output")) > 1e-2
  again = tmp_path / "again"
  peft.save_peft(
    str(again),
    adapter,
    alpha=config["lora_alpha"],
    module_name=hf.module_namer("llama"),
    embeddings=["embed"],
    task_type="CAUSAL_LM",
  )
  assert json.loads((again / peft.ADAPTER_CONFIG).read_text()) == config
  rewritten = load_file(str(again / peft.ADAPTER_WEIGHTS))
  assert rewritten.keys() == tensors.keys()
  for name in tensors:
    np.testing.assert_array_equal(rewritten[name], tensors[name])


def test_a_tied_embeddings_export_adapts_the_head_as_peft_does(outputs):
  """Qwen2.5's tied table with LoRA: `lora.apply` adapts the head (`embed.attend`) too; peft does
  with `ensure_weight_tying` and the head's factors, which the export writes and the loader drops."""
  directory = os.path.join(FIXTURES, "hf_qwen25_adapter")
  config = json.loads(open(os.path.join(directory, peft.ADAPTER_CONFIG)).read())
  assert config["ensure_weight_tying"] is True
  assert "base_model.model.lm_head.lora_A.weight" in load_file(os.path.join(directory, peft.ADAPTER_WEIGHTS))
  adapter, config = peft.load_peft(directory)
  assert set(adapter) == {"embed", "block_0/attn/query", "block_1/attn/query"}
  got, _, _ = _logits("hf_qwen25", outputs, adapter, peft.scale_from_config(config))
  assert _relative_error(got, _want(outputs, "hf_qwen25_adapted_output")) <= TOLERANCE


def test_an_adapter_of_another_model_is_refused_naming_the_module(outputs, tmp_path):
  """An adapter from a width-30 model is refused on width 36, naming the layer, by the loader
  (given the layers' shapes) and by `lora.apply`, not later in an anonymous dot_general."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama_eps"))
  targets = lora.find_targets(model, variables, jnp.asarray(outputs["input_ids"]), target_regex=PEFT_TARGETS)
  wider = {**targets, "block_0/attn/query": (36, 32)}
  with pytest.raises(
    ValueError,
    match=r"module 'model.layers.0.self_attn.q_proj' is \[d_in, d_out\] = \[32, 32\] "
    r"in the adapter.*layer 'block_0/attn/query' is \[36, 32\]",
  ):
    peft.load_peft(
      os.path.join(FIXTURES, "hf_llama_eps_peft_adapter"), paths=wider, module_name=hf.module_namer("llama")
    )
  adapter = {"block_0/attn/query": {"a": jnp.zeros((30, 2)), "b": jnp.zeros((2, 32))}}
  with pytest.raises(ValueError, match=r"LoRA layer 'block_0/attn/query': factors a \[30, 2\].*\[32, 32\]"):
    lora.apply(model, variables, adapter, jnp.asarray(outputs["input_ids"]), scale=1.0)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("use_dora", True, "use_dora=True"),
    ("lora_bias", True, "lora_bias=True"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias='all'"),
    ("r", 0, "r must be"),
  ],
)
def test_adapters_computing_more_than_plain_lora_are_refused_by_field(field, value, message, tmp_path):
  """DoRA, LoRA biases, modules saved whole: loading them as plain LoRA would be silently wrong."""
  directory = tmp_path / "adapter"
  shutil.copytree(os.path.join(FIXTURES, "hf_llama_eps_adapter"), directory)
  config = json.loads((directory / peft.ADAPTER_CONFIG).read_text())
  (directory / peft.ADAPTER_CONFIG).write_text(json.dumps({**config, field: value}))
  with pytest.raises(ValueError, match=message):
    peft.load_peft(str(directory))


def test_a_dora_magnitude_tensor_is_named_for_what_it_is(tmp_path):
  directory = tmp_path / "adapter"
  shutil.copytree(os.path.join(FIXTURES, "hf_llama_eps_adapter"), directory)
  tensors = load_file(str(directory / peft.ADAPTER_WEIGHTS))
  tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(32, np.float32)
  save_file(tensors, str(directory / peft.ADAPTER_WEIGHTS))
  with pytest.raises(ValueError, match=r"DoRA's magnitude"):
    peft.load_peft(str(directory))


def test_sentencepiece_prompts_and_responses_are_tokenized_whole_as_alpaca_does(outputs):
  """With a Llama 2 / TinyLlama tokenizer ('▁' marks a word start), prompt and response are
  tokenized as one text, giving Alpaca's ids (apart, every response gets an extra '▁')."""
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama2_tokenizer"))
  max_len = outputs["alpaca_ids"].shape[1]
  for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
    example = text.encode_instruction(tokenizer, prompt, response, max_len)
    np.testing.assert_array_equal(example["input_ids"], outputs["alpaca_ids"][i])
    first_loss = int(np.argmax(example["loss_mask"]))
    assert first_loss == outputs["alpaca_prompt_lengths"][i]  # The loss starts after the prompt's tokens.
    assert example["loss_mask"].sum() == example["attention_mask"].sum() - first_loss  # Through the eos.
