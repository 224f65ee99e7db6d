"""Llama-family decoders (model_type "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
"phi3"; *ForCausalLM or the bare model)
as `models.llama.DecoderLM`, both ways: `decoder_arch` / `decoder_params` read a checkpoint,
`decoder_config` / `save_causal_lm` write one that transformers' `AutoModelForCausalLM` and
`load_causal_lm` read. Module names are transformers' (the same in 4 and 5)."""

from __future__ import annotations

import json
import os
import re
from typing import Any
from collections.abc import Callable

import numpy as np
from flax import traverse_util

from hyperlora_jax.models.errors import CheckpointError
from hyperlora_jax.models.hf.family import Family
from hyperlora_jax.models.hf.reading import CONFIG_FILE, WEIGHTS_FILE
from hyperlora_jax.models.hf.tensors import leaf_source, load_tensors

# transformers' defaults per decoder family, for fields a config.json leaves out.
DEFAULTS = {
  "llama": {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
  },
  "mistral": {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "sliding_window": 4096,
  },
  "qwen2": {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
  },
  "qwen3": {  # Qwen2's, with an RMSNorm of each query and key head, no biases, head_dim 128.
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
  },
  "gemma2": {  # Gemma2Config's: alternating sliding / global blocks, logits capped, norms after too.
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
  },
  "gemma3_text": {  # Gemma3TextConfig's: five sliding blocks of six, two rope bases, heads' norms.
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
  },
  "phi3": {  # Phi3Config's: Llama's blocks with fused qkv_proj and gate_up_proj.
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
  },
}
GEMMA_TYPES = ("gemma2", "gemma3_text")
DECODER_TYPES = tuple(DEFAULTS)

_BLOCK = {
  "attn/query": "self_attn.q_proj",
  "attn/key": "self_attn.k_proj",
  "attn/value": "self_attn.v_proj",
  "attn/out": "self_attn.o_proj",
  "attn/qkv": "self_attn.qkv_proj",  # Phi-3's fused projections.
  "mlp/gate_up": "mlp.gate_up_proj",
  "attn/query_norm": "self_attn.q_norm",
  "attn/key_norm": "self_attn.k_norm",
  "mlp/gate": "mlp.gate_proj",
  "mlp/up": "mlp.up_proj",
  "mlp/down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "mlp_norm": "post_attention_layernorm",
  "attn_post_norm": "post_attention_layernorm",  # Gemma's four norms: input_layernorm (attn_norm) and these.
  "mlp_pre_norm": "pre_feedforward_layernorm",
  "mlp_post_norm": "post_feedforward_layernorm",
}
# Buffers older checkpoints saved (a tied model's saved lm_head is dropped too: `decoder_params`).
_DROPPED = ("rotary_emb.inv_freq",)


def _rope(config: dict) -> tuple[float, tuple]:
  """(rope_theta, rope_scaling pairs) of a config: transformers 5's `rope_parameters` (Gemma 3's
  per layer type: the full-attention blocks'), or 4.x's `rope_theta` and `rope_scaling`."""
  parameters = dict(config.get("rope_parameters") or {})
  if "full_attention" in parameters:
    parameters = dict(parameters["full_attention"])
  if not parameters:
    parameters = {**(config.get("rope_scaling") or {}), "rope_theta": config["rope_theta"]}
  theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
  kind = parameters.get("rope_type", parameters.get("type", "default"))
  from hyperlora_jax.models.llama import ROPE_TYPES

  if kind not in ROPE_TYPES:
    raise CheckpointError(f"config.json rope type {kind!r}; supported: {ROPE_TYPES}")
  if kind == "default":
    return theta, ()
  keep = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  }[kind]
  missing = [k for k in keep if k not in parameters]
  if missing:
    raise CheckpointError(f"config.json rope scaling {kind!r} lacks {missing}")
  return theta, (("rope_type", kind),) + tuple(sorted((k, float(parameters[k])) for k in keep))


def decoder_arch(config: dict) -> dict[str, Any]:
  """`models.llama.DecoderLM` fields of a Llama / Mistral / Qwen2 / Qwen3 config.json.

  Args:
    config: a llama / mistral / qwen2 / qwen3 config.json dict (transformers 4 or 5 layout).
  Returns:
    {`DecoderLM` field: value}.
  Raises:
    CheckpointError: what it cannot run: another activation, partial rotary, Qwen2's and
      Qwen3's per-layer sliding window.
  """
  from hyperlora_jax.models.hf import SUPPORTED

  model_type = config.get("model_type")
  if model_type not in DEFAULTS:
    raise CheckpointError(f"model_type {model_type!r} is not a Llama-family decoder; supported: {', '.join(SUPPORTED)}")
  # A field left out takes transformers' default; a field given as null keeps its meaning
  # where null means something: Mistral v0.2/v0.3's `sliding_window: null` is full attention.
  explicit_null = {k for k, v in config.items() if v is None}
  config = {**DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}
  gemma = model_type in GEMMA_TYPES
  activation = config.get("hidden_activation", config.get("hidden_act")) if gemma else config["hidden_act"]
  wanted = "gelu_pytorch_tanh" if gemma else "silu"
  if activation != wanted:
    raise CheckpointError(f"config.json hidden_act={activation!r}; supported: {wanted!r} for {model_type}")
  if config.get("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointError("config.json partial_rotary_factor != 1 is not supported")
  heads = int(config["num_attention_heads"])
  theta, scaling = _rope(config)
  window = None
  if model_type in ("mistral", "phi3") and "sliding_window" not in explicit_null:
    window = config.get("sliding_window")  # Gemma's: `_gemma_arch`.
  elif model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
    raise CheckpointError(f"config.json use_sliding_window=True ({model_type}'s per-layer window) is not supported")
  qkv_bias = bool(config.get("attention_bias", False)) or model_type == "qwen2"
  return {
    "vocab_size": int(config["vocab_size"]),
    "width": int(config["hidden_size"]),
    "depth": int(config["num_hidden_layers"]),
    "num_heads": heads,
    "num_kv_heads": int(config.get("num_key_value_heads", heads)),
    "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
    "mlp_dim": int(config["intermediate_size"]),
    "rms_norm_eps": float(config["rms_norm_eps"]),
    "rope_theta": theta,
    "rope_scaling": scaling,
    "tie_embeddings": bool(config["tie_word_embeddings"]),
    "qkv_bias": qkv_bias,
    "out_bias": bool(config.get("attention_bias", False)),
    "mlp_bias": bool(config.get("mlp_bias", False)),
    "sliding_window": None if window is None else int(window),
    **({"qk_norm": True} if model_type == "qwen3" else {}),  # Absent otherwise: configs and cache keys as before.
    **({"fused_projections": True} if model_type == "phi3" else {}),
    **(_gemma_arch(model_type, config, explicit_null) if gemma else {}),
  }


def _gemma_arch(model_type: str, config: dict, explicit_null: set) -> dict[str, Any]:
  """The `DecoderLM` fields Gemma 2 and Gemma 3 (text) add: their norms (offset 1, after the
  attention and the MLP too), GeGLU, embeddings scaled by sqrt(width), logits scaled by
  query_pre_attn_scalar^-1/2 and (Gemma 2) capped, the sliding blocks (config.json's
  `layer_types`, or transformers' rule from the pattern: Gemma 2 every other block from the
  first, Gemma 3 all but every sixth), Gemma 3's heads' norms and local rope base."""
  depth = int(config["num_hidden_layers"])
  pattern = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern", 6))
  types = config.get("layer_types") or [
    "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(depth)
  ]
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown or len(types) != depth:
    raise CheckpointError(f"config.json layer_types {types}: one of sliding_attention / full_attention per layer")
  if config.get("use_bidirectional_attention"):
    raise CheckpointError("config.json use_bidirectional_attention=True (an embedding model) is not supported")
  window = None if "sliding_window" in explicit_null else config.get("sliding_window")
  arch: dict[str, Any] = {
    "sliding_window": None if window is None else int(window),
    "sliding_layers": tuple(int(t == "sliding_attention") for t in types) if window is not None else (),
    "norm_offset": 1.0,
    "post_norms": True,
    "activation": "gelu_tanh",
    "embed_scale": True,
    "query_pre_attn_scalar": float(config["query_pre_attn_scalar"]),
    "attention_softcap": float(config.get("attn_logit_softcapping") or 0.0),
    "final_softcap": float(config.get("final_logit_softcapping") or 0.0),
  }
  if model_type == "gemma3_text":
    parameters = config.get("rope_parameters") or {}
    local = (parameters.get("sliding_attention") or {}) if "sliding_attention" in parameters else {}
    if local.get("rope_type", "default") != "default":
      raise CheckpointError(f"config.json: scaled rope {local['rope_type']!r} on the sliding layers is not supported")
    arch.update(qk_norm=True, local_rope_theta=float(local.get("rope_theta", config["rope_local_base_freq"])))
  return arch


def decoder_module_name(path: str, prefix: str = "model.") -> str | None:
  """The Hugging Face module name of our `DecoderLM` module `path` ("block_0/attn/query" ->
  "model.layers.0.self_attn.q_proj"; "lm_head" -> "lm_head"; the same in transformers 4 and 5),
  `prefix` "model." for *ForCausalLM, "" for the bare model; None for a path with no counterpart.

  Args:
    path: a Flax module path of `DecoderLM`.
    prefix: "model." or "".
  Returns:
    The module name, or None.
  """
  m = re.fullmatch(r"block_(\d+)/(attn/\w+|mlp/\w+|attn_norm|mlp_norm|attn_post_norm|mlp_pre_norm|mlp_post_norm)", path)
  if m and m.group(2) in _BLOCK:
    return f"{prefix}layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
  return {"embed": f"{prefix}embed_tokens", "norm": f"{prefix}norm", "lm_head": "lm_head"}.get(path)


def decoder_module_namer(prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """`decoder_module_name` with `prefix` ("model." unless given; the version does not matter).

  Args:
    prefix: the module prefix ("" means "model.").
    transformers_version: ignored.
  Returns:
    Flax path -> module name.
  """
  del transformers_version
  return lambda path: decoder_module_name(path, prefix or "model.")


def _decoder_source(name: str, prefix: str) -> tuple[str, str]:
  module, leaf = name.rsplit("/", 1)
  hf = decoder_module_name(module, prefix)
  return (name, "same") if hf is None else leaf_source(hf, module, leaf)


def decoder_params(
  tensors: dict[str, np.ndarray], abstract_params: Any, origin: dict[str, str] | None = None
) -> tuple[dict, list[str]]:
  """HF Llama / Mistral / Qwen2 / Qwen3 tensors -> (params shaped like `abstract_params`, float32 NumPy;
  the names of the tensors not loaded: rotary buffers, and `lm_head.weight` of a tied model that
  saved it). Arguments and errors as `vit.vit_params`.

  Returns:
    (params, dropped tensor names).
  """
  prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
  tied = "lm_head" not in abstract_params
  dropped = tuple(k for k in tensors if k.endswith(_DROPPED) or (tied and k == "lm_head.weight"))
  return load_tensors(tensors, abstract_params, lambda name: _decoder_source(name, prefix), dropped, "decoder", origin)


def load_causal_lm(checkpoint: Any, dtype: Any = None, **overrides) -> tuple[Any, dict, list[str]]:
  """A decoder language model and its weights from a Llama / Mistral / Qwen2 / Qwen3 checkpoint.

  Args:
    checkpoint: the checkpoint directory, or an `hf.Checkpoint` already opened.
    dtype: the weights' and activations' dtype (None: float32; e.g. jnp.bfloat16 on accelerators,
      RMSNorm and softmax still in float32).
    overrides: `DecoderLM` fields to set (e.g. remat=True).
  Returns:
    (`models.llama.DecoderLM` of the checkpoint's architecture, its variables {"params": ...},
     the names of tensors not loaded).
  Raises:
    CheckpointError: not a decoder checkpoint, or tensors that do not fit.
  """
  import jax
  import jax.numpy as jnp

  from hyperlora_jax.models.hf.checkpoint import Checkpoint, open_checkpoint
  from hyperlora_jax.models.llama import DecoderLM

  opened = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
  if opened.model_name != "llama":
    raise CheckpointError(f"{opened.directory}: a {opened.model_name} checkpoint, not a decoder language model")
  model = DecoderLM(**{**opened.architecture, **overrides, **({"dtype": dtype} if dtype is not None else {})})
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params, dropped = opened.params(abstract)
  cast = jnp.float32 if dtype is None else dtype
  return model, {"params": jax.tree.map(lambda x: jnp.asarray(x, cast), params)}, dropped


def decoder_config(model: Any) -> dict[str, Any]:
  """A transformers config.json for a `DecoderLM` (model_type "llama"; "qwen2" for biases on
  q/k/v only; "qwen3" with qk_norm; "mistral" with a sliding window; "gemma2" / "gemma3_text"
  with Gemma's norms), readable back by `decoder_arch`.

  Args:
    model: a `DecoderLM`.
  Returns:
    The config.json dict.
  Raises:
    ValueError: an architecture no transformers family has.
  """
  if model.norm_offset or model.post_norms:
    return _gemma_config(model)
  if model.fused_projections:
    return _phi3_config(model)
  gemma_only = ("sliding_layers", "local_rope_theta", "embed_scale", "query_pre_attn_scalar", "attention_softcap")
  if model.activation != "silu" or model.final_softcap or any(getattr(model, f) for f in gemma_only):
    raise ValueError("Gemma's options without its norms (norm_offset=1, post_norms) have no transformers family")
  if model.sliding_window and (model.qkv_bias or model.out_bias or model.mlp_bias or model.qk_norm):
    raise ValueError("a sliding window with biases or qk_norm has no transformers family (Mistral has neither)")
  if model.qk_norm:
    model_type = "qwen3"
  else:
    model_type = "mistral" if model.sliding_window else ("qwen2" if model.qkv_bias and not model.out_bias else "llama")
  if model_type in ("llama", "qwen3") and model.qkv_bias != model.out_bias:
    raise ValueError(f"{model_type}'s attention_bias sets q/k/v and o biases together")
  if model_type == "qwen3" and model.mlp_bias:
    raise ValueError("Qwen3 has no MLP biases")
  family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[model_type]
  config = {
    **_shared_config(model, model_type, f"{family}ForCausalLM"),
    "head_dim": model.head_width,
    "hidden_act": "silu",
  }
  if model_type == "llama":
    config.update(attention_bias=model.qkv_bias, mlp_bias=model.mlp_bias)
  if model_type == "qwen3":
    config.update(attention_bias=model.qkv_bias, use_sliding_window=False)
  if model_type == "mistral":
    config["sliding_window"] = model.sliding_window
  return config


def _shared_config(model: Any, model_type: str, architecture: str) -> dict[str, Any]:
  """The config.json fields every family `decoder_config` writes has, from `model`."""
  scaling = dict(model.rope_scaling) if model.rope_scaling else None
  if scaling and "original_max_position_embeddings" in scaling:  # An integer: transformers 4 refuses 16.0.
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  return {
    "model_type": model_type,
    "architectures": [architecture],
    "vocab_size": model.vocab_size,
    "hidden_size": model.width,
    "intermediate_size": model.mlp_dim,
    "num_hidden_layers": model.depth,
    "num_attention_heads": model.num_heads,
    "num_key_value_heads": model.kv_heads,
    "rms_norm_eps": model.rms_norm_eps,
    "rope_theta": model.rope_theta,
    "rope_scaling": scaling,
    "tie_word_embeddings": model.tie_embeddings,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
  }


def _phi3_config(model: Any) -> dict[str, Any]:
  """`decoder_config` of a model with fused projections: Phi-3's."""
  extra = [f for f in ("qkv_bias", "out_bias", "mlp_bias", "qk_norm", "post_norms", "embed_scale") if getattr(model, f)]
  if extra or model.norm_offset or model.activation != "silu" or model.sliding_layers or model.final_softcap:
    raise ValueError(f"Phi-3 has fused projections and nothing of {extra or 'Gemma'}")
  if model.head_width * model.num_heads != model.width:
    raise ValueError(f"Phi-3's head_dim is width / heads; this model's is {model.head_width}")
  return {
    **_shared_config(model, "phi3", "Phi3ForCausalLM"),
    "hidden_act": "silu",
    "sliding_window": model.sliding_window,
    "original_max_position_embeddings": 4096,
    "pad_token_id": None,  # Phi3Config's default, 32000, is past a smaller vocabulary.
  }


def _int_if_whole(x: float) -> float | int:
  return int(x) if float(x).is_integer() else x


def _gemma_config(model: Any) -> dict[str, Any]:
  """`decoder_config` of a Gemma 2 (no heads' norms) or Gemma 3 text model."""
  gemma3 = bool(model.qk_norm)
  wanted = dict(norm_offset=1.0, post_norms=True, activation="gelu_tanh", embed_scale=True, mlp_bias=False)
  wrong = [f"{k}={getattr(model, k)!r}" for k, v in wanted.items() if getattr(model, k) != v]
  if wrong or model.qkv_bias != model.out_bias or (gemma3 and model.attention_softcap):
    raise ValueError(f"no Gemma has {', '.join(wrong) or 'these biases or caps'}")
  model_type = "gemma3_text" if gemma3 else "gemma2"
  types = ["sliding_attention" if s else "full_attention" for s in model.sliding_layers] or (
    ["sliding_attention" if model.sliding_window else "full_attention"] * model.depth
  )
  config = {
    **_shared_config(model, model_type, "Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"),
    "head_dim": model.head_width,
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": model.qkv_bias,
    "query_pre_attn_scalar": _int_if_whole(model.query_pre_attn_scalar or model.head_width),  # transformers 5: an int.
    "sliding_window": model.sliding_window or 4096,
    "layer_types": types,
    "attn_logit_softcapping": model.attention_softcap or None,
    "final_logit_softcapping": model.final_softcap or None,
  }
  if gemma3:
    config["rope_local_base_freq"] = model.local_rope_theta or model.rope_theta
  return config


def save_causal_lm(directory: str, model: Any, variables: dict) -> None:
  """Writes a `DecoderLM` as a Hugging Face checkpoint: config.json (`decoder_config`) and
  model.safetensors with transformers' tensor names and layouts (LlamaForCausalLM's, the
  inverse of `decoder_params`), float32. The directory then loads with `load_causal_lm` and
  with transformers' `AutoModelForCausalLM.from_pretrained`.

  Args:
    directory: where to write (created if needed).
    model: the `DecoderLM`.
    variables: {"params": ...}.
  """
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  tensors = {}
  for name, value in flat.items():
    key, conversion = _decoder_source(name, "model.")
    array = np.asarray(value, np.float32)
    tensors[key] = np.ascontiguousarray(array.T if conversion == "linear" else array)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(decoder_config(model), f, indent=2)
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


FAMILY = Family(
  model_types=DECODER_TYPES,
  model_name="llama",
  description=(
    "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3 (LlamaForCausalLM, MistralForCausalLM, "
    "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM; or their bare models)"
  ),
  architecture=decoder_arch,
  params=decoder_params,
  module_namer=decoder_module_namer,
)
