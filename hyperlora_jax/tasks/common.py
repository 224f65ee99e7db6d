"""What every task shares: the frozen pytree and its dtype, and the server's full-rank residuals."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax import quantize


def frozen_tree(
  backbone: Any,
  base_delta: dict | None = None,
  dtype: Any = None,
  quantization: str = "none",
  quantization_block: int = 0,
) -> dict:
  """The task's frozen pytree: {"variables": backbone, "base_delta": ...}, the backbone's
  floating-point weights cast to `dtype` (None: as they are), e.g. bfloat16 to run the
  frozen backbone in bf16 (with `ImageClassification(compute_dtype=jnp.bfloat16)`), then its
  kernels quantized (`quantize.quantize_tree`) unless `quantization` is "none". Works on
  `jax.ShapeDtypeStruct` trees under `jax.eval_shape`.

  Args:
    backbone: the frozen variables ({"params": ...}).
    base_delta: {layer: [d_in, d_out]} server residuals, or None ({}).
    dtype: the backbone's compute dtype, or None.
    quantization: "none", "int8" or "nf4": the frozen kernels' storage (computed in `dtype`).
    quantization_block: entries per scale (0: the kind's default; `quantize.quantize`).
  Returns:
    {"variables", "base_delta"}.
  """
  if dtype is not None:  # A weight quantized already keeps its codes, scales and dtype.
    floating = lambda x: not quantize.is_quantized(x) and jnp.issubdtype(x.dtype, jnp.floating)
    backbone = jax.tree.map(lambda x: x.astype(dtype) if floating(x) else x, backbone, is_leaf=quantize.is_quantized)
  if quantization != "none":
    backbone = quantize.quantize_tree(backbone, quantization, quantization_block)
  return {"variables": backbone, "base_delta": base_delta or {}}


def backbone_dtype(name: str, backend: str | None = None) -> Any:
  """'float32' | 'bfloat16' | 'auto' (bfloat16 on GPU and TPU, float32 on CPU) -> a dtype.

  Args:
    name: the config's `compute.backbone_dtype`.
    backend: the JAX backend ("cpu", "gpu", "tpu"); None: the default one.
  Returns:
    jnp.float32 or jnp.bfloat16.
  """
  if name == "auto":
    name = "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu", "cuda", "rocm") else "float32"
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def apply_base_delta(frozen: dict, base_delta: dict) -> dict:
  """The round's `apply_base_delta`: the server's full-rank residuals, applied factored.

  Args:
    frozen: the task's frozen tree.
    base_delta: {layer: [d_in, d_out]}, the server's cumulative residuals (replacing the tree's).
  Returns:
    A new frozen tree.
  """
  return {**frozen, "base_delta": base_delta}
