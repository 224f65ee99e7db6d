"""Several processes (hosts) in one run: start-up, the main process, arrays back to the host.

    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # or auto=True
    ... every process builds the same round; arrays carry global shardings ...
    if distributed.is_main_process(): write files

Call `initialize` before anything touches a device. On CPU, collectives between processes
use gloo (`jax_cpu_collectives_implementation`), so two processes on one machine form one
2-device mesh (tested in CI); on TPU pods and Slurm, `auto=True` lets JAX detect everything.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0, auto: bool = False) -> bool:
  """Joins this process to a multi-process run; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0 ('' with `auto`, or for a single process).
    num_processes, process_id: this run's process count and this process's index.
    auto: let `jax.distributed.initialize()` detect the cluster (TPU, Slurm, ...).
  """
  if not auto and num_processes <= 1:
    return False
  if not auto and not coordinator_address:
    raise ValueError("distributed: num_processes > 1 needs a coordinator address 'host:port'")
  if not auto and not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id={process_id} is not in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  return True


def is_main_process() -> bool:
  """True on the process that writes files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process).

  Args:
    name: the barrier's name (every process must use the same, in the same order).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_host(x: Any) -> np.ndarray:
  """A jax.Array as a NumPy array on every process, gathering shards other processes hold.

  Args:
    x: a jax.Array (possibly sharded across processes) or a host value.
  Returns:
    The whole array, on the host.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
