"""Loads real pretrained weights from `.npz` checkpoints into the project's ViT and Mixer.

Formats (flat arrays keyed by '/'-joined parameter paths, as `np.savez` writes them):
  vision_transformer  `google-research/vision_transformer` (gs://vit_models, the AugReg
                      `.npz` files): `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/
                      query/kernel` [D, heads, head_dim], `MlpBlock_3`, `LayerNorm_0/2`, a
                      `posembed_input/pos_embedding` that includes the class token's position.
  big_vision          `google-research/big_vision`: `MultiHeadDotProductAttention_0`,
                      `MlpBlock_0`, `LayerNorm_0/1`, `pos_embedding` over the patches only (the
                      class token gets no position, so its row is 0 here, which is equivalent).
Mixer checkpoints of both repositories already use the names of `models.mixer`.
big_vision's pooling (`pool_type`) is the ViT's `pool`: "tok" (a `cls` token), "gap" (no class
token; the mean of the patch tokens) or "map" (`MAPHead_0/...`, the attention-pooling head,
loaded as `map_head`); `npz_pool` reads it from the array names.
The classifier (`head`) and `pre_logits` of a checkpoint are not loaded: federated runs train
their own head (`dropped_arrays` names them). Every array is checked against the model's
shapes; a missing, extra or misshapen array is reported by name.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import traverse_util

from hyperlora_jax.models.errors import CheckpointError, check_finite

DROPPED_PREFIXES = ("head/", "pre_logits/")

# Our ViT name -> candidate checkpoint names ({i}: block index), first found wins.
_VIT_BLOCK_NAMES = {
  "norm1": ("LayerNorm_0",),
  "norm2": ("LayerNorm_2", "LayerNorm_1"),
  "attn": ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
  "mlp/fc1": ("MlpBlock_3/Dense_0", "MlpBlock_0/Dense_0"),
  "mlp/fc2": ("MlpBlock_3/Dense_1", "MlpBlock_0/Dense_1"),
}


_MAP_HEAD_NAMES = {  # Our map_head path -> big_vision's MAPHead_0 path.
  "probe": "probe",
  "norm": "LayerNorm_0",
  "mlp/fc1": "MlpBlock_0/Dense_0",
  "mlp/fc2": "MlpBlock_0/Dense_1",
  **{proj: f"MultiHeadDotProductAttention_0/{proj}" for proj in ("query", "key", "value", "out")},
}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """{'/'-joined name: array} of an `.npz` checkpoint (every array finite).

  Args:
    path: an `.npz` file.
  Returns:
    {name: array}.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except (OSError, ValueError) as e:
    raise CheckpointError(f"pretrain.npz_path: cannot read {path!r} as .npz ({e})") from e
  for name, array in arrays.items():
    check_finite(array, f"{path}: array {name!r}")
  return arrays


def npz_pool(names) -> str:
  """The ViT pooling of a checkpoint with these array names: "map" (a MAPHead), "tok" (a class
  token) or "gap" (neither).

  Args:
    names: the checkpoint's array names.
  Returns:
    "map", "tok" or "gap".
  """
  names = set(names)
  return "map" if "MAPHead_0/probe" in names else "tok" if "cls" in names else "gap"


def npz_names(path: str) -> list[str]:
  """The array names of an `.npz` checkpoint (no array is read).

  Args:
    path: an `.npz` file.
  Returns:
    The names, in the file's order.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      return list(f.files)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"pretrain.npz_path: cannot read {path!r} as .npz ({e})") from e


def dropped_arrays(flat: dict) -> list[str]:
  """The names of the checkpoint arrays `from_npz` does not load (classifier, pre-logits).

  Args:
    flat: {name: array} (`read_npz`).
  Returns:
    Sorted names.
  """
  return sorted(k for k in flat if k.startswith(DROPPED_PREFIXES))


def _vit_source_name(name: str, flat: dict) -> str | None:
  """The checkpoint name holding our ViT parameter `name` (None if absent)."""
  m = re.fullmatch(r"encoder/block_(\d+)/(norm1|norm2|attn|mlp/fc1|mlp/fc2)(/.*)", name)
  head = re.fullmatch(r"map_head/(probe|norm|mlp/fc[12]|query|key|value|out)(/.*)?", name)
  if head:
    candidates = [f"MAPHead_0/{_MAP_HEAD_NAMES[head.group(1)]}{head.group(2) or ''}"]
  elif m:
    block, part, rest = m.groups()  # rest: '/scale', '/query/kernel', ...
    candidates = [f"Transformer/encoderblock_{block}/{c}{rest}" for c in _VIT_BLOCK_NAMES[part]]
  elif name.startswith("encoder/norm/"):
    candidates = ["Transformer/encoder_norm/" + name.split("/")[-1]]
  elif name == "pos_embedding":
    candidates = ["Transformer/posembed_input/pos_embedding", "pos_embedding"]
  else:
    candidates = [name]  # embedding/kernel, embedding/bias, cls.
  return next((c for c in candidates if c in flat), None)


def _vit_convert(name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
  """Reshapes a checkpoint array to our layout: per-head attention kernels [D, H, hd] ->
  [D, D] (out: [H, hd, D] -> [D, D]); a patch-only position table gets a zero class-token row."""
  if name == "pos_embedding" and array.ndim == 3 and array.shape[1] + 1 == shape[1]:
    return np.concatenate([np.zeros_like(array[:, :1]), array], axis=1)
  per_head = "/attn/" in name or re.match(r"map_head/(query|key|value|out)/", name)
  if per_head and array.size == int(np.prod(shape)):
    return array.reshape(shape)
  return array


def from_npz(model_name: str, flat: dict[str, np.ndarray], abstract_params: Any) -> dict:
  """Checkpoint arrays -> a params tree shaped like `abstract_params` (without its head).

  Args:
    model_name: 'vit' or 'mixer'.
    flat: {checkpoint name: array} (`read_npz`).
    abstract_params: the model's params (arrays or ShapeDtypeStructs), e.g. from `eval_shape`.
  Returns:
    The nested params, as float32 NumPy arrays.
  Raises:
    CheckpointError: naming every missing or misshapen array, or unused checkpoint arrays.
  """
  if model_name not in ("vit", "mixer"):
    raise CheckpointError(f"pretrain.npz_path: .npz loading supports model.name 'vit' and 'mixer', not {model_name!r}")
  wanted = {
    k: v for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items() if not k.startswith(DROPPED_PREFIXES)
  }
  out, used, problems = {}, set(), []
  for name, spec in wanted.items():
    source = _vit_source_name(name, flat) if model_name == "vit" else (name if name in flat else None)
    if source is None:
      problems.append(f"missing {name}")
      continue
    array = _vit_convert(name, flat[source], tuple(spec.shape)) if model_name == "vit" else flat[source]
    if tuple(array.shape) != tuple(spec.shape):
      problems.append(f"{source}: shape {tuple(flat[source].shape)}, model expects {tuple(spec.shape)}")
      continue
    out[name] = np.asarray(array, np.float32)
    used.add(source)
  unused = sorted(k for k in flat if k not in used and not k.startswith(DROPPED_PREFIXES))
  if unused:
    problems.append(
      f"unused arrays (a different architecture?): {', '.join(unused[:8])}" + (" ..." if len(unused) > 8 else "")
    )
  if model_name == "vit":
    pool = npz_pool(flat)
    model_pool = "map" if any(k.startswith("map_head/") for k in wanted) else "tok" if "cls" in wanted else "gap"
    if pool != model_pool:
      problems.append(
        f"the checkpoint's pooling is {pool!r} (big_vision pool_type), the model's {model_pool!r}: "
        f"set model.pool={pool!r}"
      )
  if problems:
    raise CheckpointError(
      f"pretrain.npz_path: the checkpoint does not fit model.name={model_name!r} "
      f"with this config: " + "; ".join(problems)
    )
  return traverse_util.unflatten_dict(out, sep="/")


def to_npz_arrays(model_name: str, params: Any, num_heads: int = 1) -> dict[str, np.ndarray]:
  """Our params -> checkpoint arrays in the `vision_transformer` layout (the inverse of
  `from_npz`, for exporting and for tests). ViT attention kernels are split into
  `num_heads` heads: query/key/value [D, D] -> [D, H, D/H], out [D, D] -> [H, D/H, D].

  Args:
    model_name: "vit" or "mixer".
    params: the model's params.
    num_heads: the ViT's heads.
  Returns:
    {name: float32 array}.
  """
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  if model_name == "mixer":
    return flat
  out = {}
  for name, array in flat.items():
    m = re.fullmatch(r"encoder/block_(\d+)/(norm1|norm2|attn|mlp/fc1|mlp/fc2)(/.*)", name)
    head = re.fullmatch(r"map_head/(probe|norm|mlp/fc[12]|query|key|value|out)(/.*)?", name)
    if head:
      part, rest = head.group(1), head.group(2) or ""
      if part in ("query", "key", "value"):
        array = array.reshape(array.shape[:-1] + (num_heads, array.shape[-1] // num_heads))
      elif part == "out" and rest == "/kernel":
        array = array.reshape((num_heads, array.shape[0] // num_heads, array.shape[1]))
      out[f"MAPHead_0/{_MAP_HEAD_NAMES[part]}{rest}"] = array
    elif m:
      block, part, rest = m.groups()
      if part == "attn":
        proj, leaf = rest.strip("/").split("/")
        if proj == "out" and leaf == "kernel":
          array = array.reshape((num_heads, array.shape[0] // num_heads, array.shape[1]))
        elif proj != "out":
          array = array.reshape(array.shape[:-1] + (num_heads, array.shape[-1] // num_heads))
      out[f"Transformer/encoderblock_{block}/{_VIT_BLOCK_NAMES[part][0]}{rest}"] = array
    elif name.startswith("encoder/norm/"):
      out["Transformer/encoder_norm/" + name.split("/")[-1]] = array
    elif name == "pos_embedding":
      out["Transformer/posembed_input/pos_embedding"] = array
    else:
      out[name] = array
  return out


def save_npz(path: str, model_name: str, params: Any, num_heads: int = 1) -> None:
  """Writes `params` as a `vision_transformer`-layout `.npz`.

  Args:
    path: the file to write.
    model_name, params, num_heads: as `to_npz_arrays`.
  """
  arrays: dict[str, Any] = to_npz_arrays(model_name, params, num_heads)
  np.savez(path, **arrays)
