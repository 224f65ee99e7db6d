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
from experiments.runner import methods
from experiments.runner.train import train_and_evaluate
from hyperlora_jax import lora, peft
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import generate

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


FAMILIES = ("hf_qwen3", "hf_gemma2", "hf_gemma3", "hf_phi3")
# What each fixture's config.json must give (a loader falling back to a default fails here).
ARCHITECTURES = {
  "hf_qwen3": dict(qk_norm=True, head_dim=12, num_kv_heads=2, tie_embeddings=True, rope_theta=1e6, qkv_bias=False),
  "hf_phi3": dict(
    fused_projections=True, num_kv_heads=2, tie_embeddings=False, sliding_window=4, rms_norm_eps=1e-5, qk_norm=False
  ),
  "hf_gemma2": dict(
    sliding_window=4,
    sliding_layers=(1, 0, 1),
    norm_offset=1.0,
    post_norms=True,
    activation="gelu_tanh",
    embed_scale=True,
    query_pre_attn_scalar=10.0,
    attention_softcap=1.5,
    final_softcap=3.0,
    qk_norm=False,
  ),
  "hf_gemma3": dict(
    sliding_window=4,
    sliding_layers=(1, 1, 0),
    qk_norm=True,
    norm_offset=1.0,
    rope_theta=1e6,
    rope_scaling=(("rope_type", "linear"), ("factor", 8.0)),
    local_rope_theta=10000.0,
    query_pre_attn_scalar=10.0,
    attention_softcap=0.0,
    final_softcap=0.0,
  ),
}
# Each option the family adds, undone on the same weights: the logits then miss the reference.
UNDONE = [
  ("hf_gemma2", dict(attention_softcap=0.0)),
  ("hf_gemma2", dict(final_softcap=0.0)),
  ("hf_gemma2", dict(sliding_layers=(1, 1, 1))),
  ("hf_gemma2", dict(query_pre_attn_scalar=0.0)),
  ("hf_gemma2", dict(embed_scale=False)),
  ("hf_gemma2", dict(activation="silu")),
  ("hf_gemma3", dict(local_rope_theta=0.0)),
  ("hf_gemma3", dict(sliding_layers=())),
  ("hf_gemma3", dict(rope_scaling=())),
]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_familys_architecture_and_logits_are_the_references(name, outputs):
  """Small checkpoints shaped as the real ones are (head_dim 12 != 32 / 4, 2 key/value heads,
  tied tables, Gemma's sliding and global blocks with a window of 4 < 12 tokens): the
  architecture comes from config.json, and the logits are transformers' (real tokens)."""
  model, variables, dropped = hf.load_causal_lm(os.path.join(FIXTURES, name))
  assert dropped == [] and model.kv_heads == 2 and model.head_width == (8 if name == "hf_phi3" else 12)
  assert {k: getattr(model, k) for k in ARCHITECTURES[name]} == ARCHITECTURES[name]
  got = _real(outputs, _apply(model, variables, outputs))
  assert _relative_error(got, _real(outputs, outputs[f"{name}_output"])) <= TOLERANCE


@pytest.mark.parametrize("name, change", UNDONE, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_every_option_a_family_adds_changes_its_logits(name, change, outputs):
  """Gemma's caps, windows, query scalar, embedding scale, GeGLU, two rope bases and global
  scaling each bind on these fixtures: undone, the logits miss the reference by > 1e-3."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  got = _real(outputs, _apply(model.clone(**change), variables, outputs))
  assert _relative_error(got, _real(outputs, outputs[f"{name}_output"])) > 1e-3


def test_the_heads_norms_bind():
  """Qwen3's (and Gemma 3's) RMSNorm of each query and key head: without it, on the same
  weights, the logits miss the reference far beyond the tolerance."""
  with np.load(os.path.join(FIXTURES, "hf_families_outputs.npz")) as f:
    outputs = dict(f)
  model, variables, _ = hf.load_causal_lm(QWEN3)
  assert variables["params"]["block_0"]["attn"]["query_norm"]["scale"].shape == (12,)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  without = traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if not k.endswith(("query_norm/scale", "key_norm/scale"))}, sep="/"
  )
  got = _real(outputs, _apply(model.clone(qk_norm=False), {"params": without}, outputs))
  assert _relative_error(got, _real(outputs, outputs["hf_qwen3_output"])) > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_generates_the_references_tokens(name, outputs):
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  tokens = generate(
    lambda *a: model.apply(variables, *a[:2], cache=a[2]),
    model,
    jnp.asarray(outputs["prompt_ids"]),
    jnp.asarray(outputs["prompt_mask"]),
    max_new_tokens=outputs[f"{name}_generated"].shape[1],
  )
  np.testing.assert_array_equal(np.asarray(tokens), outputs[f"{name}_generated"])


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_go_both_ways(name, outputs):
  """The project's export (the tied embedding table, q, k, v: 32 -> 48 / 24 / 24, down: 40 -> 32)
  attached by `peft.PeftModel.from_pretrained`, and peft's own (q, k, up) read by the project:
  each gives the reference's adapted logits. The heads' norms are no LoRA target (not layers)."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  names = hf.module_namer("llama")
  assert names("block_1/attn/key_norm") == "model.layers.1.self_attn.k_norm"
  assert names("block_1/mlp_pre_norm") == "model.layers.1.pre_feedforward_layernorm"
  adapter, config = peft.load_peft(os.path.join(FIXTURES, f"{name}_adapter"))
  query = "block_0/attn/qkv" if model.fused_projections else "block_0/attn/query"
  assert adapter[query]["b"].shape == (2, 64 if model.fused_projections else 48)
  assert config["task_type"] == "CAUSAL_LM" and "embed" in adapter
  assert config["ensure_weight_tying"] == model.tie_embeddings
  got = _apply(model, variables, outputs, adapter, peft.scale_from_config(config))
  assert _relative_error(_real(outputs, got), _real(outputs, outputs[f"{name}_adapted_output"])) <= TOLERANCE
  ids = jnp.asarray(outputs["input_ids"])
  paths = lora.find_targets(model, variables, ids, target_regex=r"block_\d+/(attn/(query|key|value|qkv|out)|mlp/\w+)")
  directory = os.path.join(FIXTURES, f"{name}_peft_adapter")
  theirs, config = peft.load_peft(directory, paths=list(paths), module_name=names)
  modules = ("attn/qkv", "mlp/gate_up") if model.fused_projections else ("attn/query", "attn/key", "mlp/up")
  assert sorted(theirs) == sorted(f"block_{i}/{m}" for i in range(model.depth) for m in modules)
  got = _apply(model, variables, outputs, theirs, peft.scale_from_config(config))
  assert _relative_error(_real(outputs, got), _real(outputs, outputs[f"{name}_peft_adapted_output"])) <= TOLERANCE


@pytest.mark.parametrize(
  "name, model_type, architecture",
  [
    ("hf_qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("hf_gemma2", "gemma2", "Gemma2ForCausalLM"),
    ("hf_gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    ("hf_phi3", "phi3", "Phi3ForCausalLM"),
  ],
)
def test_a_saved_decoder_is_read_back_as_its_family(name, model_type, architecture, tmp_path):
  """`save_causal_lm` writes the family's config.json (the fixture script loads it in
  transformers: versions.json's saved_*_loaded_by_transformers, 0.0); read back, the same
  model and weights."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  hf.save_causal_lm(str(tmp_path), model, variables)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == model_type and config["architectures"] == [architecture]
  again, reloaded, _ = hf.load_causal_lm(str(tmp_path))
  assert again == model
  jax.tree.map(np.testing.assert_array_equal, reloaded, variables)
  with pytest.raises(ValueError, match="no Gemma has|Qwen3 has no MLP biases|Phi-3 has fused projections and nothing"):
    hf.decoder_config(model.clone(mlp_bias=True))


@pytest.mark.parametrize(
  "name, method, targets",
  [
    ("hf_qwen3", "hyperlora", ""),
    ("hf_gemma_sentencepiece", "fedit", ""),  # Gemma 2, its tokenizer only a tokenizer.model.
    ("hf_gemma3", "fedit", ""),
    ("hf_phi3", "fedit", ".*attn/qkv"),
  ],
)
def test_fedit_and_hyperlora_run_on_each_familys_directory_as_the_readme_says(
  name, method, targets, tmp_path, cache_dirs
):
  """`--config configs/instruction_tuning.py:smoke,method=...,checkpoint=DIR` on each directory
  (its tokenizer beside it; the Gemma 2 directory's is only SentencePiece's tokenizer.model, as
  Gemma's own release ships it): the run's model block is the family's, it trains (the loss falls)
  and evaluates on the embedded records. Phi-3's fused q/k/v take `lora.target_regex='.*attn/qkv'`
  (PEFT's `target_modules=["qkv_proj"]`); the default `.*attn/(query|value)` is refused naming it."""
  directory = os.path.join(FIXTURES, name)
  config = instruction_tuning.get_config(f"smoke,method={method},rounds=3,checkpoint={directory}")
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  if targets:
    with pytest.raises(ValueError, match="matches no .* layer"):
      train_and_evaluate(config, str(tmp_path / "default_targets"), progress=False, log=lambda _: None)
    config.lora.target_regex = targets
  result = train_and_evaluate(config, str(tmp_path / method), progress=False, log=lambda _: None)
  records = result["records"]
  recorded = json.loads((tmp_path / method / "config.json").read_text())["model"]
  assert recorded["head_dim"] == (8 if name == "hf_phi3" else 12)
  assert recorded.get("qk_norm", False) == (name in ("hf_qwen3", "hf_gemma3"))
  assert recorded.get("attention_softcap", 0.0) == (1.5 if name == "hf_gemma_sentencepiece" else 0.0)
  assert all(np.isfinite(r["train_loss"]) for r in records) and records[-1]["train_loss"] < records[0]["train_loss"]
  assert 0.0 <= records[-1]["global_accuracy"] <= 1.0 and np.isfinite(records[-1]["global_perplexity"])


FAMILY_DIRECTORIES = {  # name: (directory, lora.target_regex or the default)
  "qwen3": ("hf_qwen3", ""),
  "gemma2": ("hf_gemma_sentencepiece", ""),
  "gemma3": ("hf_gemma3", ""),
  "phi3": ("hf_phi3", ".*attn/qkv"),
}


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("family", sorted(FAMILY_DIRECTORIES))
def test_every_method_runs_on_every_family(family, method, tmp_path, cache_dirs):
  """Each of the 13 methods, 2 rounds on each new family's directory (`make test-sweep`, 52
  runs): finite losses, accuracies in [0, 1]. Catches a method whose server step assumes Llama's
  layer names or shapes (FedEx-LoRA / FLoRA merge residuals into Phi-3's fused qkv and Gemma's
  norm-offset blocks; HetLoRA's ranks; FFA-LoRA's frozen factor)."""
  directory, targets = FAMILY_DIRECTORIES[family]
  config = instruction_tuning.get_config(
    f"smoke,method={method},rounds=2,checkpoint={os.path.join(FIXTURES, directory)}"
  )
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  if targets:
    config.lora.target_regex = targets
  records = train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=lambda _: None)["records"]
  assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
  assert all(0.0 <= r["personalized_accuracy_mean"] <= 1.0 for r in records)
  for r in records:  # local-only has no global model.
    assert r["global_accuracy"] is None if method == "local_only" else 0.0 <= r["global_accuracy"] <= 1.0
