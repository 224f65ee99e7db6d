"""Decoder families beyond Llama, Qwen2 and Mistral against transformers, through golden fixtures
(tests/fixtures/family_references.py wrote them with torch; versions in
tests/fixtures/versions.json under "families"). No PyTorch here. Qwen3: Qwen2 without biases,
with an RMSNorm of each query and key head before the rotation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import instruction_tuning
from experiments.runner.train import train_and_evaluate
from hyperlora_jax import lora, peft
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import DecoderLM, generate

from tests.repo_paths import FIXTURES

TOLERANCE = 1e-5
QWEN3 = os.path.join(FIXTURES, "hf_qwen3")


@pytest.fixture(scope="module")
def outputs():
  with np.load(os.path.join(FIXTURES, "hf_families_outputs.npz")) as f:
    return dict(f)


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(want)))


def _real(outputs, array):
  return np.asarray(array)[outputs["attention_mask"].astype(bool)]


def _apply(model, variables, outputs, adapter=None, scale=1.0):
  ids, mask = jnp.asarray(outputs["input_ids"]), jnp.asarray(outputs["attention_mask"])
  if adapter is None:
    return model.apply(variables, ids, mask)
  return lora.apply(model, variables, adapter, ids, mask, scale=scale)


def test_qwen3s_architecture_and_logits_are_the_references(outputs):
  """Qwen3-0.6B's shape in small: head_dim 12 != 32 / 4 (a loader deriving it from the width
  could not even load q_proj), 2 key/value heads, tied table, rope_theta 1e6; and the heads'
  norms: the same weights without them miss the reference far beyond the tolerance."""
  model, variables, dropped = hf.load_causal_lm(QWEN3)
  assert dropped == [] and (model.qk_norm, model.head_width, model.kv_heads) == (True, 12, 2)
  assert (model.tie_embeddings, model.rope_theta, model.qkv_bias) == (True, 1e6, False)
  assert variables["params"]["block_0"]["attn"]["query_norm"]["scale"].shape == (12,)
  want = _real(outputs, outputs["hf_qwen3_output"])
  assert _relative_error(_real(outputs, _apply(model, variables, outputs)), want) <= TOLERANCE
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  without = traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if "_norm/scale" not in k or "attn/" not in k}, sep="/"
  )
  unnormed = DecoderLM(**{**hf.open_checkpoint(QWEN3).architecture, "qk_norm": False})
  assert _relative_error(_real(outputs, _apply(unnormed, {"params": without}, outputs)), want) > 1e-2


def test_qwen3_generates_the_references_tokens(outputs):
  model, variables, _ = hf.load_causal_lm(QWEN3)
  tokens = generate(
    lambda *a: model.apply(variables, *a[:2], cache=a[2]),
    model,
    jnp.asarray(outputs["prompt_ids"]),
    jnp.asarray(outputs["prompt_mask"]),
    max_new_tokens=outputs["qwen3_generated"].shape[1],
  )
  np.testing.assert_array_equal(np.asarray(tokens), outputs["qwen3_generated"])


def test_qwen3_adapters_go_both_ways(outputs):
  """The project's export (q, k, v: 32 -> 48 / 24 / 24, down: 40 -> 32) attached by
  `peft.PeftModel.from_pretrained`, and peft's own (q, k, up) read by the project: each gives
  the reference's adapted logits; the heads' norms are no LoRA target (they are not layers)."""
  model, variables, _ = hf.load_causal_lm(QWEN3)
  names = hf.module_namer("llama")
  assert names("block_1/attn/key_norm") == "model.layers.1.self_attn.k_norm"
  adapter, config = peft.load_peft(os.path.join(FIXTURES, "hf_qwen3_adapter"))
  assert adapter["block_0/attn/query"]["b"].shape == (2, 48) and config["task_type"] == "CAUSAL_LM"
  got = _apply(model, variables, outputs, adapter, peft.scale_from_config(config))
  assert _relative_error(_real(outputs, got), _real(outputs, outputs["hf_qwen3_adapted_output"])) <= TOLERANCE
  ids = jnp.asarray(outputs["input_ids"])
  paths = lora.find_targets(model, variables, ids, target_regex=r"block_\d+/(attn/(query|key|value|out)|mlp/\w+)")
  theirs, config = peft.load_peft(os.path.join(FIXTURES, "hf_qwen3_peft_adapter"), paths=list(paths), module_name=names)
  assert sorted(theirs) == sorted(f"block_{i}/{m}" for i in range(2) for m in ("attn/query", "attn/key", "mlp/up"))
  got = _apply(model, variables, outputs, theirs, peft.scale_from_config(config))
  assert _relative_error(_real(outputs, got), _real(outputs, outputs["hf_qwen3_peft_adapted_output"])) <= TOLERANCE


def test_a_saved_qwen3_is_read_back_as_qwen3(tmp_path):
  """`save_causal_lm` writes model_type qwen3 (the fixture script loads it in transformers:
  versions.json's saved_qwen3_loaded_by_transformers); the heads' norms keep their names."""
  model, variables, _ = hf.load_causal_lm(QWEN3)
  hf.save_causal_lm(str(tmp_path), model, variables)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
  again, reloaded, _ = hf.load_causal_lm(str(tmp_path))
  assert again == model
  jax.tree.map(np.testing.assert_array_equal, reloaded, variables)
  with pytest.raises(ValueError, match="Qwen3 has no MLP biases"):
    hf.decoder_config(model.clone(mlp_bias=True))


@pytest.mark.parametrize("method", ["fedit", "hyperlora"])
def test_fedit_and_hyperlora_run_on_a_qwen3_directory_as_the_readme_says(method, tmp_path, cache_dirs):
  """`--config configs/instruction_tuning.py:smoke,method=...,checkpoint=DIR` on the Qwen3
  directory (its tokenizer beside it): the run's model block is Qwen3's, it trains (the loss
  falls) and evaluates on the embedded records."""
  config = instruction_tuning.get_config(f"smoke,method={method},rounds=2,checkpoint={QWEN3}")
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  result = train_and_evaluate(config, str(tmp_path / method), progress=False, log=lambda _: None)
  records = result["records"]
  recorded = json.loads((tmp_path / method / "config.json").read_text())
  assert recorded["model"]["qk_norm"] is True and recorded["model"]["head_dim"] == 12
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert 0.0 <= records[-1]["global_accuracy"] <= 1.0 and np.isfinite(records[-1]["global_perplexity"])
