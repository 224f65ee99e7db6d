"""Round feeding: the sampled clients' padded blocks, ids and weights for each round, on the mesh.

A round's inputs depend only on (seed, round): the sampler position is the round index, so a
resumed run feeds exactly the rounds an unbroken one would.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from experiments.runner.data import blocks
from experiments.runner.assembly import Experiment
from hyperlora_jax import primitives


def chunk_image_loader(pool: Any) -> Callable[[dict], dict]:
  """`FederatedRound.load_batches` for `data.feed='chunk'`: a chunk's light batches
  {"indices": [k, S, B] into `pool`, "label", "mask"} -> {"image": [k, S, B, H, W, 3] uint8,
  "label", "mask"}, the images read on the host (from memory or the record files) inside the
  round's chunk loop, so a round never holds more than one chunk of images."""
  image_shape = tuple(pool.images.shape[1:])
  read = primitives.host_loader(
    lambda indices: np.asarray(pool.images[np.asarray(indices)], np.uint8),
    lambda spec: jax.ShapeDtypeStruct(spec.shape + image_shape, jnp.uint8),
  )
  return lambda light: {"image": read(light["indices"]), "label": light["label"], "mask": light["mask"]}


def round_inputs(exp: Experiment, round_index: int, gather: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
  """The sampled clients' padded block, ids and weights for one round.

  Depends only on (seed, round): the sampler position is the round index. A pooled-data
  method (centralized) gets one learner, id 0, reading the union of the clients' data for
  clients_per_round x local_steps steps: the compute of a federated round. A method with a
  meta-objective gets one more step per client, held out of the local steps.
  Returns:
    block {"image": [C, S, B, H, W, 3], "label", "mask"} ({"indices": [C, S, B] into the pool
    the steps read, `FederatedData.step_source`, "label", "mask"} with gather=False),
    client_ids [C] (-1 = padding), weights [C] = n_k / Σ n_j over the sampled clients.
  """
  settings, data = exp.settings, exp.data
  rng = np.random.default_rng([settings.seed, 1, round_index])
  steps = settings.fed.local_steps + exp.fed_round.aggregator.capabilities.heldout_steps
  pool, parts = data.step_source()
  if exp.method.pooled_data:
    ids = np.zeros(1, np.int64)
    steps *= settings.fed.clients_per_round
    parts = [np.concatenate(parts)]
  else:
    ids = blocks.sample_clients(data.num_clients, settings.fed.clients_per_round, rng)
  devices = primitives.clients_axis_size(exp.mesh)
  multiple = exp.fed_round.clients_per_chunk or devices
  ids = blocks.pad_client_ids(ids, math.lcm(multiple, devices))
  indices, mask = blocks.train_block_indices(parts, ids, steps, settings.fed.batch_size, rng)
  sizes = np.where(ids >= 0, data.train_sizes()[np.maximum(ids, 0)], 0).astype(np.float32)
  if not gather:
    light = {"indices": indices, "label": pool.labels[indices], "mask": mask}
    return light, ids.astype(np.int32), sizes / sizes.sum()
  return blocks.gather_block(pool, indices, mask), ids.astype(np.int32), sizes / sizes.sum()


def round_on_mesh(exp: Experiment, round_index: int, sharding: NamedSharding) -> tuple[Any, np.ndarray]:
  """((block, ids, weights) as global arrays sharded over the clients axis, host ids).

  With several processes, each gathers only the examples (images, or a text run's token rows)
  of the clients its devices hold (`jax.make_array_from_callback`); ids and weights are small
  and built whole. With `data.feed='host'` the block is held in pinned host memory
  (`exp.host_feed`) and the round moves it to the devices a chunk at a time.
  """
  if exp.settings.feed == "chunk":  # Light batches: the round reads images chunk by chunk.
    light, ids, weights = round_inputs(exp, round_index, gather=False)
    light["indices"] = light["indices"].astype(np.int32)
    return jax.device_put((light, ids, weights), sharding), ids
  feed = exp.host_feed  # data.feed='host': the block in pinned host memory, moved a chunk at a time.
  if jax.process_count() == 1:
    block, ids, weights = round_inputs(exp, round_index)
    if feed is not None:
      return (feed.place(block), *jax.device_put((ids, weights), sharding)), ids
    return jax.device_put((block, ids, weights), sharding), ids
  light, ids, weights = round_inputs(exp, round_index, gather=False)
  indices, mask = light["indices"], light["mask"]
  rows_of = lambda index: index[0].indices(len(ids))  # A device's slice of the clients axis.
  pack = feed.pack if feed is not None else (lambda block: block)
  local = {
    rows_of(index): pack(blocks.gather_block(exp.data.step_source()[0], indices[index[0]], mask[index[0]]))
    for index in sharding.addressable_devices_indices_map(indices.shape).values()
  }
  example = next(iter(local.values()))
  block_sharding = feed.host_sharding if feed is not None else sharding
  block = {
    key: jax.make_array_from_callback(
      (len(ids),) + leaf.shape[1:], block_sharding, lambda index, key=key: local[rows_of(index)][key]
    )
    for key, leaf in example.items()
  }
  ids_and_weights = jax.device_put((ids, weights), sharding)
  return (block,) + ids_and_weights, ids
