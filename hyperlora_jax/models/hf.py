"""Hugging Face checkpoints (a `save_pretrained` directory) into the project's models, no PyTorch.

    arch, tensors = hf.read_checkpoint(directory)        # config.json + (sharded) safetensors
    model = ViT(num_classes=10, **arch)                  # the checkpoint's own architecture
    params, dropped = hf.vit_params(tensors, abstract)   # Flax layout; dropped: unused tensor names
    save_peft(directory, adapter, alpha=8.0, module_name=hf.vit_module_namer())  # attaches in transformers 5

Supported: `ViTModel` and `ViTForImageClassification` (model_type "vit"), in
`model.safetensors` or sharded as `model.safetensors.index.json`. Checkpoints name tensors by
transformers 4.x's modules (5.x writes those names too, and renames its modules on load);
adapters attach by the live module names, so `vit_module_namer` takes the major version
(checked against transformers 4.57 and 5.24 by tests/fixtures/make_reference_fixtures.py).
Layout changes: the patch conv
[D, 3, p, p] -> [p, p, 3, D], every Linear [out, in] -> kernel [in, out]; `layernorm_before` /
`layernorm_after` -> `norm1` / `norm2`. The architecture (sizes, GELU variant, LayerNorm eps)
comes from config.json. `pooler` (ViTModel's tanh Dense, which ViTForImageClassification does not
use) and `classifier` are not loaded: a federated run trains its own head on the class token's
final state, as ViTForImageClassification does; they are returned as `dropped`, by name.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from hyperlora_jax.models.load import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED = ("vit (ViTModel, ViTForImageClassification)",)
# Hugging Face hidden_act -> `models.vit.gelu` variant.
GELU_OF_HIDDEN_ACT = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                      "quick_gelu": "quick"}
# Prefixes of tensors a federated run does not load (see the module docstring).
DROPPED = ("pooler.", "classifier.")


def read_config(directory: str) -> dict:
  """The checkpoint's config.json."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: no {CONFIG_FILE}, so not a Hugging Face checkpoint directory "
                          f"(supported: {', '.join(SUPPORTED)}; or an .npz file)")
  with open(path) as f:
    return json.load(f)


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
      tensors[key], origin[key] = value, name
  missing = sorted(set(weight_map or ()) - set(tensors))
  if missing:
    raise CheckpointError(f"{directory}: {INDEX_FILE} lists tensors no shard holds: {', '.join(missing[:8])}")
  return tensors, origin


def vit_arch(config: dict) -> dict[str, Any]:
  """`models.vit.ViT` fields of a Hugging Face ViT config.json (raises for what it cannot run)."""
  if config.get("model_type") != "vit":
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not supported here; supported: "
                          f"{', '.join(SUPPORTED)}")
  act = config.get("hidden_act", "gelu")
  if act not in GELU_OF_HIDDEN_ACT:
    raise CheckpointError(f"config.json hidden_act={act!r}; supported: {sorted(GELU_OF_HIDDEN_ACT)}")
  if config.get("num_channels", 3) != 3 or not config.get("qkv_bias", True):
    raise CheckpointError("config.json: only 3-channel ViTs with qkv_bias=True are supported")
  return {"patch_size": int(config["patch_size"]), "width": int(config["hidden_size"]),
          "depth": int(config["num_hidden_layers"]), "num_heads": int(config["num_attention_heads"]),
          "mlp_dim": int(config["intermediate_size"]), "gelu": GELU_OF_HIDDEN_ACT[act],
          "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12))}


def read_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(the model's architecture fields, {tensor name: array}) of a checkpoint directory."""
  arch = vit_arch(read_config(directory))
  tensors, _ = read_tensors(directory)
  return arch, tensors


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


def _hf_source(name: str, prefix: str, version: int) -> tuple[str, str]:
  """(HF tensor name, conversion) of our flat param `name` ('/'-joined)."""
  if name == "cls":
    return f"{prefix}embeddings.cls_token", "same"
  if name == "pos_embedding":
    return f"{prefix}embeddings.position_embeddings", "same"
  module, leaf = name.rsplit("/", 1)
  hf = vit_module_name(module, prefix, version)
  if hf is None:
    return name, "same"
  if leaf == "kernel":
    return f"{hf}.weight", "conv" if module == "embedding" else "linear"
  return f"{hf}.{'weight' if leaf == 'scale' else 'bias'}", "same"


def _convert(array: np.ndarray, conversion: str) -> np.ndarray:
  if conversion == "linear":
    return array.T
  if conversion == "conv":
    return array.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
  return array


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
  where = lambda key: f" ({origin[key]})" if origin and key in origin else ""
  wanted = {k: v for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()
            if not k.startswith("head/")}
  out, used, problems = {}, set(), []
  for name, spec in wanted.items():
    source, conversion = _hf_source(name, prefix, version)
    if source not in tensors:
      problems.append(f"missing {source} (for {name})")
      continue
    array = _convert(np.asarray(tensors[source]), conversion)
    if tuple(array.shape) != tuple(spec.shape):
      problems.append(f"{source}{where(source)}: shape {tuple(tensors[source].shape)}, the model expects "
                      f"{tuple(spec.shape)} as {name}")
      continue
    out[name] = np.asarray(array, np.float32)
    used.add(source)
  dropped = sorted(k for k in tensors
                   if k not in used and (k.startswith(DROPPED) or k.removeprefix(prefix).startswith(DROPPED)))
  unexpected = sorted(k for k in tensors if k not in used and k not in dropped)
  if unexpected:
    problems.append("unexpected tensors (a different architecture?): "
                    + ", ".join(f"{k}{where(k)}" for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
  if problems:
    raise CheckpointError("the Hugging Face ViT checkpoint does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/"), dropped
