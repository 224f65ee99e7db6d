"""Timing and cost helpers the speed benchmarks share (`benchmark`, `text_benchmark`): best-of
wall time, the device's measured matmul peak, XLA's FLOPs and planned memory of a jitted call."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from hyperlora_jax import autotune


def best_time(fn, repeats: int) -> float:
  """Best wall time of `fn()` over `repeats` calls after a compiling warm-up call."""
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def best_time_or_out_of_memory(fn, repeats: int) -> float | None:
  """`best_time(fn, repeats)`, or None when the device runs out of memory (a large chunk of
  clients on an accelerator); any other error is raised."""
  try:
    return best_time(fn, repeats)
  except jax.errors.JaxRuntimeError as error:
    if not autotune.is_out_of_memory(error):
      raise
    return None


def matmul_peak_flops(size: int = 0, repeats: int = 5, dtype=jnp.float32) -> float:
  """The device's matmul FLOP/s in `dtype`: best of `repeats` jitted [size, size] @ [size, size]
  (size 0: 1024 on a CPU, 8192 on an accelerator, which a small product leaves mostly idle)."""
  size = size or (1024 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  dot = jax.jit(lambda x: x @ x)
  return 2 * size ** 3 / best_time(lambda: dot(a), repeats)


def update_flops(compiled_fn, *args) -> float:
  """FLOPs of one call of a jitted function, from XLA's cost analysis (0 if it reports none).
  A `lax.scan` body is counted once, whatever its length."""
  cost = compiled_fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def planned_memory_bytes(jitted, *args) -> int:
  """The device memory XLA plans for one call of `jitted(*args)`: arguments + outputs +
  temporaries - aliased (0 where the backend reports none)."""
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return 0
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
