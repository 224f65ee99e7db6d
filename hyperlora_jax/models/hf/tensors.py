"""Checkpoint tensors into a Flax params tree, shared by every family: the layout conversions,
the fit check that names every missing, misshapen or unexpected tensor, and the bicubic
resizing of position tables (transformers' `interpolate_pos_encoding`).

A family gives `load_tensors` a `source(flax_name) -> (tensor name, conversion)`; conversions:
  "linear"   a Linear's weight [out, in] -> kernel [in, out]
  "conv"     a patch conv [D, C, p, p] -> [p, p, C, D]
  "reshape"  to the param's shape when the sizes agree (a position table [T, D] -> [1, T, D])
  "same"     as stored
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Iterable

import numpy as np
from flax import traverse_util

from hyperlora_jax.models.errors import CheckpointError

# Position tables `load_tensors` resizes to the model's image size, by our param name.
POSITION_TABLES = ("pos_embedding", "image_tower/pos_embedding")


def leaf_source(hf_module: str, module: str, leaf: str, conv_modules=("embedding",)) -> tuple[str, str]:
  """(HF tensor name, conversion) of our `module`'s param `leaf`, in the module named `hf_module`
  (kernel -> weight, linear or conv; embedding -> weight; scale -> weight; bias -> bias).

  Args:
    hf_module: the Hugging Face module name.
    module: our Flax module path.
    leaf: our param name ("kernel", "bias", "scale", "embedding").
    conv_modules: our module names whose kernel is a convolution's.
  Returns:
    (tensor name, conversion).
  """
  if leaf == "kernel":
    return f"{hf_module}.weight", "conv" if module.rsplit("/", 1)[-1] in conv_modules else "linear"
  if leaf == "embedding":
    return f"{hf_module}.weight", "same"
  return f"{hf_module}.{'weight' if leaf == 'scale' else 'bias'}", "same"


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
  side_old, side_new = int(round(old**0.5)), int(round(new**0.5))
  if side_old**2 != old or side_new**2 != new:
    raise CheckpointError(
      f"position table of {len(rows)} rows -> {tokens}: the patch grids ({old} -> {new} "
      f"rows after {prefix_tokens} class rows) must be square"
    )
  resize = _bicubic_matrix(side_old, side_new)
  grid = rows[prefix_tokens:].reshape(side_old, side_old, -1)
  grid = np.einsum("ij,jkd,lk->ild", resize, grid, resize).reshape(new, -1)
  out = np.concatenate([rows[:prefix_tokens], grid])
  return out.reshape(table.shape[:-2] + out.shape).astype(table.dtype)


def convert(array: np.ndarray, conversion: str, shape: tuple) -> np.ndarray:
  """A stored tensor in our layout (`conversion` as in the module docstring; `shape`: ours).

  Args:
    array: the stored tensor.
    conversion: "linear", "conv", "reshape" or "same".
    shape: our param's shape.
  Returns:
    The array in our layout (a view where possible).
  """
  if conversion == "linear":
    return array.T
  if conversion == "conv":
    return array.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
  if conversion == "reshape" and array.size == int(np.prod(shape)):
    return array.reshape(shape)  # A position table [T, D] -> [1, T, D]; a class embedding [D] -> [1, 1, D].
  return array


def load_tensors(
  tensors: dict,
  abstract_params: Any,
  source: Callable[[str], tuple[str, str]],
  dropped_prefixes: Iterable[str],
  what: str,
  origin: dict | None,
) -> tuple[dict, list[str]]:
  """Params shaped like `abstract_params` (its `head` left out) from `tensors` by `source`.

  Args:
    tensors: {tensor name: array}, as `reading.read_tensors` gives them.
    abstract_params: the model's params tree (arrays or ShapeDtypeStructs), for names and shapes.
    source: our flat '/'-joined param name -> (tensor name, conversion).
    dropped_prefixes: tensors the model does not use, returned by name (anything else unused is
      an error).
    what: the family, as errors name it. origin: {tensor name: file}, for errors.
  Returns:
    (params, float32 NumPy; the sorted names of the tensors not loaded).
  Raises:
    CheckpointError: naming every missing, misshapen or unexpected tensor (and its file).
  """
  where = lambda key: f" ({origin[key]})" if origin and key in origin else ""
  wanted = {k: v for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items() if not k.startswith("head/")}
  out, used, problems = {}, set(), []
  for name, spec in wanted.items():
    key, conversion = source(name)
    if key not in tensors:
      problems.append(f"missing {key} (for {name})")
      continue
    array = convert(np.asarray(tensors[key]), conversion, tuple(spec.shape))
    if name in POSITION_TABLES and array.shape[-2] != spec.shape[-2] and array.shape[-1] == spec.shape[-1]:
      array = resize_position_table(array, spec.shape[-2]).reshape(spec.shape)  # Built for another image size.
    if tuple(array.shape) != tuple(spec.shape):
      problems.append(
        f"{key}{where(key)}: shape {tuple(tensors[key].shape)}, the model expects {tuple(spec.shape)} as {name}"
      )
      continue
    out[name] = np.asarray(array, np.float32)
    used.add(key)
  dropped_prefixes = tuple(dropped_prefixes)
  dropped = sorted(k for k in tensors if k not in used and any(k.startswith(p) for p in dropped_prefixes))
  unexpected = sorted(k for k in tensors if k not in used and k not in dropped)
  if unexpected:
    problems.append(
      "unexpected tensors (a different architecture?): "
      + ", ".join(f"{k}{where(k)}" for k in unexpected[:8])
      + (" ..." if len(unexpected) > 8 else "")
    )
  if problems:
    raise CheckpointError(f"the Hugging Face {what} checkpoint does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/"), dropped
