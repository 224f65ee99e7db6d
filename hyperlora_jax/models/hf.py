"""Hugging Face checkpoints (a `save_pretrained` directory) into the project's models, no PyTorch.

    name, arch, tensors, origin = hf.read_checkpoint(directory)  # config.json + (sharded) safetensors
    model = models.build_model(name, num_classes, **arch)        # the checkpoint's own architecture
    params, dropped = hf.load_params(name, tensors, abstract)    # Flax layout; dropped: unused tensors
    save_peft(directory, adapter, alpha=8.0, module_name=hf.module_namer(name))  # attaches in transformers 5
    ids = hf.Tokenizer.from_directory(directory)(texts, max_len)  # CLIP's BPE, from tokenizer.json

    model, variables, dropped = hf.load_causal_lm(directory)   # a Llama / Mistral / Qwen2 decoder

Supported (`SUPPORTED`): `ViTModel` and `ViTForImageClassification` (model_type "vit") as
`models.vit.ViT`, `CLIPModel` (model_type "clip": both towers, projections, logit scale)
as `models.clip.CLIP`, and Llama-family decoders (model_type "llama", "mistral", "qwen2";
*ForCausalLM or the bare model) as `models.llama.DecoderLM` (module names as transformers',
`decoder_module_name`), in `model.safetensors` or sharded as `model.safetensors.index.json`.
The architecture (sizes, GELU variant, LayerNorm eps; for CLIP the causal text tower pooled at
end-of-text, the LayerNorm before the image encoder, no patch bias) comes from config.json.

ViT checkpoints name tensors by transformers 4.x's modules (5.x writes those names too, and
renames its modules on load); adapters attach by the live module names, so `module_namer`
takes the major version (checked against transformers 4.57 and 5.24 by
tests/fixtures/make_reference_fixtures.py). CLIP's names are the same in both. Layout changes:
patch convs [D, 3, p, p] -> [p, p, 3, D], every Linear [out, in] -> kernel [in, out].
ViTModel's `pooler` (a tanh Dense ViTForImageClassification does not use) and `classifier` are
not loaded: a federated run trains its own head on the class token's final state, as
ViTForImageClassification does; they are returned as `dropped`, by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from collections.abc import Callable

import numpy as np
from flax import traverse_util

from hyperlora_jax.models.load import CheckpointError, check_finite

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED = ("vit (ViTModel, ViTForImageClassification)", "clip (CLIPModel)",
             "llama, mistral, qwen2 (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; or their bare models)")
TOKENIZER_FILE = "tokenizer.json"
# Hugging Face hidden_act -> `models.vit.gelu` variant.
GELU_OF_HIDDEN_ACT = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                      "quick_gelu": "quick"}
# Prefixes of tensors a federated run does not load (see the module docstring; position_ids:
# a buffer older checkpoints saved).
DROPPED = {"vit": ("pooler.", "classifier."),
           "clip": ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")}
# transformers' defaults, for fields a config.json leaves out.
_VIT_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16}
_CLIP_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                       "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                       "layer_norm_eps": 1e-5, "eos_token_id": 2}
_CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5}


def read_config(directory: str) -> dict:
  """The checkpoint's config.json."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: no {CONFIG_FILE}, so not a Hugging Face checkpoint directory "
                          f"(supported: {', '.join(SUPPORTED)}; or an .npz file)")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object of fields")
  return config


def read_tensors(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: array}, {name: the file holding it}) of `model.safetensors` or of every shard
  listed in `model.safetensors.index.json`."""
  from safetensors.numpy import load_file
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
    weight_map, files = None, [WEIGHTS_FILE]
  else:
    found = sorted(os.listdir(directory))
    raise CheckpointError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} (found: {', '.join(found)}); "
                          f"PyTorch .bin checkpoints are not read: save with safe_serialization=True")
  tensors, origin = {}, {}
  for name in files:
    path = os.path.join(directory, name)
    try:
      shard = load_file(path)
    except Exception as e:  # safetensors raises its own error type for damaged files.
      raise CheckpointError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    for key, value in shard.items():
      if weight_map is not None and weight_map.get(key) != name:
        raise CheckpointError(f"{path}: holds {key!r}, which {INDEX_FILE} places in {weight_map.get(key)!r}")
      check_finite(value, f"{path}: tensor {key!r}")
      tensors[key], origin[key] = value, name
  missing = sorted(set(weight_map or ()) - set(tensors))
  if missing:
    raise CheckpointError(f"{directory}: {INDEX_FILE} lists tensors no shard holds: {', '.join(missing[:8])}")
  return tensors, origin


def _gelu(act: str) -> str:
  if act not in GELU_OF_HIDDEN_ACT:
    raise CheckpointError(f"config.json hidden_act={act!r}; supported: {sorted(GELU_OF_HIDDEN_ACT)}")
  return GELU_OF_HIDDEN_ACT[act]


def vit_arch(config: dict) -> dict[str, Any]:
  """`models.vit.ViT` fields of a Hugging Face ViT config.json (raises for what it cannot run)."""
  if config.get("model_type") != "vit":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not a ViT; supported: {', '.join(SUPPORTED)}")
  config = {**_VIT_DEFAULTS, **config}
  if config.get("num_channels", 3) != 3:
    raise CheckpointError(f"config.json num_channels={config['num_channels']}: only 3-channel (RGB) ViTs are supported")
  return {"patch_size": square_size(config["patch_size"], "patch_size"), "width": int(config["hidden_size"]),
          "depth": int(config["num_hidden_layers"]), "num_heads": int(config["num_attention_heads"]),
          "mlp_dim": int(config["intermediate_size"]), "gelu": _gelu(config["hidden_act"]),
          "layer_norm_eps": float(config["layer_norm_eps"]), "qkv_bias": bool(config.get("qkv_bias", True))}


def clip_arch(config: dict) -> dict[str, Any]:
  """`models.clip.CLIP` fields of a Hugging Face CLIPModel config.json."""
  if config.get("model_type") != "clip":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not a CLIP; supported: {', '.join(SUPPORTED)}")
  text = {**_CLIP_TEXT_DEFAULTS, **config.get("text_config", {})}
  vision = {**_CLIP_VISION_DEFAULTS, **config.get("vision_config", {})}
  if text["hidden_act"] != vision["hidden_act"] or text["layer_norm_eps"] != vision["layer_norm_eps"]:
    raise CheckpointError("config.json: the towers' hidden_act and layer_norm_eps differ; supported: equal ones")
  eos = int(text["eos_token_id"])
  return {"patch_size": square_size(vision["patch_size"], "vision_config.patch_size"),
          "width": int(vision["hidden_size"]),
          "depth": int(vision["num_hidden_layers"]), "num_heads": int(vision["num_attention_heads"]),
          "mlp_dim": int(vision["intermediate_size"]), "text_width": int(text["hidden_size"]),
          "text_depth": int(text["num_hidden_layers"]), "text_heads": int(text["num_attention_heads"]),
          "text_mlp_dim": int(text["intermediate_size"]), "vocab_size": int(text["vocab_size"]),
          "max_len": int(text["max_position_embeddings"]), "embed_dim": int(config.get("projection_dim", 512)),
          "gelu": _gelu(vision["hidden_act"]), "layer_norm_eps": float(vision["layer_norm_eps"]),
          "image_pre_norm": True, "patch_bias": False, "text_causal": True, "text_pooling": "eot",
          # transformers: eos_token_id 2 (configs before 4.31) means "the largest id", OpenAI's end of text.
          "eot_id": -1 if eos == 2 else eos}


# transformers' defaults per decoder family, for fields a config.json leaves out.
_DECODER_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "use_sliding_window": False},
}
DECODER_TYPES = tuple(_DECODER_DEFAULTS)


def _rope(config: dict) -> tuple[float, tuple]:
  """(rope_theta, rope_scaling pairs) of a config: transformers 5's `rope_parameters`, or 4.x's
  `rope_theta` and `rope_scaling`."""
  parameters = dict(config.get("rope_parameters") or {})
  if not parameters:
    parameters = {**(config.get("rope_scaling") or {}), "rope_theta": config["rope_theta"]}
  theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
  kind = parameters.get("rope_type", parameters.get("type", "default"))
  from hyperlora_jax.models.llama import ROPE_TYPES
  if kind not in ROPE_TYPES:
    raise CheckpointError(f"config.json rope type {kind!r}; supported: {ROPE_TYPES}")
  if kind == "default":
    return theta, ()
  keep = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}[kind]
  missing = [k for k in keep if k not in parameters]
  if missing:
    raise CheckpointError(f"config.json rope scaling {kind!r} lacks {missing}")
  return theta, (("rope_type", kind),) + tuple(sorted((k, float(parameters[k])) for k in keep))


def decoder_arch(config: dict) -> dict[str, Any]:
  """`models.llama.DecoderLM` fields of a Llama / Mistral / Qwen2 config.json (raises for what
  it cannot run: another activation, partial rotary, Qwen2's per-layer sliding window)."""
  model_type = config.get("model_type")
  if model_type not in _DECODER_DEFAULTS:
    raise CheckpointError(f"model_type {model_type!r} is not a Llama-family decoder; supported: {', '.join(SUPPORTED)}")
  # A field left out takes transformers' default; a field given as null keeps its meaning
  # where null means something: Mistral v0.2/v0.3's `sliding_window: null` is full attention.
  explicit_null = {k for k, v in config.items() if v is None}
  config = {**_DECODER_DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None}}
  if config["hidden_act"] != "silu":
    raise CheckpointError(f"config.json hidden_act={config['hidden_act']!r}; supported: 'silu' (SwiGLU)")
  if config.get("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointError("config.json partial_rotary_factor != 1 is not supported")
  heads = int(config["num_attention_heads"])
  theta, scaling = _rope(config)
  window = None
  if model_type == "mistral" and "sliding_window" not in explicit_null:
    window = config.get("sliding_window")
  elif model_type == "qwen2" and config.get("use_sliding_window"):
    raise CheckpointError("config.json use_sliding_window=True (Qwen2's per-layer window) is not supported")
  qkv_bias = bool(config.get("attention_bias", False)) or model_type == "qwen2"
  return {"vocab_size": int(config["vocab_size"]), "width": int(config["hidden_size"]),
          "depth": int(config["num_hidden_layers"]), "num_heads": heads,
          "num_kv_heads": int(config.get("num_key_value_heads", heads)),
          "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
          "mlp_dim": int(config["intermediate_size"]), "rms_norm_eps": float(config["rms_norm_eps"]),
          "rope_theta": theta, "rope_scaling": scaling, "tie_embeddings": bool(config["tie_word_embeddings"]),
          "qkv_bias": qkv_bias, "out_bias": bool(config.get("attention_bias", False)),
          "mlp_bias": bool(config.get("mlp_bias", False)), "sliding_window": None if window is None else int(window)}


ARCHITECTURES = {"vit": vit_arch, "clip": clip_arch, **dict.fromkeys(DECODER_TYPES, decoder_arch)}
# model_type -> the project's model name (`read_checkpoint`'s first value).
MODEL_NAMES = {"vit": "vit", "clip": "clip", **dict.fromkeys(DECODER_TYPES, "llama")}


def square_size(value: Any, field: str) -> int:
  """A config.json size as one integer: `224`, or `[224, 224]` (transformers accepts a pair);
  raises CheckpointError naming the field for a non-square pair or another value."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointError(f"config.json {field}={list(value)}: only square sizes (one integer or [n, n]) are "
                            f"supported")
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
    raise CheckpointError(f"config.json {field}={value!r}: a positive integer (or [n, n]) is expected")
  return int(value)


def image_size(config: dict) -> int:
  """The image side the checkpoint's position embeddings are for."""
  if config.get("model_type") == "clip":
    return square_size({**_CLIP_VISION_DEFAULTS, **config.get("vision_config", {})}["image_size"],
                       "vision_config.image_size")
  return square_size({**_VIT_DEFAULTS, **config}["image_size"], "image_size")


def architecture(config: dict) -> tuple[str, dict[str, Any]]:
  """(model name, its architecture fields) of a config.json."""
  model_type = config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise CheckpointError(f"model_type {model_type!r} is not supported here; supported: {', '.join(SUPPORTED)}")
  return MODEL_NAMES[model_type], ARCHITECTURES[model_type](config)


def read_checkpoint(directory: str) -> tuple[str, dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
  """(model name, its architecture fields, {tensor name: array}, {tensor name: its file}) of a
  checkpoint directory."""
  name, arch = architecture(read_config(directory))
  tensors, origin = read_tensors(directory)
  return name, arch, tensors, origin


def _prefix(tensors: dict) -> str:
  """'vit.' for ViTForImageClassification, '' for ViTModel."""
  return "vit." if any(k.startswith("vit.") for k in tensors) else ""


# Our block-relative module path -> Hugging Face's, by transformers major version. The tensor
# names in checkpoints are 4.x's module names (5.x writes and reads those too, renaming its
# modules on load); PEFT adapters attach by the live module names, so they differ by version.
_BLOCK_NAMES = {
    4: {"attn/query": "attention.attention.query", "attn/key": "attention.attention.key",
        "attn/value": "attention.attention.value", "attn/out": "attention.output.dense",
        "mlp/fc1": "intermediate.dense", "mlp/fc2": "output.dense",
        "norm1": "layernorm_before", "norm2": "layernorm_after"},
    5: {"attn/query": "attention.q_proj", "attn/key": "attention.k_proj", "attn/value": "attention.v_proj",
        "attn/out": "attention.o_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
        "norm1": "layernorm_before", "norm2": "layernorm_after"},
}
_LAYERS = {4: "encoder.layer", 5: "layers"}
TRANSFORMERS_VERSIONS = tuple(_BLOCK_NAMES)  # Majors whose module names `vit_module_name` knows.


def vit_module_name(path: str, prefix: str = "", transformers_version: int = 5) -> str | None:
  """The Hugging Face module name of our ViT module `path` in transformers `transformers_version`
  (4: "encoder/block_0/attn/query" -> "encoder.layer.0.attention.attention.query"; 5:
  "layers.0.attention.q_proj"), `prefix` "vit." for ViTForImageClassification; None for a path
  with no counterpart."""
  if transformers_version not in _BLOCK_NAMES:
    raise ValueError(f"transformers_version={transformers_version}; known: {TRANSFORMERS_VERSIONS}")
  m = re.fullmatch(r"encoder/block_(\d+)/(attn/\w+|mlp/fc[12]|norm[12])", path)
  if m and m.group(2) in _BLOCK_NAMES[transformers_version]:
    return f"{prefix}{_LAYERS[transformers_version]}.{m.group(1)}.{_BLOCK_NAMES[transformers_version][m.group(2)]}"
  return {"embedding": f"{prefix}embeddings.patch_embeddings.projection",
          "encoder/norm": f"{prefix}layernorm"}.get(path)


def vit_module_namer(prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """`vit_module_name` with these arguments: the `module_name` of `peft.save_peft` / `load_peft`
  for an adapter of a Hugging Face ViT (prefix "vit." for ViTForImageClassification)."""
  vit_module_name("embedding", prefix, transformers_version)  # Checks the version now.
  return lambda path: vit_module_name(path, prefix, transformers_version)


def _tensor_names_version(tensors: dict, prefix: str) -> int:
  """The naming of a checkpoint's tensors: 4.x's (every release writes those), or 5.x's module names."""
  return 5 if any(k.startswith(f"{prefix}layers.") for k in tensors) else 4


def _leaf_source(hf_module: str, module: str, leaf: str, conv_modules=("embedding",)) -> tuple[str, str]:
  """(HF tensor, conversion) of our `module`'s param `leaf`, the module named `hf_module`."""
  if leaf == "kernel":
    return f"{hf_module}.weight", "conv" if module.rsplit("/", 1)[-1] in conv_modules else "linear"
  if leaf == "embedding":
    return f"{hf_module}.weight", "same"
  return f"{hf_module}.{'weight' if leaf == 'scale' else 'bias'}", "same"


def _vit_source(name: str, prefix: str, version: int) -> tuple[str, str]:
  """(HF tensor name, conversion) of our ViT's flat param `name` ('/'-joined)."""
  if name == "cls":
    return f"{prefix}embeddings.cls_token", "same"
  if name == "pos_embedding":
    return f"{prefix}embeddings.position_embeddings", "same"
  module, leaf = name.rsplit("/", 1)
  hf = vit_module_name(module, prefix, version)
  return (name, "same") if hf is None else _leaf_source(hf, module, leaf)


_CLIP_BLOCK = {"attn/query": "self_attn.q_proj", "attn/key": "self_attn.k_proj", "attn/value": "self_attn.v_proj",
               "attn/out": "self_attn.out_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
               "norm1": "layer_norm1", "norm2": "layer_norm2"}
_CLIP_MODULES = {"image_tower/embedding": "vision_model.embeddings.patch_embedding",
                 "image_tower/pre_norm": "vision_model.pre_layrnorm",
                 "image_tower/encoder/norm": "vision_model.post_layernorm",
                 "text_tower/token_embedding": "text_model.embeddings.token_embedding",
                 "text_tower/encoder/norm": "text_model.final_layer_norm",
                 "image_projection": "visual_projection", "text_projection": "text_projection"}
_CLIP_PARAMS = {"image_tower/cls": "vision_model.embeddings.class_embedding",
                "image_tower/pos_embedding": "vision_model.embeddings.position_embedding.weight",
                "text_tower/pos_embedding": "text_model.embeddings.position_embedding.weight",
                "logit_scale": "logit_scale"}


def clip_module_name(path: str) -> str | None:
  """The Hugging Face module name of our CLIP module `path` ("text_tower/encoder/block_0/attn/query"
  -> "text_model.encoder.layers.0.self_attn.q_proj"; the same in transformers 4 and 5), None
  for a path with no counterpart."""
  m = re.fullmatch(r"(image|text)_tower/encoder/block_(\d+)/(attn/\w+|mlp/fc[12]|norm[12])", path)
  if m and m.group(3) in _CLIP_BLOCK:
    tower = "vision_model" if m.group(1) == "image" else "text_model"
    return f"{tower}.encoder.layers.{m.group(2)}.{_CLIP_BLOCK[m.group(3)]}"
  return _CLIP_MODULES.get(path)


def _clip_source(name: str) -> tuple[str, str]:
  if name in _CLIP_PARAMS:
    return _CLIP_PARAMS[name], "reshape"
  module, leaf = name.rsplit("/", 1)
  hf = clip_module_name(module)
  return (name, "same") if hf is None else _leaf_source(hf, module, leaf)


_DECODER_BLOCK = {"attn/query": "self_attn.q_proj", "attn/key": "self_attn.k_proj", "attn/value": "self_attn.v_proj",
                  "attn/out": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
                  "mlp/down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
# Buffers older checkpoints saved (a tied model's saved lm_head is dropped too: `decoder_params`).
_DECODER_DROPPED = ("rotary_emb.inv_freq",)


def decoder_module_name(path: str, prefix: str = "model.") -> str | None:
  """The Hugging Face module name of our `DecoderLM` module `path` ("block_0/attn/query" ->
  "model.layers.0.self_attn.q_proj"; "lm_head" -> "lm_head"; the same in transformers 4 and 5),
  `prefix` "model." for *ForCausalLM, "" for the bare model; None for a path with no counterpart."""
  m = re.fullmatch(r"block_(\d+)/(attn/\w+|mlp/\w+|attn_norm|mlp_norm)", path)
  if m and m.group(2) in _DECODER_BLOCK:
    return f"{prefix}layers.{m.group(1)}.{_DECODER_BLOCK[m.group(2)]}"
  return {"embed": f"{prefix}embed_tokens", "norm": f"{prefix}norm", "lm_head": "lm_head"}.get(path)


def _decoder_source(name: str, prefix: str) -> tuple[str, str]:
  module, leaf = name.rsplit("/", 1)
  hf = decoder_module_name(module, prefix)
  return (name, "same") if hf is None else _leaf_source(hf, module, leaf)


def decoder_params(tensors: dict[str, np.ndarray], abstract_params: Any,
                   origin: dict[str, str] | None = None) -> tuple[dict, list[str]]:
  """HF Llama / Mistral / Qwen2 tensors -> (params shaped like `abstract_params`, float32 NumPy;
  the names of the tensors not loaded: rotary buffers, and `lm_head.weight` of a tied model that
  saved it). Raises CheckpointError as `vit_params`."""
  prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
  tied = "lm_head" not in abstract_params
  dropped = tuple(k for k in tensors if k.endswith(_DECODER_DROPPED) or (tied and k == "lm_head.weight"))
  return _load(tensors, abstract_params, lambda name: _decoder_source(name, prefix), dropped, "decoder", origin)


def module_namer(model_name: str, *, prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """Flax path -> Hugging Face module name for `model_name` ("vit": `vit_module_name` with these
  arguments; "clip": `clip_module_name`; "llama": `decoder_module_name`, prefix "model." unless
  given): the `module_name` of `peft.save_peft` / `load_peft`."""
  if model_name == "clip":
    return clip_module_name
  if model_name == "llama":
    return lambda path: decoder_module_name(path, prefix or "model.")
  if model_name == "vit":
    return vit_module_namer(prefix, transformers_version)
  raise ValueError(f"model {model_name!r}: Hugging Face module names are known for 'vit', 'clip' and 'llama'")


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's 1-D bicubic resize (`F.interpolate(mode="bicubic",
  align_corners=False)` to a given size: Keys' kernel with A = -0.75, source x = (i + 0.5) *
  size_in / size_out - 0.5, out-of-range taps clamped to the border, no antialiasing)."""
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1.
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2.
  weights = np.zeros((size_out, size_in))
  for i in range(size_out):
    x = (i + 0.5) * size_in / size_out - 0.5
    left = int(np.floor(x))
    t = x - left
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(left + offset, 0), size_in - 1)] += w
  return weights


def resize_position_table(table: np.ndarray, tokens: int, prefix_tokens: int = 1) -> np.ndarray:
  """A ViT position table for another image size, as transformers' `interpolate_pos_encoding`
  (ViT, CLIP) computes it: the first `prefix_tokens` rows (the class token's) kept, the square
  grid of patch rows resized bicubically (`_bicubic_matrix`) to a square grid of `tokens -
  prefix_tokens` rows.

  Args:
    table: [1, P + g*g, D] or [P + g*g, D]. tokens: P + G*G, the new length.
  Returns:
    The table with `tokens` rows, its leading axes as given, table's dtype.
  """
  rows = table.reshape(-1, table.shape[-1]).astype(np.float64)
  old, new = len(rows) - prefix_tokens, tokens - prefix_tokens
  side_old, side_new = int(round(old ** 0.5)), int(round(new ** 0.5))
  if side_old ** 2 != old or side_new ** 2 != new:
    raise CheckpointError(f"position table of {len(rows)} rows -> {tokens}: the patch grids ({old} -> {new} "
                          f"rows after {prefix_tokens} class rows) must be square")
  resize = _bicubic_matrix(side_old, side_new)
  grid = rows[prefix_tokens:].reshape(side_old, side_old, -1)
  grid = np.einsum("ij,jkd,lk->ild", resize, grid, resize).reshape(new, -1)
  out = np.concatenate([rows[:prefix_tokens], grid])
  return out.reshape(table.shape[:-2] + out.shape).astype(table.dtype)


# Position tables `_load` resizes to the model's image size (`resize_position_table`), by our param name.
_POSITION_TABLES = ("pos_embedding", "image_tower/pos_embedding")


def _convert(array: np.ndarray, conversion: str, shape: tuple) -> np.ndarray:
  if conversion == "linear":
    return array.T
  if conversion == "conv":
    return array.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
  if conversion == "reshape" and array.size == int(np.prod(shape)):
    return array.reshape(shape)  # A position table [T, D] -> [1, T, D]; a class embedding [D] -> [1, 1, D].
  return array


def _load(tensors: dict, abstract_params: Any, source: Callable[[str], tuple[str, str]], dropped_prefixes,
          what: str, origin: dict | None) -> tuple[dict, list[str]]:
  """Params shaped like `abstract_params` (its `head` left out) from `tensors` by `source`
  (our flat name -> (tensor name, conversion)); (params, names of tensors not loaded)."""
  where = lambda key: f" ({origin[key]})" if origin and key in origin else ""
  wanted = {k: v for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()
            if not k.startswith("head/")}
  out, used, problems = {}, set(), []
  for name, spec in wanted.items():
    key, conversion = source(name)
    if key not in tensors:
      problems.append(f"missing {key} (for {name})")
      continue
    array = _convert(np.asarray(tensors[key]), conversion, tuple(spec.shape))
    if name in _POSITION_TABLES and array.shape[-2] != spec.shape[-2] and array.shape[-1] == spec.shape[-1]:
      array = resize_position_table(array, spec.shape[-2]).reshape(spec.shape)  # Built for another image size.
    if tuple(array.shape) != tuple(spec.shape):
      problems.append(f"{key}{where(key)}: shape {tuple(tensors[key].shape)}, the model expects "
                      f"{tuple(spec.shape)} as {name}")
      continue
    out[name] = np.asarray(array, np.float32)
    used.add(key)
  dropped = sorted(k for k in tensors if k not in used and any(k.startswith(p) for p in dropped_prefixes))
  unexpected = sorted(k for k in tensors if k not in used and k not in dropped)
  if unexpected:
    problems.append("unexpected tensors (a different architecture?): "
                    + ", ".join(f"{k}{where(k)}" for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
  if problems:
    raise CheckpointError(f"the Hugging Face {what} checkpoint does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/"), dropped


def vit_params(tensors: dict[str, np.ndarray], abstract_params: Any,
               origin: dict[str, str] | None = None) -> tuple[dict, list[str]]:
  """HF ViT tensors -> (params shaped like `abstract_params` without its head, float32 NumPy;
  the names of the checkpoint tensors not loaded: pooler, classifier).

  Raises:
    CheckpointError: naming every missing, misshapen or unexpected tensor (and its file, with
      `origin` from `read_tensors`).
  """
  prefix = _prefix(tensors)
  version = _tensor_names_version(tensors, prefix)
  dropped = DROPPED["vit"] + tuple(prefix + p for p in DROPPED["vit"])
  return _load(tensors, abstract_params, lambda name: _vit_source(name, prefix, version), dropped, "ViT", origin)


def clip_params(tensors: dict[str, np.ndarray], abstract_params: Any,
                origin: dict[str, str] | None = None) -> tuple[dict, list[str]]:
  """HF CLIPModel tensors -> (params shaped like `abstract_params`, float32 NumPy; the names
  of the tensors not loaded). Raises CheckpointError as `vit_params`."""
  return _load(tensors, abstract_params, _clip_source, DROPPED["clip"], "CLIP", origin)


def load_params(model_name: str, tensors: dict[str, np.ndarray], abstract_params: Any,
                origin: dict[str, str] | None = None) -> tuple[dict, list[str]]:
  """`vit_params`, `clip_params` or `decoder_params`, by `model_name` (`read_checkpoint`'s)."""
  loaders = {"vit": vit_params, "clip": clip_params, "llama": decoder_params}
  if model_name not in loaders:
    raise CheckpointError(f"model {model_name!r}: Hugging Face loading supports {', '.join(SUPPORTED)}")
  return loaders[model_name](tensors, abstract_params, origin)


def load_causal_lm(directory: str, dtype: Any = None, **overrides) -> tuple[Any, dict, list[str]]:
  """(`models.llama.DecoderLM` of the checkpoint's architecture, its variables {"params": ...},
  the names of tensors not loaded) from a Llama / Mistral / Qwen2 checkpoint directory.

  dtype: the weights' and activations' dtype (None: float32; e.g. jnp.bfloat16 on accelerators,
  RMSNorm and softmax still in float32). overrides: `DecoderLM` fields to set (e.g. remat=True).
  """
  import jax
  import jax.numpy as jnp

  from hyperlora_jax.models.llama import DecoderLM
  name, arch, tensors, origin = read_checkpoint(directory)
  if name != "llama":
    raise CheckpointError(f"{directory}: a {name} checkpoint, not a decoder language model")
  model = DecoderLM(**{**arch, **overrides, **({"dtype": dtype} if dtype is not None else {})})
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params, dropped = decoder_params(tensors, abstract, origin)
  cast = jnp.float32 if dtype is None else dtype
  return model, {"params": jax.tree.map(lambda x: jnp.asarray(x, cast), params)}, dropped


def image_normalization(directory: str) -> tuple[list[float], list[float]] | None:
  """(image_mean, image_std) of a checkpoint's preprocessor_config.json (None without one)."""
  path = os.path.join(directory, "preprocessor_config.json") if directory else ""
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    processor = json.load(f)
  mean, std = processor.get("image_mean", [0.5] * 3), processor.get("image_std", [0.5] * 3)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise CheckpointError(f"{path}: image_mean {mean} and image_std {std} must be 3 values, std > 0")
  return [float(v) for v in mean], [float(v) for v in std]


def clip_bpe_tokenizer(vocab_file: str, merges_file: str):
  """A `tokenizers.Tokenizer` of OpenAI CLIP's BPE from its vocab.json and merges.txt, the
  pipeline transformers' CLIPTokenizerFast builds from them: NFC, whitespace runs to one space,
  lower case; split into letters / digits / punctuation runs; byte-level symbols, '</w>' at word
  ends; <|startoftext|> ... <|endoftext|> around each text."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  with open(vocab_file, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_file, encoding="utf-8") as f:
    merges = [(pair[0], pair[1]) for pair in (line.split() for line in f.read().split("\n")
                                              if line and not line.startswith("#version")) if len(pair) == 2]
  tokenizer = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                   fuse_unk=False, unk_token="<|endoftext|>"))
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                           behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.RobertaProcessing(  # (sep, cls): positional in every version.
      ("<|endoftext|>", vocab["<|endoftext|>"]), ("<|startoftext|>", vocab["<|startoftext|>"]),
      trim_offsets=False, add_prefix_space=False)
  return tokenizer


def _special_token(value) -> str | None:
  """A tokenizer_config.json special token: a string, or {"content": ...} in older files."""
  return value.get("content") if isinstance(value, dict) else value


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         **special_tokens) -> str:
  """A checkpoint's Jinja chat template rendered as transformers' `apply_chat_template` renders
  it (a sandbox with trim_blocks, lstrip_blocks and loop controls; `raise_exception`,
  `strftime_now` and a `tojson` filter; `bos_token`, `eos_token`, ... as variables)."""
  import datetime

  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
      x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)


class Tokenizer:
  """A checkpoint's tokenizer (its `tokenizer.json`, read by the `tokenizers` library, no
  transformers): `tokenizer(texts, max_len)` -> int32 [len(texts), max_len], with the special
  tokens its post-processor adds (CLIP: start and end of text; Llama 3: begin of text),
  truncated to `max_len` (the special tokens kept) and padded with `pad_id`.

  `encode` / `decode` work on one text; `bos_id` / `eos_id` are tokenizer_config.json's tokens
  (None where it names none); `apply_chat_template` renders the checkpoint's chat template
  (chat_template.jinja, or tokenizer_config.json's `chat_template`).
  """

  def __init__(self, tokenizer, pad_id: int, special_tokens: dict | None = None, chat_template: str | None = None):
    self._tokenizer = tokenizer
    self.pad_id = pad_id
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}  # {"bos_token": "<s>", ...}
    self.chat_template = chat_template
    self.bos_id = self._id(self.special_tokens.get("bos_token"))
    self.eos_id = self._id(self.special_tokens.get("eos_token"))

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self._tokenizer.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_directory(cls, directory: str, pad_token: str | None = None) -> Tokenizer:
    """The tokenizer of `directory`; pads with `pad_token`, else tokenizer_config.json's
    `pad_token`, else its `eos_token` (Llama checkpoints name no pad token), else the
    end-of-text token (OpenAI CLIP's padding)."""
    import tokenizers
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(path):
      try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
      except Exception as e:  # The tokenizers library raises a bare Exception for unreadable files.
        raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from e
    elif all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
      tokenizer = clip_bpe_tokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    else:
      raise CheckpointError(f"{directory}: no {TOKENIZER_FILE}, nor CLIP's vocab.json and merges.txt")
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
    special = {k: _special_token(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    pad_token = pad_token or special["pad_token"] or special["eos_token"] or "<|endoftext|>"
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
      raise CheckpointError(f"{path}: no pad token {pad_token!r} in the vocabulary")
    template_path = os.path.join(directory, "chat_template.jinja")  # transformers 5 writes it apart.
    template = config.get("chat_template")
    if os.path.isfile(template_path):
      with open(template_path, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...].
      template = {t["name"]: t["template"] for t in template}.get("default")
    return cls(tokenizer, pad_id, special, template)

  def __call__(self, texts, max_len: int) -> np.ndarray:
    self._tokenizer.enable_truncation(max_len)
    self._tokenizer.no_padding()
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
      out[i, :len(encoding.ids)] = encoding.ids
    return out

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """The ids of one text, untruncated (with the post-processor's special tokens unless
    `add_special_tokens=False`)."""
    self._tokenizer.no_truncation()
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, offsets) of one text, untruncated: offsets[i] = (start, end) is the character span
    of `text` token i covers ((0, 0) for a special token the post-processor added)."""
    self._tokenizer.no_truncation()
    encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return encoding.ids, [tuple(span) for span in encoding.offsets]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def fingerprint(self) -> str:
    """A hash of everything that decides this tokenizer's ids and texts: its tokenizer.json
    (vocabulary, merges, normalizer, pre- and post-processor), pad id, special tokens and chat
    template (a cache of tokenized data is keyed by it)."""
    state = json.loads(self._tokenizer.to_str())
    state.pop("truncation", None), state.pop("padding", None)  # Set per call (`__call__`, `encode`).
    parts = [json.dumps(state, sort_keys=True), str(self.pad_id), json.dumps(self.special_tokens, sort_keys=True),
             self.chat_template or ""]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` [{"role", "content"}, ...] (transformers'
    `apply_chat_template(..., tokenize=False)`); tokenize it with `encode(text, False)`, as the
    template writes its own begin-of-text."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json's "
                       "chat_template); use a prompt template instead (hyperlora_jax.text)")
    return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def decoder_config(model: Any) -> dict[str, Any]:
  """A transformers config.json for a `DecoderLM` (model_type "llama"; "qwen2" for biases on
  q/k/v only; "mistral" with a sliding window), readable back by `decoder_arch`."""
  if model.sliding_window and (model.qkv_bias or model.out_bias or model.mlp_bias):
    raise ValueError("a sliding window with biases has no transformers family (Mistral has no biases)")
  model_type = "mistral" if model.sliding_window else ("qwen2" if model.qkv_bias and not model.out_bias else "llama")
  if model_type == "llama" and model.qkv_bias != model.out_bias:
    raise ValueError("Llama's attention_bias sets q/k/v and o biases together")
  scaling = dict(model.rope_scaling) if model.rope_scaling else None
  if scaling and "original_max_position_embeddings" in scaling:  # An integer: transformers 4 refuses 16.0.
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
  config = {"model_type": model_type, "architectures": [f"{family}ForCausalLM"],
            "vocab_size": model.vocab_size, "hidden_size": model.width, "intermediate_size": model.mlp_dim,
            "num_hidden_layers": model.depth, "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.kv_heads, "head_dim": model.head_width, "hidden_act": "silu",
            "rms_norm_eps": model.rms_norm_eps, "rope_theta": model.rope_theta, "rope_scaling": scaling,
            "tie_word_embeddings": model.tie_embeddings, "max_position_embeddings": 4096,
            "torch_dtype": "float32"}
  if model_type == "llama":
    config.update(attention_bias=model.qkv_bias, mlp_bias=model.mlp_bias)
  if model_type == "mistral":
    config["sliding_window"] = model.sliding_window
  return config


def save_causal_lm(directory: str, model: Any, variables: dict) -> None:
  """Writes a `DecoderLM` as a Hugging Face checkpoint: config.json (`decoder_config`) and
  model.safetensors with transformers' tensor names and layouts (LlamaForCausalLM's, the
  inverse of `decoder_params`), float32. The directory then loads with `load_causal_lm` and
  with transformers' `AutoModelForCausalLM.from_pretrained`."""
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
