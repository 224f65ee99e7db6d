"""Timing and cost helpers the speed benchmarks share (`benchmark`, `text_benchmark`): best-of
wall time (of one way, or of several ways interleaved), the device's measured matmul peak,
XLA's FLOPs and planned memory of a jitted call."""

from __future__ import annotations

import os
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from hyperlora_jax import autotune


def define_threads_flag():
  """The speed benchmarks' `--threads` flag (absl), read by `confine_threads`."""
  return flags.DEFINE_integer(
    "threads",
    0,
    "CPUs (threads) for every framework: XLA:CPU's pool and torch.set_num_threads (0: all this process may use).",
  )


def confine_threads(threads: int) -> int:
  """Confines this process to `threads` of the CPUs it may run on (0: all of them) and returns
  the count. Call it before JAX's backend starts (before the first array): XLA:CPU sizes its
  thread pool by the CPUs the process may run on, and the PyTorch baselines set their threads to
  the same count (`torch_baselines.use_cpu_threads`), so every framework runs on as many threads.

  Raises:
    ValueError: more threads than the CPUs the process may run on.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if threads > len(allowed):
    raise ValueError(f"--threads={threads}: this process may run on {len(allowed)} CPUs")
  if threads:
    os.sched_setaffinity(0, set(allowed[:threads]))
  return len(os.sched_getaffinity(0))


def best_time(fn, repeats: int) -> float:
  """Best wall time of `fn()` over `repeats` calls after a compiling warm-up call."""
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def interleaved_times(ways: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float] | None]:
  """Wall times of each `ways[name]()` in `repeats` rounds in which every way runs once, in turn,
  after one warm-up (compiling) call each: {name: [seconds per round]}. Each way must wait for
  its own work (`jax.block_until_ready`, CUDA's synchronize). On a machine whose speed drifts
  while it is measured, every way meets the same drift: compare ways by their best times, or by
  the median of their per-round ratios (`paired_ratio`), whose two times were taken moments
  apart. None for a way whose warm-up ran out of device memory (any other error is raised)."""
  times: dict[str, list[float] | None] = {}
  for name, way in ways.items():
    try:
      way()
      times[name] = []
    except jax.errors.JaxRuntimeError as error:
      if not autotune.is_out_of_memory(error):
        raise
      times[name] = None
  for _ in range(repeats):
    for name, way in ways.items():
      if times[name] is not None:
        start = time.perf_counter()
        way()
        times[name].append(time.perf_counter() - start)
  return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
  """The median over rounds of numerator[r] / denominator[r] (`interleaved_times`' lists)."""
  return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def matmul_peak_flops(size: int = 0, repeats: int = 5, dtype=jnp.float32) -> float:
  """The device's matmul FLOP/s in `dtype`: best of `repeats` jitted [size, size] @ [size, size]
  (size 0: 1024 on a CPU, 8192 on an accelerator, which a small product leaves mostly idle)."""
  size = size or (1024 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  dot = jax.jit(lambda x: x @ x)
  return 2 * size**3 / best_time(lambda: dot(a), repeats)


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
  return int(
    stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
  )
