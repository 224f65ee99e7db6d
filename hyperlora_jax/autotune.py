"""Choosing `clients_per_chunk` by measuring it, and caching the choice.

How many clients to vmap together is a trade of parallel work against activation memory
traffic, and the best value depends on the backend and the model: on a 2-core CPU the whole
cohort in one vmap is the slowest setting (its activations leave the cache), one client at
a time is fastest for a ViT-Ti-sized model, and 16 per chunk is fastest for a tiny one; on
an accelerator the whole cohort usually wins. So the choice is measured:

    choice = measure_clients_per_chunk(per_client_fn, sample_xs)       # [c, ...] inputs
    choice.clients_per_chunk, choice.seconds                           # int, {k: seconds}

and kept in a JSON cache so that a machine measures each (backend, model, shapes) once:

    choice = cached_choice(path, key_fields, lambda: measure_clients_per_chunk(...))

Chunking changes float rounding (a batched matmul sums in another order), so a run records
the value it used (it is part of its results, like the seed), and pinning the value gives
bit-identical runs across machines that would measure differently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import jax

from hyperlora_jax import primitives

AUTO = -1  # `clients_per_chunk` value meaning "measure it" (configs: fed.clients_per_chunk=-1).


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
  """Attributes:
    clients_per_chunk: the fastest candidate (clients vmapped together).
    seconds: {candidate: best wall time of one map over the sample clients}.
    cached: whether it came from the cache rather than a measurement.
    out_of_memory: the candidate that ran out of device memory, if one did (the larger ones
      were then not tried); () if none.
  """
  clients_per_chunk: int
  seconds: dict
  cached: bool = False
  out_of_memory: tuple = ()


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA running out of device memory (status RESOURCE_EXHAUSTED)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def chunk_candidates(num_clients: int, targets: Sequence[int] = (1, 4, 16, 64)) -> list[int]:
  """Candidate chunk sizes for `num_clients` clients: for each target and for the whole
  cohort, the largest divisor of `num_clients` not above it (sorted, distinct).

  E.g. 10 clients -> [1, 2, 10]; 64 -> [1, 4, 16, 64]; 48 -> [1, 4, 16, 48]."""
  divisors = [d for d in range(1, num_clients + 1) if num_clients % d == 0]
  return sorted({max(d for d in divisors if d <= t) for t in (*targets, num_clients)})


def measure_clients_per_chunk(fn: Callable, xs: Any, candidates: Sequence[int] | None = None,
                              repeats: int = 2, clock: Callable[[], float] = time.perf_counter) -> ChunkChoice:
  """Times `primitives.map_clients(fn, xs, k)` for each candidate k on the default device,
  smallest first. A candidate that runs out of device memory (a large model on an accelerator:
  the whole cohort's activations at once) ends the search: it and the larger ones are skipped.

  Args:
    fn: the per-client function (as for `map_clients`), e.g. one client's local update.
    xs: pytree of [c, ...] sample inputs: the clients one device handles in a round
      (with D devices sharding C clients, c = C / D and the round's chunk is k * D).
    candidates: chunk sizes dividing c (default `chunk_candidates(c)`).
    repeats: timed calls per candidate after a compiling warm-up; the best counts.
  Returns:
    the fastest candidate and every measured candidate's time.
  Raises:
    the out-of-memory error when even the smallest candidate runs out of memory.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  candidates = sorted(candidates or chunk_candidates(num))
  seconds, out_of_memory = {}, ()
  for k in candidates:
    mapped = jax.jit(lambda inputs, k=k: primitives.map_clients(fn, inputs, k))
    try:
      jax.block_until_ready(mapped(xs))  # Compile and warm up.
    except jax.errors.JaxRuntimeError as error:
      if not (is_out_of_memory(error) and seconds):
        raise
      out_of_memory = (k,)
      break
    best = float("inf")
    for _ in range(repeats):
      start = clock()
      jax.block_until_ready(mapped(xs))
      best = min(best, clock() - start)
    seconds[k] = best
  return ChunkChoice(min(seconds, key=seconds.get), seconds, out_of_memory=out_of_memory)


def cache_key(fields: dict) -> str:
  """A stable short hash of JSON-able `fields` (what the choice depends on)."""
  return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_choice(path: str, fields: dict, measure: Callable[[], ChunkChoice]) -> ChunkChoice:
  """The choice cached in the JSON file `path` under `fields`' key, else `measure()`, which
  is then written there (atomically, next to the entries of other keys).

  Raises:
    ValueError: `path` exists but is not a readable cache (it is left untouched).
  """
  key, entries = cache_key(fields), {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        entries = json.load(f)
      entry = entries.get(key)
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"chunk-size cache {path} is unreadable ({e}); delete it to measure again") from None
    if entry is not None:
      return ChunkChoice(int(entry["clients_per_chunk"]), {int(k): v for k, v in entry["seconds"].items()},
                         cached=True, out_of_memory=tuple(entry.get("out_of_memory", ())))
  choice = measure()
  entries[key] = {"clients_per_chunk": choice.clients_per_chunk, "seconds": choice.seconds,
                  "out_of_memory": list(choice.out_of_memory),
                  "fields": fields, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)), delete=False) as f:
    json.dump(entries, f, indent=1, default=str)
  os.replace(f.name, path)
  return choice
