"""The clients' data for a run: pools, partition and the fixed-shape evaluation blocks."""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from hyperlora_jax.data import blocks, partition
from hyperlora_jax.data.loader import ImageDataset, load_image_dataset


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Attributes:
    train_pool, test_pool: every client's examples, pooled.
    train_parts, test_parts: per-client index arrays into the pools.
    global_test: union of the clients' test splits, padded to a multiple of eval_batch:
      {"image": [M, H, W, 3], "label": [M], "mask": [M]}.
    client_test: {"image": [N, n_max, H, W, 3], "label": [N, n_max], "mask": [N, n_max]}.
    new_train_parts, new_test_parts: held-out new clients (`data.heldout_clients`), drawn by
      the same partition but never sampled in training; [] if none.
  """
  train_pool: ImageDataset
  test_pool: ImageDataset
  train_parts: list
  test_parts: list
  global_test: dict
  client_test: dict
  new_train_parts: list = dataclasses.field(default_factory=list)
  new_test_parts: list = dataclasses.field(default_factory=list)

  @property
  def num_clients(self) -> int:
    return len(self.train_parts)

  @property
  def num_classes(self) -> int:
    return self.train_pool.num_classes

  def train_sizes(self) -> np.ndarray:
    return np.array([len(p) for p in self.train_parts])


def _pad_to_multiple(block: dict, multiple: int) -> dict:
  pad = (-len(block["label"])) % multiple
  return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in block.items()}


def build_federated_data(config: ml_collections.ConfigDict) -> FederatedData:
  """Loads the pools and partitions them over `data.num_clients` + `data.heldout_clients`
  clients (seeded by `seed`); the last `heldout_clients` are the new clients."""
  data = config.data
  train = load_image_dataset(data.name, data.train_split, data.data_dir or None, data.image_size)
  test = load_image_dataset(data.name, data.test_split, data.data_dir or None, data.image_size)
  train_parts, test_parts = partition.partition_train_test(
      data.partition, train.labels, train.domains, test.labels, test.domains,
      data.num_clients + data.heldout_clients, seed=config.seed, alpha=data.dirichlet_alpha,
      classes_per_client=data.classes_per_client, min_size=data.min_client_size)
  new_train, new_test = train_parts[data.num_clients:], test_parts[data.num_clients:]
  train_parts, test_parts = train_parts[:data.num_clients], test_parts[:data.num_clients]
  union = np.concatenate(test_parts)
  global_test = _pad_to_multiple(
      blocks.gather_block(test, union, np.ones(len(union), np.float32)), config.eval_batch)
  return FederatedData(train, test, train_parts, test_parts, global_test,
                       blocks.padded_eval_block(test, test_parts), new_train, new_test)
