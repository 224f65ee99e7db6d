"""ViT checkpoints (model_type "vit": `ViTModel`, `ViTForImageClassification`) as `models.vit.ViT`.

Tensors are named by transformers 4.x's modules (5.x writes those names too, and renames its
modules on load); adapters attach by the live module names, so `vit_module_name` takes the
major version (checked against transformers 4.57 and 5.24 by the fixture script). Layouts: the
patch conv [D, 3, p, p] -> [p, p, 3, D], every Linear [out, in] -> kernel [in, out].
ViTModel's `pooler` (a tanh Dense ViTForImageClassification does not use) and `classifier` are
not loaded: a federated run trains its own head on the class token's final state, as
ViTForImageClassification does; they are returned as dropped, by name.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Callable

import numpy as np

from hyperlora_jax.models.errors import CheckpointError
from hyperlora_jax.models.hf.family import Family
from hyperlora_jax.models.hf.reading import gelu_variant, square_size
from hyperlora_jax.models.hf.tensors import leaf_source, load_tensors

DROPPED = ("pooler.", "classifier.")
# transformers' defaults, for fields a config.json leaves out.
DEFAULTS = {
  "hidden_size": 768,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "intermediate_size": 3072,
  "hidden_act": "gelu",
  "layer_norm_eps": 1e-12,
  "image_size": 224,
  "patch_size": 16,
}

# Our block-relative module path -> Hugging Face's, by transformers major version.
_BLOCK_NAMES = {
  4: {
    "attn/query": "attention.attention.query",
    "attn/key": "attention.attention.key",
    "attn/value": "attention.attention.value",
    "attn/out": "attention.output.dense",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
  },
  5: {
    "attn/query": "attention.q_proj",
    "attn/key": "attention.k_proj",
    "attn/value": "attention.v_proj",
    "attn/out": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
  },
}
_LAYERS = {4: "encoder.layer", 5: "layers"}
TRANSFORMERS_VERSIONS = tuple(_BLOCK_NAMES)  # Majors whose module names `vit_module_name` knows.


def vit_arch(config: dict) -> dict[str, Any]:
  """`models.vit.ViT` fields of a Hugging Face ViT config.json.

  Args:
    config: a ViT config.json dict.
  Returns:
    {`models.vit.ViT` field: value}.
  Raises:
    CheckpointError: another model_type, or what the ViT cannot run (not 3 channels, another
      activation, a non-square patch).
  """
  from hyperlora_jax.models.hf import SUPPORTED

  if config.get("model_type") != "vit":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not a ViT; supported: {', '.join(SUPPORTED)}")
  config = {**DEFAULTS, **config}
  if config.get("num_channels", 3) != 3:
    raise CheckpointError(f"config.json num_channels={config['num_channels']}: only 3-channel (RGB) ViTs are supported")
  return {
    "patch_size": square_size(config["patch_size"], "patch_size"),
    "width": int(config["hidden_size"]),
    "depth": int(config["num_hidden_layers"]),
    "num_heads": int(config["num_attention_heads"]),
    "mlp_dim": int(config["intermediate_size"]),
    "gelu": gelu_variant(config["hidden_act"]),
    "layer_norm_eps": float(config["layer_norm_eps"]),
    "qkv_bias": bool(config.get("qkv_bias", True)),
  }


def image_size(config: dict) -> int:
  """The image side a ViT config.json's position embeddings are for.

  Args:
    config: a ViT config.json dict.
  Returns:
    The image side in pixels.
  """
  return square_size({**DEFAULTS, **config}["image_size"], "image_size")


def vit_module_name(path: str, prefix: str = "", transformers_version: int = 5) -> str | None:
  """The Hugging Face module name of our ViT module `path` in transformers `transformers_version`
  (4: "encoder/block_0/attn/query" -> "encoder.layer.0.attention.attention.query"; 5:
  "layers.0.attention.q_proj"), `prefix` "vit." for ViTForImageClassification; None for a path
  with no counterpart.

  Args:
    path: a Flax module path of `models.vit.ViT`.
    prefix: "vit." or "".
    transformers_version: 4 or 5.
  Returns:
    The module name, or None.
  """
  if transformers_version not in _BLOCK_NAMES:
    raise ValueError(f"transformers_version={transformers_version}; known: {TRANSFORMERS_VERSIONS}")
  m = re.fullmatch(r"encoder/block_(\d+)/(attn/\w+|mlp/fc[12]|norm[12])", path)
  if m and m.group(2) in _BLOCK_NAMES[transformers_version]:
    return f"{prefix}{_LAYERS[transformers_version]}.{m.group(1)}.{_BLOCK_NAMES[transformers_version][m.group(2)]}"
  return {"embedding": f"{prefix}embeddings.patch_embeddings.projection", "encoder/norm": f"{prefix}layernorm"}.get(
    path
  )


def vit_module_namer(prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """`vit_module_name` with these arguments: the `module_name` of `peft.save_peft` / `load_peft`
  for an adapter of a Hugging Face ViT (prefix "vit." for ViTForImageClassification).

  Args:
    prefix: "vit." or "".
    transformers_version: 4 or 5.
  Returns:
    Flax path -> module name.
  """
  vit_module_name("embedding", prefix, transformers_version)  # Checks the version now.
  return lambda path: vit_module_name(path, prefix, transformers_version)


def _prefix(tensors: dict) -> str:
  """'vit.' for ViTForImageClassification, '' for ViTModel."""
  return "vit." if any(k.startswith("vit.") for k in tensors) else ""


def _tensor_names_version(tensors: dict, prefix: str) -> int:
  """The naming of a checkpoint's tensors: 4.x's (every release writes those), or 5.x's module names."""
  return 5 if any(k.startswith(f"{prefix}layers.") for k in tensors) else 4


def _vit_source(name: str, prefix: str, version: int) -> tuple[str, str]:
  """(HF tensor name, conversion) of our ViT's flat param `name` ('/'-joined)."""
  if name == "cls":
    return f"{prefix}embeddings.cls_token", "same"
  if name == "pos_embedding":
    return f"{prefix}embeddings.position_embeddings", "same"
  module, leaf = name.rsplit("/", 1)
  hf = vit_module_name(module, prefix, version)
  return (name, "same") if hf is None else leaf_source(hf, module, leaf)


def vit_params(
  tensors: dict[str, np.ndarray], abstract_params: Any, origin: dict[str, str] | None = None
) -> tuple[dict, list[str]]:
  """HF ViT tensors -> the ViT's params.

  Args:
    tensors: {name: array} (`read_tensors`). abstract_params: the ViT's params (its head left
      out). origin: {name: file} (`read_tensors`), for errors.
  Returns:
    (params shaped like `abstract_params` without its head, float32 NumPy; the names of the
     checkpoint tensors not loaded: pooler, classifier).
  Raises:
    CheckpointError: naming every missing, misshapen or unexpected tensor (and its file).
  """
  prefix = _prefix(tensors)
  version = _tensor_names_version(tensors, prefix)
  dropped = DROPPED + tuple(prefix + p for p in DROPPED)
  return load_tensors(tensors, abstract_params, lambda name: _vit_source(name, prefix, version), dropped, "ViT", origin)


FAMILY = Family(
  model_types=("vit",),
  model_name="vit",
  description="vit (ViTModel, ViTForImageClassification)",
  architecture=vit_arch,
  params=vit_params,
  module_namer=vit_module_namer,
  image_size=image_size,
)
