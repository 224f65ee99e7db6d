"""CLIP checkpoints (model_type "clip": `CLIPModel`, both towers, projections and logit scale)
as `models.clip.CLIP`: the causal text tower pooled at end-of-text, a LayerNorm before the image
encoder, no patch bias. Module names are the same in transformers 4 and 5."""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Callable

import numpy as np

from hyperlora_jax.models.errors import CheckpointError
from hyperlora_jax.models.hf.family import Family
from hyperlora_jax.models.hf.reading import gelu_variant, square_size
from hyperlora_jax.models.hf.tensors import leaf_source, load_tensors

# position_ids: a buffer older checkpoints saved.
DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# transformers' defaults, for fields a config.json leaves out.
TEXT_DEFAULTS = {
  "vocab_size": 49408,
  "hidden_size": 512,
  "intermediate_size": 2048,
  "num_hidden_layers": 12,
  "num_attention_heads": 8,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
  "eos_token_id": 2,
}
VISION_DEFAULTS = {
  "hidden_size": 768,
  "intermediate_size": 3072,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "image_size": 224,
  "patch_size": 32,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
}

_BLOCK = {
  "attn/query": "self_attn.q_proj",
  "attn/key": "self_attn.k_proj",
  "attn/value": "self_attn.v_proj",
  "attn/out": "self_attn.out_proj",
  "mlp/fc1": "mlp.fc1",
  "mlp/fc2": "mlp.fc2",
  "norm1": "layer_norm1",
  "norm2": "layer_norm2",
}
_MODULES = {
  "image_tower/embedding": "vision_model.embeddings.patch_embedding",
  "image_tower/pre_norm": "vision_model.pre_layrnorm",
  "image_tower/encoder/norm": "vision_model.post_layernorm",
  "text_tower/token_embedding": "text_model.embeddings.token_embedding",
  "text_tower/encoder/norm": "text_model.final_layer_norm",
  "image_projection": "visual_projection",
  "text_projection": "text_projection",
}
_PARAMS = {
  "image_tower/cls": "vision_model.embeddings.class_embedding",
  "image_tower/pos_embedding": "vision_model.embeddings.position_embedding.weight",
  "text_tower/pos_embedding": "text_model.embeddings.position_embedding.weight",
  "logit_scale": "logit_scale",
}


def clip_arch(config: dict) -> dict[str, Any]:
  """`models.clip.CLIP` fields of a Hugging Face CLIPModel config.json.

  Args:
    config: a CLIPModel config.json dict.
  Returns:
    {architecture field: value}.
  Raises:
    CheckpointError: another model_type, or towers with different activations or eps.
  """
  from hyperlora_jax.models.hf import SUPPORTED

  if config.get("model_type") != "clip":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not a CLIP; supported: {', '.join(SUPPORTED)}")
  text = {**TEXT_DEFAULTS, **config.get("text_config", {})}
  vision = {**VISION_DEFAULTS, **config.get("vision_config", {})}
  if text["hidden_act"] != vision["hidden_act"] or text["layer_norm_eps"] != vision["layer_norm_eps"]:
    raise CheckpointError("config.json: the towers' hidden_act and layer_norm_eps differ; supported: equal ones")
  eos = int(text["eos_token_id"])
  return {
    "patch_size": square_size(vision["patch_size"], "vision_config.patch_size"),
    "width": int(vision["hidden_size"]),
    "depth": int(vision["num_hidden_layers"]),
    "num_heads": int(vision["num_attention_heads"]),
    "mlp_dim": int(vision["intermediate_size"]),
    "text_width": int(text["hidden_size"]),
    "text_depth": int(text["num_hidden_layers"]),
    "text_heads": int(text["num_attention_heads"]),
    "text_mlp_dim": int(text["intermediate_size"]),
    "vocab_size": int(text["vocab_size"]),
    "max_len": int(text["max_position_embeddings"]),
    "embed_dim": int(config.get("projection_dim", 512)),
    "gelu": gelu_variant(vision["hidden_act"]),
    "layer_norm_eps": float(vision["layer_norm_eps"]),
    "image_pre_norm": True,
    "patch_bias": False,
    "text_causal": True,
    "text_pooling": "eot",
    # transformers: eos_token_id 2 (configs before 4.31) means "the largest id", OpenAI's end of text.
    "eot_id": -1 if eos == 2 else eos,
  }


def image_size(config: dict) -> int:
  """The image side a CLIP config.json's vision position embeddings are for.

  Args:
    config: a CLIPModel config.json dict.
  Returns:
    The image side in pixels.
  """
  return square_size({**VISION_DEFAULTS, **config.get("vision_config", {})}["image_size"], "vision_config.image_size")


def clip_module_name(path: str) -> str | None:
  """The Hugging Face module name of our CLIP module `path` ("text_tower/encoder/block_0/attn/query"
  -> "text_model.encoder.layers.0.self_attn.q_proj"; the same in transformers 4 and 5), None
  for a path with no counterpart.

  Args:
    path: a Flax module path of `models.clip.CLIP`.
  Returns:
    The module name, or None.
  """
  m = re.fullmatch(r"(image|text)_tower/encoder/block_(\d+)/(attn/\w+|mlp/fc[12]|norm[12])", path)
  if m and m.group(3) in _BLOCK:
    tower = "vision_model" if m.group(1) == "image" else "text_model"
    return f"{tower}.encoder.layers.{m.group(2)}.{_BLOCK[m.group(3)]}"
  return _MODULES.get(path)


def clip_module_namer(prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """`clip_module_name` (CLIP's names take no prefix and do not depend on the version).

  Args:
    prefix, transformers_version: ignored.
  Returns:
    `clip_module_name`.
  """
  del prefix, transformers_version
  return clip_module_name


def _clip_source(name: str) -> tuple[str, str]:
  if name in _PARAMS:
    return _PARAMS[name], "reshape"
  module, leaf = name.rsplit("/", 1)
  hf = clip_module_name(module)
  return (name, "same") if hf is None else leaf_source(hf, module, leaf)


def clip_params(
  tensors: dict[str, np.ndarray], abstract_params: Any, origin: dict[str, str] | None = None
) -> tuple[dict, list[str]]:
  """HF CLIPModel tensors -> (params shaped like `abstract_params`, float32 NumPy; the names
  of the tensors not loaded). Arguments and errors as `vit.vit_params`.

  Returns:
    (params, dropped tensor names).
  """
  return load_tensors(tensors, abstract_params, _clip_source, DROPPED, "CLIP", origin)


FAMILY = Family(
  model_types=("clip",),
  model_name="clip",
  description="clip (CLIPModel)",
  architecture=clip_arch,
  params=clip_params,
  module_namer=clip_module_namer,
  image_size=image_size,
)
