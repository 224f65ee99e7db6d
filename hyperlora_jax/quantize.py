"""Frozen weights in 8 or 4 bits, computed in the model's float dtype (QLoRA-style).

A `QuantizedWeight` replaces a frozen layer's float weight (a `kernel`) in the variables tree;
LoRA factors, the head and everything trained stay float. Layout, for a weight of shape
[d_0, d_1, ...] (a Dense kernel is [d_in, d_out]):

  blocks    `block_size` consecutive entries along axis 0 (the contracted input axis of a Dense
            kernel: the direction bitsandbytes blocks a torch weight [d_out, d_in] in) share one
            absmax scale; the last block may be short.
  scales    float32 [ceil(d_0 / block_size), d_1, ...]: each block's absmax (divided by 127 for
            int8), so the scales follow the weight's trailing axes (and its sharding).
  int8      codes int8 [d_0, d_1, ...], w ≈ code * scale (symmetric, round to nearest);
            block_size defaults to d_0: one scale per output channel (LLM.int8's vector-wise
            weight scaling, without its outlier decomposition).
  nf4       codes uint8 [ceil(d_0 / 2), d_1, ...], two 4-bit indices per byte along axis 0
            (row i the low nibble, row i + ceil(d_0 / 2) the high), w ≈ NF4_LEVELS[index] * absmax: the
            NormalFloat levels of QLoRA (Dettmers et al. 2023, appendix E), nearest level;
            block_size defaults to 64 as in QLoRA. The scales are not quantized again (QLoRA's
            double quantization saves a further 0.37 bits per weight; not done here).

Bytes held per weight: int8 1 (+ 4 / block_size), nf4 0.5 (+ 4 / block_size), against 2 in
bfloat16 and 4 in float32.

Compute: a Linen layer whose own parameters include a `QuantizedWeight` is run, wherever it is
called inside `apply` (or `lora.apply`, which uses it), as a parent-less copy of itself on its
dequantized parameters, inside `jax.checkpoint`: the dequantized weight is a temporary of that
call, recomputed in the backward pass rather than kept for it, so what a round holds of the
backbone is the codes and scales, plus the dequantized weights XLA keeps as temporaries (compiler
estimates, BENCHMARKS.md: int8 fuses into the matmul on TPU and adds none; nf4 added 0.87 GiB to a
TinyLlama round on a v5e; on an H100 each layer's weight is a temporary cuBLAS reads, below the
activations' peak). Module paths do not change, so an adapter trained on a quantized backbone is an adapter of the
float model (`peft.save_peft` writes it as for any other).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.pytree import Tree

KINDS = ("int8", "nf4")
DEFAULT_BLOCK_SIZE = {"int8": 0, "nf4": 64}  # 0: the whole axis 0 (one scale per output channel).
DEFAULT_SKIP_REGEX = r"(.*/)?(lm_head|head)/kernel"  # Output layers stay float (as bitsandbytes' default).
NF4_LEVELS = (
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
)


@flax.struct.dataclass
class QuantizedWeight:
  """A frozen weight in 8 or 4 bits (layout: module docstring). A pytree whose leaves are
  `codes` and `scales`; the rest is static.

  Attributes:
    codes: int8 [*shape] (int8) or uint8 [ceil(shape[0] / 2), *shape[1:]] (nf4).
    scales: float32 [ceil(shape[0] / block_size), *shape[1:]].
    kind: "int8" or "nf4".
    shape: the float weight's shape.
    block_size: entries along axis 0 per scale.
    dtype: the dequantized weight's dtype name (the backbone's compute dtype).
  """

  codes: Any
  scales: Any
  kind: str = flax.struct.field(pytree_node=False)
  shape: tuple = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False)
  dtype: str = flax.struct.field(pytree_node=False)


def is_quantized(node: Any) -> bool:
  """Whether `node` is a `QuantizedWeight` (for `is_leaf=` in tree maps).

  Args:
    node: any pytree node.
  Returns:
    Whether it is one.
  """
  return isinstance(node, QuantizedWeight)


def check_kind(kind: str, block_size: int = 0) -> None:
  """Raises ValueError unless `kind` is one of `KINDS` and `block_size` >= 0.

  Args:
    kind: "int8" or "nf4".
    block_size: entries per scale (0: the kind's default).
  """
  if kind not in KINDS:
    raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")
  if not isinstance(block_size, int) or block_size < 0:
    raise ValueError(f"quantization block_size must be an integer >= 0 (0: the default), got {block_size!r}")


def _block_size(kind: str, block_size: int, rows: int) -> int:
  size = block_size or DEFAULT_BLOCK_SIZE[kind] or rows
  return min(size, rows)


def _blocks(x: jax.Array, block: int, blocks: int) -> jax.Array:
  """[rows, ...] -> [blocks, block, ...], the last block padded with zeros."""
  padded = jnp.pad(x, [(0, blocks * block - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return padded.reshape((blocks, block) + x.shape[1:])


def _block_absmax(w: jax.Array, block: int) -> jax.Array:
  """[d_0, ...] float32 -> [ceil(d_0 / block), ...]: each block's largest |w|."""
  return jnp.max(_blocks(jnp.abs(w), block, -(-w.shape[0] // block)), axis=1)


def _scaled(values: jax.Array, scales: jax.Array, block: int) -> jax.Array:
  """values [rows, ...] times each row's block scale (scales [ceil(rows / block), ...]).

  By a reshape to [blocks, block, ...] and a broadcast, not `jnp.repeat` (a gather of the scales
  per row, which XLA does not fuse into the matmul: on TPU it kept a float32 [rows, ...] per
  layer)."""
  rows, blocks = values.shape[0], scales.shape[0]
  scaled = _blocks(values, block, blocks) * scales[:, None]
  return scaled.reshape((blocks * block,) + values.shape[1:])[:rows]


def _pack_nibbles(indices: jax.Array) -> jax.Array:
  """uint8 [d_0, ...] of values < 16 -> uint8 [ceil(d_0 / 2), ...]: row i holds row i in its low
  nibble and row i + ceil(d_0 / 2) in its high one."""
  half = -(-indices.shape[0] // 2)
  high = jnp.pad(indices[half:], [(0, 2 * half - indices.shape[0])] + [(0, 0)] * (indices.ndim - 1))
  return indices[:half] | (high << 4)


def _unpack_nibbles(codes: jax.Array, rows: int) -> jax.Array:
  """`_pack_nibbles`'s inverse: uint8 [ceil(rows / 2), ...] -> uint8 [rows, ...]. The halves are
  concatenated, not interleaved: an interleave needs a relayout on TPU that stops XLA fusing the
  dequantization into the matmul (it then held every layer's float weight at once)."""
  return jnp.concatenate([codes & 0xF, codes >> 4], axis=0)[:rows]


def _nf4_values(indices: jax.Array) -> jax.Array:
  """uint8 indices < 16 -> float32 `NF4_LEVELS[indices]`, by a tree of selects on the index's
  bits: elementwise, so XLA may fuse it into the matmul that reads the weight (a gather from the
  16-entry table it did not fuse on TPU, and kept every layer's dequantized weight)."""
  values = [jnp.float32(level) for level in NF4_LEVELS]
  for bit in range(4):
    chosen = ((indices >> bit) & 1).astype(bool)
    values = [jnp.where(chosen, high, low) for low, high in zip(values[0::2], values[1::2])]
  return values[0]


def quantize(weight: jax.Array, kind: str, block_size: int = 0, dtype: Any = None) -> QuantizedWeight:
  """A float weight in 8 or 4 bits.

  Args:
    weight: [d_0, d_1, ...] float (ndim >= 1).
    kind: "int8" or "nf4".
    block_size: entries along axis 0 per scale; 0: the kind's default (int8: all of d_0;
      nf4: 64). Capped at d_0.
    dtype: the dtype `dequantize` returns (None: `weight`'s).
  Returns:
    A `QuantizedWeight` (layout: module docstring).
  Raises:
    ValueError: an unknown kind, a negative block size, a scalar weight.
  """
  check_kind(kind, block_size)
  if np.ndim(weight) < 1:
    raise ValueError("quantize takes a weight of at least one axis, got a scalar")
  rows = weight.shape[0]
  block = _block_size(kind, block_size, rows)
  w = jnp.asarray(weight, jnp.float32)
  absmax = _block_absmax(w, block)
  normalized = _scaled(w, 1.0 / jnp.where(absmax > 0, absmax, 1.0), block)  # In [-1, 1].
  if kind == "int8":
    codes = jnp.clip(jnp.round(normalized * 127.0), -127, 127).astype(jnp.int8)
    scales = absmax / 127.0
  else:
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2  # Nearest level: the count of midpoints below.
    indices = jnp.searchsorted(midpoints, normalized, side="left").astype(jnp.uint8)
    codes, scales = _pack_nibbles(indices), absmax
  name = jnp.dtype(dtype if dtype is not None else weight.dtype).name
  return QuantizedWeight(codes, scales.astype(jnp.float32), kind, tuple(weight.shape), block, name)


def dequantize(weight: QuantizedWeight) -> jax.Array:
  """The float weight a `QuantizedWeight` stands for.

  Args:
    weight: a `QuantizedWeight` of shape [d_0, ...].
  Returns:
    [d_0, ...] in `weight.dtype`.
  """
  rows = weight.shape[0]
  if weight.kind == "int8":
    values = weight.codes.astype(jnp.float32)
  else:
    values = _nf4_values(_unpack_nibbles(weight.codes, rows))
  return _scaled(values, weight.scales, weight.block_size).astype(weight.dtype)


def _path_name(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def quantize_tree(
  tree: Tree,
  kind: str,
  block_size: int = 0,
  skip_regex: str = DEFAULT_SKIP_REGEX,
) -> Tree:
  """Every `kernel` of two or more axes in `tree` quantized (`quantize`, in the kernel's dtype),
  but those whose '/'-joined path fullmatches `skip_regex`; embeddings, norms and biases stay
  as they are. Works on `jax.ShapeDtypeStruct` trees under `jax.eval_shape`.

  Args:
    tree: a backbone's variables ({"params": ...}) or any pytree of them.
    kind: "int8" or "nf4".
    block_size: as `quantize` (0: the kind's default).
    skip_regex: paths kept float (default: an `lm_head` or `head` kernel).
  Returns:
    `tree` with `QuantizedWeight`s in place of the chosen kernels.
  Raises:
    ValueError: an unknown kind or a negative block size.
  """
  check_kind(kind, block_size)
  skip = re.compile(skip_regex)

  def one(path, leaf):
    name = _path_name(path)
    if name.split("/")[-1] != "kernel" or np.ndim(leaf) < 2 or skip.fullmatch(name):
      return leaf
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return quantize(leaf, kind, block_size)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_quantized)


def dequantize_tree(tree: Tree) -> Tree:
  """`tree` with every `QuantizedWeight` replaced by its float weight (`dequantize`).

  Args:
    tree: any pytree.
  Returns:
    The same structure, float weights in place of quantized ones.
  """
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def quantized_layers(tree: Tree) -> dict[str, QuantizedWeight]:
  """{path: QuantizedWeight} of every quantized weight in `tree` ('/'-joined key paths).

  Args:
    tree: any pytree.
  Returns:
    The quantized weights by path, in tree order.
  """
  found: dict[str, QuantizedWeight] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
    if is_quantized(leaf):
      found[_path_name(path)] = leaf
  return found


def _own_params(module: nn.Module) -> dict:
  if module.scope is None:
    return {}
  return dict(module.variables.get("params", {}))


def _run_dequantized(next_fun, args, kwargs, context):
  """Interceptor: a layer holding a `QuantizedWeight` runs on its dequantized parameters."""
  module = context.module
  params = _own_params(module)
  if not any(is_quantized(v) for v in params.values()):
    return next_fun(*args, **kwargs)
  others = {name: value for name, value in module.variables.items() if name != "params"}
  layer = module.clone(parent=None)

  def call(params, *arrays):
    variables = {**others, "params": dequantize_tree(params)}
    return layer.apply(variables, *arrays, method=context.method_name, **kwargs)

  return jax.checkpoint(call)(params, *args)


@contextlib.contextmanager
def dequantizing() -> Iterator[None]:
  """Within it, every Linen layer call whose own parameters include a `QuantizedWeight` runs on
  its dequantized parameters (`flax.linen.intercept_methods`); other calls are untouched.
  `apply` and `lora.apply` enter it for you."""
  with nn.intercept_methods(_run_dequantized):
    yield


def apply(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
  """`model.apply(variables, *args, **kwargs)` for variables that may hold `QuantizedWeight`s.

  Args:
    model: a Linen model.
    variables: its variables ({"params": ...}), some kernels quantized (`quantize_tree`).
    args, kwargs: as `model.apply`'s.
  Returns:
    What `model.apply` returns.
  """
  with dequantizing():
    return model.apply(variables, *args, **kwargs)


def tree_bytes(tree: Tree) -> int:
  """Bytes held by the arrays of `tree` (a quantized weight: its codes and scales).

  Args:
    tree: any pytree of arrays or `jax.ShapeDtypeStruct`s.
  Returns:
    The sum of size x itemsize over the leaves.
  """
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
