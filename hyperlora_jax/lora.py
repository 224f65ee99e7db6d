"""LoRA on any Flax Linen model: attach by regex on module paths, apply factored.

Layout. A Flax `nn.Dense` kernel is `[d_in, d_out]` and computes `y = x @ W`. The LoRA
factors are stored in the same orientation:
  a: [d_in, r]   (= A^T of the paper / HF-peft `lora_A.weight` [r, d_in])
  b: [r, d_out]  (= B^T of the paper / HF-peft `lora_B.weight` [d_out, r])
so `y = x @ W + s * (x @ a) @ b`, the kernel-layout update is `ΔW = s * a @ b` [d_in, d_out],
and the paper's `B A` [d_out, d_in] is its transpose. Aggregators work on `a @ b`.

LoRA parameters are a separate pytree, `{module_path: {"a": ..., "b": ...}}`, never merged
into the frozen backbone during training: `apply` intercepts the targeted `nn.Dense` calls
(`flax.linen.intercept_methods`) and adds the factored update, so the backbone enters a
vmapped client function unbatched and is never copied per client.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

LoraParams = dict  # {path: {"a": [d_in, r], "b": [r, d_out]}}
DEFAULT_TARGET_REGEX = r".*attn/(query|value)"


def module_path(module: nn.Module) -> str:
  """'encoder/block_0/attn/query' for a bound Linen module."""
  return "/".join(module.path)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
  """s = alpha / r (rsLoRA: alpha / sqrt(r))."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def find_targets(model: nn.Module, params: Any, *example_args, target_regex: str = DEFAULT_TARGET_REGEX,
                 **example_kwargs) -> dict[str, tuple[int, int]]:
  """Targeted `nn.Dense` layers and their kernel shapes, found by tracing one call.

  Args:
    model, params: the Flax model and its variables.
    example_args/kwargs: an example call (only shapes matter; nothing is computed).
    target_regex: `re.fullmatch`ed against each Dense module's path.
  Returns:
    {path: (d_in, d_out)} in call order.
  Raises:
    ValueError: if nothing matches.
  """
  pattern = re.compile(target_regex)
  found: dict[str, tuple[int, int]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and context.method_name == "__call__":
      path = module_path(module)
      if pattern.fullmatch(path):
        found[path] = (args[0].shape[-1], module.features)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply(p, *example_args, **example_kwargs), params)
  if not found:
    raise ValueError(f"lora.target_regex={target_regex!r} matches no nn.Dense module of "
                     f"{type(model).__name__}")
  return found


def init_lora(rng: jax.Array, targets: Mapping[str, tuple[int, int]], rank: int,
              dtype=jnp.float32) -> LoraParams:
  """a ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (HF-peft's Kaiming init), b = 0, so ΔW = 0 at start.

  Returns:
    {path: {"a": [d_in, rank], "b": [rank, d_out]}}.
  """
  lora = {}
  for key, (path, (d_in, d_out)) in zip(jax.random.split(rng, len(targets)), targets.items()):
    bound = 1.0 / math.sqrt(d_in)
    lora[path] = {"a": jax.random.uniform(key, (d_in, rank), dtype, -bound, bound),
                  "b": jnp.zeros((rank, d_out), dtype)}
  return lora


def product(factors: Mapping[str, jax.Array]) -> jax.Array:
  """a @ b: [..., d_in, r] x [..., r, d_out] -> [..., d_in, d_out] (kernel layout, unscaled)."""
  return factors["a"] @ factors["b"]


def apply(model: nn.Module, params: Any, lora: LoraParams, *args, scale: float,
          base_delta: Mapping[str, jax.Array] | None = None, **kwargs):
  """`model.apply(params, *args, **kwargs)` with y = x @ W + s (x @ a) @ b on targeted layers.

  Args:
    lora: {path: {"a": [d_in, r], "b": [r, d_out]}}.
    scale: s = alpha / r.
    base_delta: optional {path: [d_in, d_out]} full-rank server residuals added to the frozen
      kernels (FedEx-LoRA, FLoRA): y += x @ delta.
  """
  base_delta = base_delta or {}
  unknown = set(lora) | set(base_delta)  # Paths not yet seen among the Dense calls.

  def add_lora(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"):
      return out
    path = module_path(module)
    x = call_args[0]
    if path in lora:
      unknown.discard(path)
      out = out + scale * ((x @ lora[path]["a"]) @ lora[path]["b"]).astype(out.dtype)
    if path in base_delta:
      unknown.discard(path)
      out = out + (x @ base_delta[path]).astype(out.dtype)
    return out

  with nn.intercept_methods(add_lora):
    result = model.apply(params, *args, **kwargs)
  if unknown:
    raise ValueError(f"LoRA paths not found among the model's nn.Dense calls: {sorted(unknown)}")
  return result


def merge(params: Any, lora: LoraParams, scale: float) -> Any:
  """Backbone variables with W <- W + s a@b merged into each targeted kernel (for export/tests)."""
  merged = jax.tree.map(lambda x: x, params)  # Shallow structural copy.
  for path, factors in lora.items():
    node = merged["params"]
    for name in path.split("/"):
      node = node[name]
    node["kernel"] = node["kernel"] + scale * product(factors)
  return merged
