"""LoRA on any Flax Linen model: attach by regex on module paths, apply factored.

Layout. A Flax `nn.Dense` kernel is `[d_in, d_out]` and computes `y = x @ W`. The LoRA
factors are stored in the same orientation:
  a: [d_in, r]   (= A^T of the paper / HF-peft `lora_A.weight` [r, d_in])
  b: [r, d_out]  (= B^T of the paper / HF-peft `lora_B.weight` [d_out, r])
so `y = x @ W + s * (x @ a) @ b`, the kernel-layout update is `ΔW = s * a @ b` [d_in, d_out],
and the paper's `B A` [d_out, d_in] is its transpose. Aggregators work on `a @ b`.

Supported layers (`SUPPORTED_LAYERS`), each with its factor layout. ΔW is always
`s * a @ b` reshaped (row-major) to the layer's parameter shape:
  nn.Dense         kernel [d_in, d_out]              a [d_in, r], b [r, d_out]; factored.
  nn.DenseGeneral  kernel [*in_axes, *features]      a [prod(in_axes), r], b [r, prod(features)];
                   factored (the contracted input axes are flattened in the order of `axis`),
                   so `nn.MultiHeadDotProductAttention`'s query/key/value ([d, heads, head_dim])
                   and out ([heads, head_dim, d]) take LoRA.
  nn.Conv          kernel [*window, c_in, c_out]     a [prod(window) c_in, r], b [r, c_out];
                   factored as PEFT does: a rank-r convolution with the layer's window,
                   strides and padding, then a 1x1 map b.
  nn.Embed         embedding [vocab, d]              a [vocab, r], b [r, d]; y += s a[ids] b, and
                   its `attend(q)` (a tied LM head, q @ embeddingᵀ) gets y += s (q bᵀ) aᵀ, so
                   `apply` and `merge` (E + s a b) agree for tied embeddings too.
  nn.Einsum        kernel [d_0, d_1, ...]            a [d_0, r], b [r, prod(d_1, ...)];
                   applied as einsum(x, s a b) with the layer's own equation (one kernel-sized
                   ΔW per call: no factored form exists for an arbitrary equation).

LoRA parameters are a separate pytree, `{module_path: {"a": ..., "b": ...}}`, never merged
into the frozen backbone during training: `apply` intercepts the targeted layer calls
(`flax.linen.intercept_methods`) and adds the update, so the backbone enters a vmapped client
function unbatched and is never copied per client.

Flax NNX models (`find_targets_nnx`, `apply_nnx`): `nnx.Linear`, `nnx.LinearGeneral` (so
`nnx.MultiHeadAttention`), `nnx.Conv`, `nnx.Einsum` and `nnx.Embed` with the same layouts as their
Linen counterparts: a merged copy of the model has each targeted layer wrapped to add its LoRA
update to its output (factored, `s (x @ a) @ b`, for all but Einsum) (NNX has no method interception; qwix's LoRA, the alternative,
adds the factors to the model's own parameters, while the round needs them as a separate
pytree it can vmap, aggregate and send).

A target regex that matches a layer of another type (one holding parameters itself, e.g.
`nn.LayerNorm`, `nn.ConvTranspose`) is refused, naming it, rather than skipped.

A *LoRA layer* is any dict with exactly the keys {"a", "b"}; the helpers below (`layers`,
`map_layers`, `truncate`) find them anywhere in a larger pytree (e.g. `{"lora": ..., "head": ...}`).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, cast
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import quantize
from hyperlora_jax.primitives import weighted_mean

LoraParams = dict  # {path: {"a": [d_in, r], "b": [r, d_out]}}
DEFAULT_TARGET_REGEX = r".*attn/(query|value)"
SUPPORTED_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.Einsum)


def module_path(module: nn.Module) -> str:
  """'encoder/block_0/attn/query' for a bound Linen module.

  Args:
    module: a Linen module bound to its variables (inside `apply` or an interceptor).
  Returns:
    Its path from the root, '/'-joined.
  """
  return "/".join(module.path)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
  """s = alpha / r (rsLoRA: alpha / sqrt(r)). Raises ValueError for a rank below 1.

  Args:
    alpha: LoRA's alpha.
    rank: r, an integer >= 1.
    rslora: rank-stabilized scaling.
  Returns:
    The scale s that multiplies a @ b.
  """
  check_rank(rank)
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(rank: Any, what: str = "LoRA rank") -> None:
  """Raises ValueError unless `rank` is an integer >= 1 (a rank-0 adapter adapts nothing).

  Args:
    rank: the value to check.
    what: how the error names it.
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"{what} must be an integer >= 1, got {rank!r} (a rank-0 adapter would change nothing)")


_INSIDE_LORA = threading.local()  # Set while a LoRA update runs its own Flax layer (Conv's down map).


def _is_target_call(context) -> bool:
  return (
    isinstance(context.module, SUPPORTED_LAYERS)
    and context.method_name == "__call__"
    and not getattr(_INSIDE_LORA, "active", False)
  )


def _is_tied_head_call(context) -> bool:
  """An `nn.Embed`'s `attend` (its table reused as an output layer, e.g. a tied LM head)."""
  return isinstance(context.module, nn.Embed) and context.method_name == "attend"


def _owns_params(module: nn.Module) -> bool:
  """Whether a bound Linen module holds parameter arrays itself (a layer, not a container)."""
  params = module.variables.get("params", {})
  return any(not isinstance(value, Mapping) for value in params.values())


def _as_tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _contracted_axes(module: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
  if getattr(module, "batch_dims", ()):
    raise ValueError(f"LoRA on nn.DenseGeneral with batch_dims is not supported ({module_path(module)})")
  return tuple(a % ndim for a in _as_tuple(module.axis))


def _flatten_contracted(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """x with the contracted `axes` moved last (in that order) and flattened: [..., prod(axes)]."""
  kept = [i for i in range(x.ndim) if i not in axes]
  return jnp.transpose(x, kept + list(axes)).reshape([x.shape[i] for i in kept] + [-1])


def _param_shape(module: nn.Module, x: jax.Array) -> tuple[int, ...]:
  """Shape of the layer's weight (kernel or embedding table) for input `x`."""
  if isinstance(module, nn.Dense):
    return (x.shape[-1], module.features)
  if isinstance(module, nn.DenseGeneral):
    return tuple(x.shape[a] for a in _contracted_axes(module, x.ndim)) + _as_tuple(module.features)
  if isinstance(module, nn.Conv):
    window = _as_tuple(module.kernel_size)
    return window + (x.shape[-1] // module.feature_group_count, module.features)
  if isinstance(module, nn.Embed):
    return (module.num_embeddings, module.features)
  return tuple(module.shape)  # nn.Einsum


def matrix_shape(module: nn.Module, param_shape: tuple[int, ...]) -> tuple[int, int]:
  """(d_in, d_out) of the layer's weight seen as a matrix (see the module docstring).

  Args:
    module: a supported layer (`SUPPORTED_LAYERS`).
    param_shape: the shape of its weight (`kernel`, or an `nn.Embed`'s `embedding`).
  Returns:
    (d_in, d_out): a is [d_in, r], b [r, d_out].
  """
  if isinstance(module, nn.DenseGeneral):
    d_out = int(np.prod(_as_tuple(module.features)))
    return int(np.prod(param_shape)) // d_out, d_out
  if isinstance(module, nn.Conv):
    return int(np.prod(param_shape[:-1])), param_shape[-1]
  return param_shape[0], int(np.prod(param_shape[1:]))


def _lora_delta_output(
  module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array, out: jax.Array, scale: float
) -> jax.Array:
  """The layer's LoRA contribution for input `x` (shape and dtype of `out`)."""
  if isinstance(module, nn.Dense):
    return scale * ((x @ a) @ b).astype(out.dtype)
  if isinstance(module, nn.DenseGeneral):
    flat = _flatten_contracted(x, _contracted_axes(module, x.ndim))
    return (scale * ((flat @ a) @ b)).reshape(out.shape).astype(out.dtype)
  if isinstance(module, nn.Conv):
    window = _param_shape(module, x)[:-1]
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, feature_group_count=1)
    _INSIDE_LORA.active = True
    try:
      hidden = cast(jax.Array, down.apply({"params": {"kernel": a.reshape(window + (a.shape[-1],))}}, x))
    finally:
      _INSIDE_LORA.active = False
    return scale * (hidden @ b).astype(out.dtype)
  if isinstance(module, nn.Embed):
    return scale * (jnp.take(a, x, axis=0) @ b).astype(out.dtype)
  delta = (scale * (a @ b)).reshape(module.shape)  # nn.Einsum
  return jnp.einsum(module.einsum_str, x, delta).astype(out.dtype)


def check_factor_shapes(path: str, shape: tuple[int, int], factors: Mapping[str, Any]) -> None:
  """Raises ValueError, naming the layer, unless a [d_in, r] and b [r, d_out] fit the layer's
  matrix `shape` (d_in, d_out) (an adapter of another model would fail deep inside a matmul).

  Args:
    path: the layer's module path, for the error.
    shape: the layer's (d_in, d_out) (`matrix_shape`).
    factors: {"a", "b"}.
  """
  a, b = np.shape(factors["a"]), np.shape(factors["b"])
  d_in, d_out = shape
  if len(a) != 2 or len(b) != 2 or a[0] != d_in or b[1] != d_out or a[1] != b[0]:
    raise ValueError(
      f"LoRA layer {path!r}: factors a {list(a)} and b {list(b)} do not fit the layer's "
      f"[d_in, d_out] = [{d_in}, {d_out}] (a [d_in, r], b [r, d_out]): an adapter of another model?"
    )


def _base_delta_output(module: nn.Module, x: jax.Array, delta: jax.Array, out: jax.Array) -> jax.Array:
  """The output of a full-rank increment `delta` [d_in, d_out] of the layer's weight."""
  if isinstance(module, nn.Dense):
    return (x @ delta).astype(out.dtype)
  eye = jnp.eye(delta.shape[1], dtype=delta.dtype)
  return _lora_delta_output(module, x, delta, eye, out, 1.0)


def find_targets(
  model: nn.Module, params: Any, *example_args, target_regex: str = DEFAULT_TARGET_REGEX, **example_kwargs
) -> dict[str, tuple[int, int]]:
  """Targeted layers (`SUPPORTED_LAYERS`) and their matrix shapes, found by tracing one call.

  Args:
    model, params: the Flax model and its variables.
    example_args/kwargs: an example call (only shapes matter; nothing is computed).
    target_regex: `re.fullmatch`ed against each supported layer's module path.
  Returns:
    {path: (d_in, d_out)} in call order (the layout of each layer type: module docstring).
  Returns:
    {module path: (d_in, d_out)} of every supported layer whose path fullmatches
    `target_regex` (`matrix_shape`).
  Raises:
    ValueError: if nothing matches.
  """
  pattern = re.compile(target_regex)
  found: dict[str, tuple[int, int]] = {}
  unsupported: dict[str, str] = {}

  def record(next_fun, args, kwargs, context):
    path = module_path(context.module)
    if _is_target_call(context):
      if pattern.fullmatch(path):
        found[path] = matrix_shape(context.module, _param_shape(context.module, args[0]))
    elif (
      context.method_name == "__call__"
      and not isinstance(context.module, SUPPORTED_LAYERS)
      and path
      and pattern.fullmatch(path)
      and _owns_params(context.module)
    ):
      unsupported[path] = type(context.module).__name__
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record), quantize.dequantizing():
    jax.eval_shape(lambda p: model.apply(p, *example_args, **example_kwargs), params)
  kinds = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)
  if unsupported:
    raise ValueError(
      f"lora.target_regex={target_regex!r} matches layer(s) LoRA does not support: "
      f"{', '.join(f'{p!r} (nn.{k})' for p, k in unsupported.items())}; supported: {kinds}. "
      f"Narrow the regex to the layers to adapt"
    )
  if not found:
    raise ValueError(f"lora.target_regex={target_regex!r} matches no {kinds} layer of {type(model).__name__}")
  return found


def init_lora(rng: jax.Array, targets: Mapping[str, tuple[int, int]], rank: int, dtype=jnp.float32) -> LoraParams:
  """a ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (HF-peft's Kaiming init), b = 0, so ΔW = 0 at start.

  Returns:
    {path: {"a": [d_in, rank], "b": [rank, d_out]}}.
  Raises:
    ValueError: a rank below 1.
  """
  check_rank(rank)
  lora = {}
  for key, (path, (d_in, d_out)) in zip(jax.random.split(rng, len(targets)), targets.items()):
    bound = 1.0 / math.sqrt(d_in)
    lora[path] = {
      "a": jax.random.uniform(key, (d_in, rank), dtype, -bound, bound),
      "b": jnp.zeros((rank, d_out), dtype),
    }
  return lora


def product(factors: Mapping[str, jax.Array]) -> jax.Array:
  """a @ b: [..., d_in, r] x [..., r, d_out] -> [..., d_in, d_out] (kernel layout, unscaled).

  Args:
    factors: {"a": [..., d_in, r], "b": [..., r, d_out]}.
  Returns:
    [..., d_in, d_out].
  """
  return factors["a"] @ factors["b"]


def apply(
  model: nn.Module,
  params: Any,
  lora: LoraParams,
  *args,
  scale: float,
  base_delta: Mapping[str, jax.Array] | None = None,
  method: Any = None,
  **kwargs,
):
  """`model.apply(params, *args, **kwargs)` with the LoRA update added on targeted layers.

  Args:
    lora: {path: {"a": [d_in, r], "b": [r, d_out]}} (layouts: module docstring).
    scale: s = alpha / r.
    base_delta: optional {path: [d_in, d_out]} full-rank server residuals added to the frozen
      weights (FedEx-LoRA, FLoRA): y += x @ delta.
    method: passed to `model.apply` (e.g. `"encode"`).
  Returns:
    What `model.apply` returns, with every targeted layer's output y = base(x) + s (x @ a) @ b.
  """
  base_delta = base_delta or {}
  unknown = set(lora) | set(base_delta)  # Paths not yet seen among the layer calls.

  def add_lora(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    if _is_tied_head_call(context):
      return out + _tied_head_output(module_path(context.module), call_args[0], out)
    if not _is_target_call(context):
      return out
    module = context.module
    path = module_path(module)
    x = call_args[0]
    if path in lora:
      unknown.discard(path)
      check_factor_shapes(path, matrix_shape(module, _param_shape(module, x)), lora[path])
      out = out + _lora_delta_output(module, x, lora[path]["a"], lora[path]["b"], out, scale)
    if path in base_delta:
      unknown.discard(path)
      out = out + _base_delta_output(module, x, base_delta[path], out)
    return out

  def _tied_head_output(path, query, out):
    """attend(q) = q @ Eᵀ of an adapted table E + s a b (+ delta): s (q bᵀ) aᵀ (+ q deltaᵀ)."""
    extra = jnp.zeros_like(out)
    if path in lora:
      a, b = lora[path]["a"], lora[path]["b"]
      extra = extra + scale * ((query @ b.T) @ a.T).astype(out.dtype)
    if path in base_delta:
      extra = extra + (query @ base_delta[path].T).astype(out.dtype)
    return extra

  with nn.intercept_methods(add_lora), quantize.dequantizing():  # add_lora's next_fun dequantizes.
    result = model.apply(params, *args, method=method, **kwargs)
  if unknown:
    raise ValueError(f"LoRA paths not found among the model's layer calls: {sorted(unknown)}")
  return result


def merge(params: Any, lora: LoraParams, scale: float) -> Any:
  """Backbone variables with W <- W + s a@b merged into each targeted layer's weight (the
  `kernel`, or an `nn.Embed`'s `embedding`), reshaped to its shape: for export and tests. A
  quantized weight (`quantize.QuantizedWeight`) is dequantized and merged in its float dtype.
  A `FrozenDict` gives a `FrozenDict`.

  Args:
    params: the backbone's variables ({"params": ...}), or a FrozenDict of them.
    lora: {path: {"a": [d_in, r], "b": [r, d_out]}}.
    scale: s.
  Returns:
    A copy of `params` with the merged weights; `params` itself is not modified.
  """
  frozen = isinstance(params, flax.core.FrozenDict)
  merged = flax.core.unfreeze(params) if frozen else jax.tree.map(lambda x: x, params)  # A structural copy.
  for path, factors in lora.items():
    node = merged["params"]
    for name in path.split("/"):
      node = node[name]
    key = "kernel" if "kernel" in node else "embedding"
    weight = quantize.dequantize(node[key]) if quantize.is_quantized(node[key]) else node[key]
    node[key] = weight + (scale * product(factors)).reshape(weight.shape)
  return flax.core.freeze(merged) if frozen else merged


# ---------------------------------------------------------------- LoRA layers inside any pytree


def is_layer(node: Any) -> bool:
  """A LoRA layer: a dict with exactly the keys {"a", "b"}.

  Args:
    node: any pytree node.
  Returns:
    Whether it is a LoRA layer.
  """
  return isinstance(node, Mapping) and set(node) == {"a", "b"}


def layers(tree: Any) -> dict[str, dict]:
  """{layer name: {"a", "b"}} for every LoRA layer in a nested-dict `tree` (the name is the
  layer's own key, e.g. its module path; leading clients axes are kept).

  Args:
    tree: nested dicts holding LoRA layers (a trainable tree, or its [C, ...] clients version).
  Returns:
    {layer name: {"a": [..., d_in, r], "b": [..., r, d_out]}}, in the tree's order.
  """
  found = {}

  def visit(node):
    for key, child in node.items():
      if is_layer(child):
        if key in found:
          raise ValueError(f"two LoRA layers are named {key!r} in the tree")
        found[key] = child
      elif isinstance(child, Mapping):
        visit(child)

  if is_layer(tree):
    raise ValueError("`layers` needs a tree of layers ({name: {'a', 'b'}}), got one layer")
  visit(tree)
  return found


def map_layers(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """`tree` with every LoRA layer replaced by `fn(layer, *matching nodes of rest)`; other
  leaves are left as they are (`rest` must have `tree`'s structure down to the layers).

  Args:
    fn: (layer, *matching nodes of `rest`) -> the new layer (any pytree).
    tree: nested dicts holding LoRA layers.
    rest: trees of `tree`'s structure down to its layers.
  Returns:
    `tree` with each layer replaced.
  """
  return jax.tree.map(
    lambda node, *others: fn(node, *others) if is_layer(node) else node, tree, *rest, is_leaf=is_layer
  )


def add_to_layers(tree: Any, offsets: Mapping[str, dict]) -> Any:
  """`tree` with `offsets[name]` ({"a", "b"}) added to each LoRA layer named in `offsets`.

  Args:
    tree: nested dicts holding LoRA layers (not modified).
    offsets: {layer name: {"a", "b"}} shaped like the named layers' factors.
  Returns:
    A copy of `tree` with the offsets added.
  """

  def add(node):
    for key, child in node.items():
      if is_layer(child) and key in offsets:
        node[key] = jax.tree.map(jnp.add, child, offsets[key])
      elif isinstance(child, Mapping) and not is_layer(child):
        node[key] = add(dict(child))
    return node

  return add(dict(tree))


def rank_of(tree: Any) -> int:
  """The LoRA rank r (r_max with heterogeneous ranks) of the first layer of `tree`.

  Args:
    tree: nested dicts holding LoRA layers.
  Returns:
    r: the last axis of the first layer's a.
  """
  return next(iter(layers(tree).values()))["a"].shape[-1]


def rank_masks(client_ranks: Any, num_clients: int, max_rank: int) -> jax.Array:
  """[num_clients, r_max] float {0, 1}: 1 for the components a client's rank r_k has
  (`client_ranks` [num_clients]; None: every client at r_max).

  Args:
    client_ranks: [num_clients] ints in [1, max_rank], or None.
    num_clients: N.
    max_rank: r_max.
  Returns:
    [num_clients, max_rank] float32.
  """
  ranks = np.full(num_clients, max_rank) if client_ranks is None else np.asarray(client_ranks)
  return jnp.asarray(np.arange(max_rank)[None, :] < ranks[:, None], jnp.float32)


def truncate(tree: Any, rank_mask: jax.Array) -> Any:
  """Zeroes the factor components a client of a lower rank does not have, in every LoRA
  layer of `tree`: a [..., d_in, r] * mask[..., None, :], b [..., r, d_out] * mask[..., :, None].

  Args:
    tree: nested dicts holding LoRA layers, factors [..., d_in, r] and [..., r, d_out].
    rank_mask: [..., r] in {0, 1} (leading axes broadcast with the factors').
  Returns:
    `tree` with the components past each client's rank zeroed.
  """
  return map_layers(lambda f: {"a": f["a"] * rank_mask[..., None, :], "b": f["b"] * rank_mask[..., :, None]}, tree)


def stacked_products(layer: Mapping[str, jax.Array], weights: jax.Array) -> dict:
  """One LoRA layer of rank C·r whose product is the weighted mean of C clients' products.

  layer: {"a": [C, d_in, r], "b": [C, r, d_out]}; weights: [C]. Returns {"a": [d_in, C·r],
  "b": [C·r, d_out]} with a @ b = Σ_k weights[k] a_k @ b_k exactly (the factors of every client
  side by side, each b_k scaled by its weight). LoRA's forward pass, (x @ a) @ b, takes any rank.
  Returns:
    {"a": [d_in, C·r], "b": [C·r, d_out]}.
  """
  a, b = layer["a"], layer["b"]
  clients, d_in, rank = a.shape
  return {
    "a": jnp.moveaxis(a, 0, 1).reshape(d_in, clients * rank),
    "b": (weights[:, None, None] * b).reshape(clients * rank, b.shape[-1]),
  }


def product_mean(stacked: Any, weights: jax.Array) -> Any:
  """The weighted mean of C models in product space: every LoRA layer by `stacked_products`
  (rank C·r), every other leaf by its weighted mean (a leaf is linear in itself). The mean leaf
  by leaf, factors included, is `primitives.weighted_mean` (FedAvg of A and B, whose product
  Σp_kB_k Σp_kA_k is biased against this one's).

  stacked: a trainable tree with a leading [C] axis on every leaf; weights: [C] (sum 1).

  Args:
    stacked: a trainable tree with a leading [C] axis on every leaf.
    weights: [C], summing to 1.
  Returns:
    The tree without the [C] axis, each LoRA layer of rank C·r.
  """
  return jax.tree.map(
    lambda node: stacked_products(node, weights) if is_layer(node) else weighted_mean(node, weights),
    stacked,
    is_leaf=is_layer,
  )


def zero_deltas(tree: Any) -> Any:
  """`tree` with every LoRA layer replaced by zeros [d_in, d_out] and other leaves dropped:
  the shape of a full-rank base delta for the layers (FedEx-LoRA, FLoRA).

  Args:
    tree: nested dicts holding LoRA layers (no leading axes).
  Returns:
    {layer name: float32 zeros [d_in, d_out]}.
  """
  return {name: jnp.zeros((f["a"].shape[-2], f["b"].shape[-1]), jnp.float32) for name, f in layers(tree).items()}


# ---------------------------------------------------------------- Flax NNX models


def _nnx():
  from flax import nnx  # Imported on use: Linen users never need it.

  return nnx


def _nnx_path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _nnx_kinds():
  nnx = _nnx()
  return (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum, nnx.Embed)


def _nnx_kind_names() -> str:
  return ", ".join(f"nnx.{k.__name__}" for k in _nnx_kinds())


def _nnx_owns_params(module: Any) -> bool:
  """Whether an NNX module holds `nnx.Param`s as its own attributes (a layer, not a container)."""
  nnx = _nnx()
  return any(isinstance(value, nnx.Param) for value in vars(module).values())


def _nnx_matrix_shape(module: Any) -> tuple[int, int]:
  nnx = _nnx()
  if isinstance(module, nnx.Embed):
    return tuple(module.embedding[...].shape)
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1 or module.mask is not None:
      raise ValueError("LoRA on nnx.Conv with feature_group_count > 1 or a mask is not supported")
    kernel = module.kernel[...].shape  # [*window, c_in, c_out]
    return int(np.prod(kernel[:-1])), kernel[-1]
  if isinstance(module, nnx.Einsum):
    kernel = module.kernel[...].shape
    return kernel[0], int(np.prod(kernel[1:]))
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise ValueError("LoRA on nnx.LinearGeneral with batch_axis is not supported")
    return int(np.prod(module.in_features)), int(np.prod(module.out_features))
  return tuple(module.kernel[...].shape)


def find_targets_nnx(model: Any, target_regex: str = DEFAULT_TARGET_REGEX) -> dict[str, tuple[int, int]]:
  """Targeted `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Einsum` and `nnx.Embed` layers.

  Layouts as for Linen: `nnx.Linear` kernel [d_in, d_out] (a [d_in, r], b [r, d_out]);
  `nnx.LinearGeneral` (so `nnx.MultiHeadAttention`) as `nn.DenseGeneral`, contracted input
  axes and output features flattened; `nnx.Conv` kernel [*window, c_in, c_out] (a
  [prod(window) c_in, r], b [r, c_out]; a rank-r convolution then a 1x1 map); `nnx.Einsum`
  kernel [d_0, d_1, ...] (a [d_0, r], b [r, prod(d_1, ...)]); `nnx.Embed` embedding
  [vocab, d] (a [vocab, r], b [r, d]).
  Returns:
    {path: (d_in, d_out)}, the path '/'-joining attribute names and list indices
    (e.g. 'blocks/1/query').

  Args:
    model: an NNX model.
    target_regex: fullmatched against each layer's '/'-joined path.
  Raises:
    ValueError: nothing matches, or a matched layer holding parameters is of another type.
  """
  nnx = _nnx()
  pattern = re.compile(target_regex)
  matched = [
    (_nnx_path(path), module) for path, module in nnx.iter_modules(model) if path and pattern.fullmatch(_nnx_path(path))
  ]
  unsupported = {
    path: type(module).__name__
    for path, module in matched
    if not isinstance(module, _nnx_kinds()) and _nnx_owns_params(module)
  }
  if unsupported:
    raise ValueError(
      f"lora.target_regex={target_regex!r} matches layer(s) LoRA does not support: "
      f"{', '.join(f'{p!r} ({k})' for p, k in unsupported.items())}; supported: "
      f"{_nnx_kind_names()}. Narrow the regex to the layers to adapt"
    )
  found = {path: _nnx_matrix_shape(module) for path, module in matched if isinstance(module, _nnx_kinds())}
  if not found:
    raise ValueError(
      f"lora.target_regex={target_regex!r} matches no {_nnx_kind_names()} layer of {type(model).__name__}"
    )
  return dict(sorted(found.items()))


def _nnx_lora_layer(base: Any, a: jax.Array, b: jax.Array, scale: float) -> Any:
  """`base` (an nnx.Linear, LinearGeneral, Conv, Einsum or Embed) with its LoRA update added to
  its output (factored, but for Einsum: one kernel-sized ΔW, as for `nn.Einsum`)."""
  nnx = _nnx()

  class LoraLayer(nnx.Module):  # type: ignore[name-defined]  # nnx is imported on use.
    def __init__(self):
      self.base, self.a, self.b = base, a, b

    def __call__(self, x, *args, **kwargs):
      out = self.base(x, *args, **kwargs)
      if isinstance(self.base, nnx.Conv):
        window = tuple(self.base.kernel_size)
        down = nnx.Conv(
          self.base.in_features,
          self.a.shape[-1],
          window,
          self.base.strides,
          padding=self.base.padding,
          input_dilation=self.base.input_dilation,
          kernel_dilation=self.base.kernel_dilation,
          use_bias=False,
          kernel_init=nnx.initializers.zeros,
          rngs=nnx.Rngs(0),
        )
        down.kernel = nnx.Param(self.a.reshape(window + (self.base.in_features, self.a.shape[-1])))
        return out + scale * (down(x) @ self.b).astype(out.dtype)
      if isinstance(self.base, nnx.Einsum):
        equation = kwargs.get("einsum_str") or (args[0] if args else None) or self.base.einsum_str
        delta = (scale * (self.a @ self.b)).reshape(self.base.kernel[...].shape)
        return out + jnp.einsum(equation.replace(" ", ""), x, delta).astype(out.dtype)
      if isinstance(self.base, nnx.Embed):
        return out + scale * (jnp.take(self.a, x, axis=0) @ self.b).astype(out.dtype)
      if isinstance(self.base, nnx.LinearGeneral):
        flat = _flatten_contracted(x, tuple(a % x.ndim for a in _as_tuple(self.base.axis)))
        return out + (scale * ((flat @ self.a) @ self.b)).reshape(out.shape).astype(out.dtype)
      return out + scale * ((x @ self.a) @ self.b).astype(out.dtype)

    def attend(self, query, *args, **kwargs):
      """An adapted `nnx.Embed`'s tied head: q @ (E + s a b)ᵀ = base.attend(q) + s (q bᵀ) aᵀ."""
      if not isinstance(self.base, nnx.Embed):
        raise AttributeError(f"{type(self.base).__name__} has no attend (only nnx.Embed does)")
      out = self.base.attend(query, *args, **kwargs)
      return out + scale * ((query @ self.b.T) @ self.a.T).astype(out.dtype)

  return LoraLayer()


def _nnx_child(node: Any, parts: list) -> Any:
  """The node at `parts` (attribute names and list indices) below `node`, or None."""
  for part in parts:
    try:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      return None
  return node


def apply_nnx(
  graphdef: Any, state: Any, lora: LoraParams, *args, scale: float, rngs: jax.Array | None = None, **kwargs
):
  """Calls the NNX model `nnx.merge(graphdef, state)` with LoRA on the layers in `lora`.

  Pure and factored like `apply`: a merged copy of the model has each targeted layer wrapped
  so that it returns `base(x) + s (x @ a) @ b` (an adapted `nnx.Embed`'s `attend`, a tied
  head, too); the frozen `state` is never modified or copied per client (under vmap it enters
  unbatched).

  Args:
    graphdef, state: `nnx.split(model)`.
    lora: {path: {"a", "b"}} with paths from `find_targets_nnx`.
    rngs: a PRNG key that reseeds the model's random streams (`nnx.Dropout(rngs=...)`'s),
      required when it has any: pass the loss's `rng`, so that each client and step draws its
      own masks (the streams in `state` would give every call the same ones).
  Returns:
    What the model's call returns, every adapted layer's output base(x) + s (x @ a) @ b.
  Raises:
    ValueError: a path that is not a supported layer; a model with random streams and no `rngs`.
  """
  nnx = _nnx()
  model = nnx.merge(graphdef, state, copy=True)  # Its own Variables, at this trace level: a stream may advance.
  streams = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
  if streams:
    if rngs is None:
      raise ValueError(
        f"apply_nnx: the model draws random numbers (streams {streams}, e.g. nnx.Dropout); pass "
        f"rngs=<key> (the loss's rng), or every client and step would reuse the same draws"
      )
    nnx.reseed(model, **{tag: jax.random.fold_in(rngs, i) for i, tag in enumerate(streams)})
  for path, factors in lora.items():
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
    node = _nnx_child(model, parents)
    base = None if node is None else _nnx_child(node, [last])
    if base is None or not isinstance(base, nnx.Module):
      raise ValueError(
        f"LoRA path {path!r}: the model has no layer there (a typo? the paths of "
        f"find_targets_nnx '/'-join attribute names and list indices)"
      )
    if not isinstance(base, _nnx_kinds()):
      raise ValueError(
        f"LoRA path {path!r} is of type {type(base).__name__}, which LoRA does not support; "
        f"supported: {_nnx_kind_names()}"
      )
    check_factor_shapes(path, _nnx_matrix_shape(base), factors)
    wrapped = _nnx_lora_layer(base, factors["a"], factors["b"], scale)
    if isinstance(last, int):
      node[last] = wrapped
    else:
      setattr(node, last, wrapped)
  return model(*args, **kwargs)
