"""Reading a Hugging Face checkpoint directory: config.json, the (sharded) safetensors, the image
normalization of preprocessor_config.json, and config.json sizes. No family knowledge here."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from hyperlora_jax.models.errors import CheckpointError, check_finite

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def read_config(directory: str, supported: str = "") -> dict:
  """The checkpoint's config.json as a dict.

  Args:
    directory: a `save_pretrained` directory.
    supported: what the error for a directory without config.json lists as supported.
  Raises:
    CheckpointError: no config.json, or not a JSON object.
  """
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
      f"{directory}: no {CONFIG_FILE}, so not a Hugging Face checkpoint directory "
      f"(supported: {supported}; or an .npz file)"
    )
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object of fields")
  return config


def read_tensors(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Every tensor of `model.safetensors`, or of every shard `model.safetensors.index.json` lists.

  Returns:
    ({tensor name: array, as stored}, {tensor name: the file holding it}).
  Raises:
    CheckpointError: no weights file, a damaged one, a tensor in another shard than the index
      says, or a float tensor that is not finite (named with its file).
  """
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
    raise CheckpointError(
      f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} (found: {', '.join(found)}); "
      f"PyTorch .bin checkpoints are not read: save with safe_serialization=True"
    )
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


def image_normalization(directory: str) -> tuple[list[float], list[float]] | None:
  """(image_mean, image_std), 3 floats each, of a checkpoint's preprocessor_config.json; None
  without one (or for `directory` '').

  Args:
    directory: a checkpoint directory, or "".
  """
  path = os.path.join(directory, PREPROCESSOR_FILE) if directory else ""
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    processor = json.load(f)
  mean, std = processor.get("image_mean", [0.5] * 3), processor.get("image_std", [0.5] * 3)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise CheckpointError(f"{path}: image_mean {mean} and image_std {std} must be 3 values, std > 0")
  return [float(v) for v in mean], [float(v) for v in std]


def square_size(value: Any, field: str) -> int:
  """A config.json size as one integer: `224`, or `[224, 224]` (transformers accepts a pair).

  Args:
    value: the config.json value.
    field: its name, for the error.
  Returns:
    The side, an int >= 1.
  Raises:
    CheckpointError: naming `field`, for a non-square pair or another value.
  """
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointError(
        f"config.json {field}={list(value)}: only square sizes (one integer or [n, n]) are supported"
      )
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
    raise CheckpointError(f"config.json {field}={value!r}: a positive integer (or [n, n]) is expected")
  return int(value)


def gelu_variant(hidden_act: str) -> str:
  """The `models.vit.gelu` variant of a config.json `hidden_act` ('gelu' -> 'exact', ...).

  Args:
    hidden_act: config.json's activation name.
  Returns:
    "exact", "tanh" or "quick".
  Raises:
    CheckpointError: another activation.
  """
  if hidden_act not in GELU_OF_HIDDEN_ACT:
    raise CheckpointError(f"config.json hidden_act={hidden_act!r}; supported: {sorted(GELU_OF_HIDDEN_ACT)}")
  return GELU_OF_HIDDEN_ACT[hidden_act]


# Hugging Face hidden_act -> `models.vit.gelu` variant.
GELU_OF_HIDDEN_ACT = {
  "gelu": "exact",
  "gelu_new": "tanh",
  "gelu_pytorch_tanh": "tanh",
  "gelu_fast": "tanh",
  "quick_gelu": "quick",
}
