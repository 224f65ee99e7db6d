"""Streamed images (`data.stream`): random access into the prepared files, the same numbers as
images in memory, and reads bounded by what a round needs."""

import numpy as np
import pytest

from experiments.runner.data import blocks
from experiments.runner.data.loader import RecordImages, load_image_dataset
from experiments.runner.experiment import build_experiment
from experiments.runner.feeding import round_inputs
from experiments.runner.train import train_and_evaluate

QUIET = {"progress": False, "log": lambda _: None}


def test_record_images_read_exactly_the_requested_images_once_each(smoke_config):
  data_dir, name = smoke_config.data.data_dir, smoke_config.data.name
  in_memory = load_image_dataset(name, "test", data_dir, 16)
  streamed = load_image_dataset(name, "test", data_dir, 16, stream=True)
  assert isinstance(streamed.images, RecordImages) and streamed.images.shape == in_memory.images.shape
  np.testing.assert_array_equal(streamed.labels, in_memory.labels)
  np.testing.assert_array_equal(streamed.domains, in_memory.domains)
  indices = np.random.default_rng(0).integers(0, len(in_memory), (2, 3, 4))
  indices[1, 2, 3] = indices[0, 0, 0]  # A repeated index is read once.
  np.testing.assert_array_equal(streamed.images[indices], in_memory.images[indices])
  assert streamed.images.records_read == len(np.unique(indices))
  np.testing.assert_array_equal(streamed.images[:2], in_memory.images[:2])
  with pytest.raises(IndexError):
    streamed.images[np.array([len(in_memory)])]


def test_streamed_run_in_small_blocks_gives_the_in_memory_metrics(smoke_config, tmp_path):
  """Evaluation and signatures (HyperLoRA's) in several blocks of 64 examples, new clients,
  rounds prefetched: the same metrics, record for record, as everything in memory."""
  smoke_config.method, smoke_config.fed.num_rounds = "hyperlora", 2
  smoke_config.data.heldout_clients = 1
  in_memory = train_and_evaluate(smoke_config, str(tmp_path / "memory"), **QUIET)["records"]
  smoke_config.data.stream, smoke_config.data.stream_chunk_examples = True, 64
  streamed = train_and_evaluate(smoke_config, str(tmp_path / "stream"), **QUIET)["records"]
  assert streamed == in_memory
  assert "new_client_global" in streamed[-1]


def test_a_streamed_round_reads_only_its_clients_examples(smoke_config):
  smoke_config.data.stream, smoke_config.data.stream_chunk_examples = True, 64
  exp = build_experiment(smoke_config, log=lambda _: None)
  pool = exp.data.train_pool
  assert isinstance(pool.images, RecordImages)
  before = pool.images.records_read
  block, ids, _ = round_inputs(exp, 0)
  rng = np.random.default_rng([smoke_config.seed, 1, 0])
  ids_again = blocks.sample_clients(exp.data.num_clients, smoke_config.fed.clients_per_round, rng)
  needed = np.concatenate([exp.data.train_parts[c] for c in ids_again])
  read = pool.images.records_read - before
  assert 0 < read <= len(needed) < len(pool)
  assert block["image"].shape[:3] == (len(ids), smoke_config.fed.local_steps, smoke_config.fed.batch_size)


def test_chunk_and_host_feeds_give_the_records_of_the_round_feed(smoke_config, tmp_path):
  """data.feed='chunk': the round gets example indices and reads each chunk's images on the host
  inside its chunk loop; data.feed='host': the round's block is placed in pinned host memory
  (images as uint32 words) and moved to the device a chunk at a time inside the round. Both
  (HyperLoRA: the held-out meta-step too) give the records of feed='round', record for record."""
  from experiments.runner.feeding import round_on_mesh
  from hyperlora_jax import primitives

  smoke_config.method, smoke_config.fed.num_rounds, smoke_config.fed.clients_per_chunk = "hyperlora", 2, 2
  by_round = train_and_evaluate(smoke_config, str(tmp_path / "round"), **QUIET)["records"]
  smoke_config.data.feed = "chunk"
  exp = build_experiment(smoke_config, log=lambda _: None)
  assert exp.fed_round.load_batches is not None  # The round loads its chunks.
  by_chunk = train_and_evaluate(smoke_config, str(tmp_path / "chunk"), **QUIET)["records"]
  assert by_chunk == by_round
  smoke_config.data.feed = "host"
  exp = build_experiment(smoke_config, log=lambda _: None)
  (block, _, _), _ = round_on_mesh(exp, 0, primitives.clients_sharding(exp.mesh))
  image_shape = exp.data.train_pool.images.shape[1:]
  assert {x.sharding.memory_kind for x in block.values()} == {"pinned_host"}
  assert block["image"].dtype == np.uint32 and block["image"].shape[3] * 4 == np.prod(image_shape)
  by_host = train_and_evaluate(smoke_config, str(tmp_path / "host"), **QUIET)["records"]
  assert by_host == by_round
