"""The clients' data for a run: pools, partition and the fixed-shape evaluation blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from configs import blocks as config_blocks
from experiments.runner.data import blocks, partition
from experiments.runner.data.loader import ImageDataset, load_image_dataset


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Attributes:
  train_pool, test_pool: every client's examples, pooled (images in memory or streamed).
  train_parts, test_parts: per-client index arrays into the pools.
  new_train_parts, new_test_parts: held-out new clients (`data.heldout_clients`), drawn by
    the same partition but never sampled in training; [] if none.
  eval_batch: evaluation batch; global test blocks are padded to a multiple of it.
  chunk_examples: examples per evaluation / signature block (0: one block for everything);
    this bounds the device memory of an evaluation, and with streamed images host memory.
  step_pool: what the local steps read instead of `train_pool`, or None: a text run's packed
    rows (`data.packing`, `instructions.PackedRows`); step_parts, new_step_parts: the (new)
    clients' index arrays into it. Signatures, validation and aggregation weights read the
    records (`train_pool`, `train_parts`).
  """

  train_pool: ImageDataset
  test_pool: ImageDataset
  train_parts: list
  test_parts: list
  new_train_parts: list = dataclasses.field(default_factory=list)
  new_test_parts: list = dataclasses.field(default_factory=list)
  eval_batch: int = 256
  chunk_examples: int = 0
  step_pool: Any = None
  step_parts: list = dataclasses.field(default_factory=list)
  new_step_parts: list = dataclasses.field(default_factory=list)

  @property
  def num_clients(self) -> int:
    return len(self.train_parts)

  @property
  def num_classes(self) -> int:
    return self.train_pool.num_classes

  def train_sizes(self) -> np.ndarray:
    return np.array([len(p) for p in self.train_parts])

  def step_source(self, new_clients: bool = False) -> tuple[Any, list]:
    """(the pool the local steps read, the clients' index arrays into it): the training records,
    or their packed rows; of the held-out new clients with `new_clients`."""
    if self.step_pool is None:
      return self.train_pool, self.new_train_parts if new_clients else self.train_parts
    return self.step_pool, self.new_step_parts if new_clients else self.step_parts

  def has_test_examples(self) -> np.ndarray:
    """[N] bool: the clients whose test split is not empty (the personalized accuracies are
    their mean and minimum)."""
    return np.array([len(p) > 0 for p in self.test_parts])

  def global_test_blocks(self) -> Iterator[dict]:
    """The union of the clients' test splits in blocks {"image": [M, H, W, 3], "label": [M],
    "mask": [M]}, M a fixed multiple of `eval_batch` (padding masked): one block unless
    `chunk_examples` is set."""
    union = np.concatenate(self.test_parts)
    size = _round_up(min(self.chunk_examples, len(union)) if self.chunk_examples else len(union), self.eval_batch)
    for start in range(0, max(len(union), 1), size):
      part = union[start : start + size]
      indices = np.zeros(size, np.int64)
      indices[: len(part)] = part
      mask = (np.arange(size) < len(part)).astype(np.float32)
      yield blocks.gather_block(self.test_pool, indices, mask)

  def client_test_blocks(self, parts: list | None = None, multiple: int = 1) -> Iterator[tuple[np.ndarray, dict]]:
    """(client ids [c], {"image": [c, n_max, H, W, 3], "label", "mask"}) over the clients'
    test splits (or `parts`), c fixed and a multiple of `multiple`, n_max a multiple of
    `eval_batch` when above it (so a client's split is evaluated in batches); the last block is
    padded with empty clients (id 0, mask 0) whose results the caller drops."""
    parts = self.test_parts if parts is None else parts
    yield from client_blocks(self.test_pool, parts, self.chunk_examples, multiple, self.eval_batch)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def client_blocks(
  pool: ImageDataset, parts: list, chunk_examples: int = 0, multiple: int = 1, batch: int = 0
) -> Iterator[tuple[np.ndarray, dict]]:
  """Every client's whole split in blocks of c clients padded to the largest split n_max (see
  `FederatedData.client_test_blocks`); c = all clients when `chunk_examples` is 0, else about
  `chunk_examples / n_max`, rounded up to a multiple of `multiple` (e.g. the devices). With
  `batch`, an n_max above it is rounded up to a multiple of it."""
  n_max = max(1, max(len(p) for p in parts))
  if batch and n_max > batch:
    n_max = _round_up(n_max, batch)
  per_block = len(parts) if not chunk_examples else max(1, min(len(parts), chunk_examples // n_max))
  per_block = _round_up(per_block, multiple)
  for start in range(0, len(parts), per_block):
    ids = np.arange(start, start + per_block)
    chunk = [parts[i] if i < len(parts) else np.zeros(0, np.int64) for i in ids]
    yield np.where(ids < len(parts), ids, 0), blocks.padded_eval_block(pool, chunk, n_max)


def build_federated_data(data: config_blocks.ImageData, seed: int, eval_batch: int) -> FederatedData:
  """Loads the pools (streamed with `data.stream`) and partitions them over `data.num_clients`
  + `data.heldout_clients` clients (seeded by `seed`); the last `heldout_clients` are the new
  clients. Partitions read only labels and domains. With `data.validation_fraction` > 0 every
  evaluation reads a validation split carved from each client's training examples
  (`partition.split_validation`) instead of its test split, which is then never read.

  Args:
    data: the run's `data` block (`settings.data_block(config)`).
    seed: the run's seed.
    eval_batch: the evaluation batch (blocks are padded to a multiple of it).
  Returns:
    The `FederatedData`.
  """
  train = load_image_dataset(data.name, data.train_split, data.data_dir or None, data.image_size, data.stream)
  test = load_image_dataset(data.name, data.test_split, data.data_dir or None, data.image_size, data.stream)
  return partitioned(data, seed, eval_batch, train, test)


def partitioned(data: config_blocks.ClientData, seed: int, eval_batch: int, train, test) -> FederatedData:
  """The `FederatedData` of pools `train` and `test` (images, or `instructions.TextDataset`s
  whose records' groups are their labels and domains) by the `data` block's partition.

  Args:
    data: the run's `data` block (image or text).
    seed: the run's seed.
    eval_batch: the evaluation batch.
    train, test: the pools.
  Returns:
    The `FederatedData`.
  """
  train_parts, test_parts = partition.partition_train_test(
    data.partition,
    train.labels,
    train.domains,
    test.labels,
    test.domains,
    data.num_clients + data.heldout_clients,
    seed=seed,
    alpha=data.dirichlet_alpha,
    classes_per_client=data.classes_per_client,
    min_size=data.min_client_size,
  )
  train_parts = partition.cap_examples(train_parts, data.max_client_examples, seed)
  if data.validation_fraction:  # Tuning: evaluate on held-out training data only.
    train_parts, test_parts = partition.split_validation(train_parts, data.validation_fraction, seed)
    test = train
  new_train, new_test = train_parts[data.num_clients :], test_parts[data.num_clients :]
  train_parts, test_parts = train_parts[: data.num_clients], test_parts[: data.num_clients]
  return FederatedData(
    train, test, train_parts, test_parts, new_train, new_test, eval_batch, data.stream_chunk_examples
  )
