"""Fixed-shape, padded client blocks: what one jit-compiled round consumes.

A round's data is `[clients, steps, batch, ...]` whatever the clients' sizes, so the round
compiles once. Each client reads a cyclic stream of fresh permutations of its own
examples; a client with fewer examples than `batch` contributes each of them once per step
and the rest of the batch is masked; a padding client (id -1) is fully masked. All draws
come from the generator passed in, which the trainer seeds with (seed, round): the sampler
position is the round index, so a resumed run draws exactly the batches of an unbroken one.
"""

from __future__ import annotations

import numpy as np

from experiments.runner.data.loader import ImageDataset

PAD_CLIENT = -1


def sample_clients(num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
  """[clients_per_round] distinct client ids, uniformly without replacement (sorted)."""
  return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))


def pad_client_ids(client_ids: np.ndarray, multiple: int) -> np.ndarray:
  """Pads ids with `PAD_CLIENT` up to a multiple of `multiple` (e.g. the device count)."""
  pad = (-len(client_ids)) % multiple
  return np.concatenate([client_ids, np.full(pad, PAD_CLIENT, client_ids.dtype)])


def _client_stream(
  indices: np.ndarray, steps: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """[steps, batch] example indices and a {0,1} mask for one client."""
  n = len(indices)
  if n == 0:
    return np.zeros((steps, batch), np.int64), np.zeros((steps, batch), np.float32)
  if n < batch:
    idx = np.zeros((steps, batch), np.int64)
    mask = np.zeros((steps, batch), np.float32)
    for s in range(steps):
      idx[s, :n] = rng.permutation(indices)
      mask[s, :n] = 1.0
    return idx, mask
  epochs = -(-steps * batch // n)
  stream = np.concatenate([rng.permutation(indices) for _ in range(epochs)])[: steps * batch]
  return stream.reshape(steps, batch), np.ones((steps, batch), np.float32)


def train_block_indices(
  parts: list[np.ndarray], client_ids: np.ndarray, steps: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Index and mask blocks for the sampled (possibly padded) clients.

  Args:
    parts: per-client index arrays into the train pool.
    client_ids: [C] sampled ids, `PAD_CLIENT` for padding.
  Returns:
    indices [C, steps, batch] int64 into the pool, mask [C, steps, batch] float32.
  """
  streams = [
    _client_stream(parts[c] if c != PAD_CLIENT else np.zeros(0, np.int64), steps, batch, rng) for c in client_ids
  ]
  return np.stack([s[0] for s in streams]), np.stack([s[1] for s in streams])


def gather_block(pool: ImageDataset, indices: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """{'image': [..., H, W, 3] uint8, 'label': [...] int32, 'mask': [...] float32} for an index block
  (a pool with its own `gather`, e.g. `instructions.TextDataset`, builds its own block)."""
  if hasattr(pool, "gather"):
    return pool.gather(indices, mask)
  return {"image": pool.images[indices], "label": pool.labels[indices], "mask": mask}


def padded_eval_block(pool: ImageDataset, parts: list[np.ndarray], max_n: int | None = None) -> dict[str, np.ndarray]:
  """Every client's whole split, padded to the largest (or to `max_n`): [N, max_n, ...] plus a mask."""
  max_n = max_n or max(1, max(len(p) for p in parts))
  indices = np.zeros((len(parts), max_n), np.int64)
  mask = np.zeros((len(parts), max_n), np.float32)
  for c, p in enumerate(parts):
    indices[c, : len(p)] = p
    mask[c, : len(p)] = 1.0
  return gather_block(pool, indices, mask)
