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
import functools
import json
import os
import time
from typing import Any
from collections.abc import Callable, Sequence

import jax

from hyperlora_jax import files, primitives

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
  """Whether `error` is XLA running out of device memory (status RESOURCE_EXHAUSTED).

  Args:
    error: any exception.
  Returns:
    A bool.
  """
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def chunk_candidates(num_clients: int, targets: Sequence[int] = (1, 4, 16, 64)) -> list[int]:
  """Candidate chunk sizes for `num_clients` clients: for each target and for the whole
  cohort, the largest divisor of `num_clients` not above it (sorted, distinct).

  E.g. 10 clients -> [1, 2, 10]; 64 -> [1, 4, 16, 64]; 48 -> [1, 4, 16, 48].

  Args:
    num_clients: the cohort size C.
    targets: chunk sizes to try (each rounded down to a divisor of C).
  Returns:
    Sorted distinct divisors of C.
  """
  divisors = [d for d in range(1, num_clients + 1) if num_clients % d == 0]
  return sorted({max(d for d in divisors if d <= t) for t in (*targets, num_clients)})


def measure_clients_per_chunk(
  fn: Callable,
  xs: Any,
  candidates: Sequence[int] | None = None,
  repeats: int = 3,
  clock: Callable[[], float] = time.perf_counter,
) -> ChunkChoice:
  """Times `primitives.map_clients(fn, xs, k)` for each candidate k on the default device and
  picks the fastest. Each candidate is compiled and run once, smallest first; a candidate that
  runs out of device memory (a large model on an accelerator: the whole cohort's activations at
  once) ends that: it and the larger ones are skipped. Then `repeats` rounds in which every
  candidate runs once, in turn, each keeping its best time: a machine whose speed drifts while it
  is measured (a shared host) slows every candidate alike, instead of the ones timed last.

  Args:
    fn: the per-client function (as for `map_clients`), e.g. one client's local update.
    xs: pytree of [c, ...] sample inputs: the clients one device handles in a round
      (with D devices sharding C clients, c = C / D and the round's chunk is k * D).
    candidates: chunk sizes dividing c (default `chunk_candidates(c)`).
    repeats: timing rounds after the compiling warm-up; each candidate's best counts.
    clock: seconds (for tests).
  Returns:
    the fastest candidate and every measured candidate's time.
  Raises:
    the out-of-memory error when even the smallest candidate runs out of memory.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  candidates = sorted(candidates or chunk_candidates(num))
  runs: dict[int, Callable[[], Any]] = {}
  out_of_memory: tuple[int, ...] = ()
  for k in candidates:
    mapped = jax.jit(lambda inputs, k=k: primitives.map_clients(fn, inputs, k))
    try:
      jax.block_until_ready(mapped(xs))  # Compile and warm up.
    except jax.errors.JaxRuntimeError as error:
      if not (is_out_of_memory(error) and runs):
        raise
      out_of_memory = (k,)
      break
    runs[k] = functools.partial(_run_and_wait, mapped, xs)
  seconds = {k: float("inf") for k in runs}
  for _ in range(repeats):
    for k, run in runs.items():
      start = clock()
      run()
      seconds[k] = min(seconds[k], clock() - start)
  return ChunkChoice(min(seconds, key=lambda k: seconds[k]), seconds, out_of_memory=out_of_memory)


def _run_and_wait(fn: Callable, xs: Any) -> Any:
  return jax.block_until_ready(fn(xs))


def cache_key(fields: dict) -> str:
  """A stable short hash of JSON-able `fields` (what the choice depends on).

  Args:
    fields: JSON-able values.
  Returns:
    16 hex characters of their sha1.
  """
  return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_choice(path: str, fields: dict, measure: Callable[[], ChunkChoice]) -> ChunkChoice:
  """The choice cached in the JSON file `path` under `fields`' key, else `measure()`, which
  is then written there (atomically, next to the entries of other keys, under a lock so that
  concurrent runs add theirs). The file holds {"entries": {key: entry}, "sha256": the entries'
  digest}; the digest and every entry read are checked.

  Args:
    path: the JSON cache file.
    fields: what the choice depends on (its key).
    measure: measures the choice (called only on a cache miss).
  Returns:
    The `ChunkChoice`.
  Raises:
    ValueError: `path` exists but is not a readable cache, its digest does not match, or the
      entry read is malformed (named; the file is left untouched: delete it to measure again).
  """
  key = cache_key(fields)
  entry = _read_entries(path).get(key)
  if entry is not None:
    return _choice_of(entry, path, key)
  choice = measure()
  with files.exclusive_lock(path):  # Re-read: another run may have added its entry meanwhile.
    entries = _read_entries(path)
    entries[key] = {
      "clients_per_chunk": choice.clients_per_chunk,
      "seconds": choice.seconds,
      "out_of_memory": list(choice.out_of_memory),
      "fields": fields,
      "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    entries = json.loads(json.dumps(entries, default=str))  # As it reads back.
    files.atomic_write_json(path, {"entries": entries, "sha256": _digest(entries)}, indent=1)
  return choice


def _digest(entries: dict) -> str:
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _read_entries(path: str) -> dict:
  """The entries of the chunk-size cache `path` ({} if it does not exist), its digest checked.
  A file of an earlier version (the entries alone, no digest) is read as is."""
  if not os.path.exists(path):
    return {}
  problem = None
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    content, problem = None, f"unreadable ({type(e).__name__}: {e})"
  if problem is None and not isinstance(content, dict):
    problem = f"holds a JSON {type(content).__name__}, not an object"
  if problem is None and "sha256" in content:
    entries = content.get("entries")
    if not isinstance(entries, dict) or content["sha256"] != _digest(entries):
      problem = "its entries do not match their sha256 (changed since they were written)"
    content = entries
  if problem:
    raise ValueError(f"chunk-size cache {path}: {problem}; delete it to measure again")
  return content


def _choice_of(entry: Any, path: str, key: str) -> ChunkChoice:
  """The `ChunkChoice` of one cache entry, or ValueError naming the file and key."""
  try:
    chunk = entry["clients_per_chunk"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
      raise ValueError(f"clients_per_chunk={chunk!r} is not a positive integer")
    seconds = {int(k): float(v) for k, v in entry["seconds"].items()}
    return ChunkChoice(chunk, seconds, cached=True, out_of_memory=tuple(int(c) for c in entry.get("out_of_memory", ())))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(
      f"chunk-size cache {path}: entry {key!r} is malformed ({type(e).__name__}: {e}); delete the "
      f"file (or that entry) to measure again"
    ) from None
