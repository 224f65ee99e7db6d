"""Offline TFDS data, partitions and padded blocks."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.runner.data import blocks, partition, render
from experiments.runner.data.digits_domains import split_base_indices
from experiments.runner.data.loader import load_image_dataset


def _pool(n=600, classes=10, domains=6, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, classes, n), rng.integers(0, domains, n)


def test_embedded_dataset_builds_offline_and_is_deterministic(cache_dirs):
  train = load_image_dataset("digits_domains/res16", "train", cache_dirs["data_dir"])
  test = load_image_dataset("digits_domains/res16", "test", cache_dirs["data_dir"])
  pre = load_image_dataset("digits_domains/res16", "pretrain", cache_dirs["data_dir"])
  assert (len(pre), len(train), len(test)) == (3234, 6036, 1512)
  assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
  assert train.num_classes == 10 and set(np.unique(train.labels)) == set(range(10))
  fed_ids = {render.ALL_DOMAINS.index(d) for d in render.FEDERATED_DOMAINS}
  assert set(np.unique(train.domains)) == fed_ids == set(np.unique(test.domains))
  assert set(np.unique(pre.domains)) == {render.ALL_DOMAINS.index("source")}
  rng = np.random.default_rng(7)
  again = render.render_digit(np.eye(8) * 16, "colour", 16, np.random.default_rng(7))
  np.testing.assert_array_equal(render.render_digit(np.eye(8) * 16, "colour", 16, rng), again)


def test_pretraining_digits_are_disjoint_from_client_digits():
  parts = split_base_indices(1797)
  assert not set(parts["pretrain"]) & set(parts["train"])
  assert not set(parts["pretrain"]) & set(parts["test"])
  assert not set(parts["train"]) & set(parts["test"])
  assert sum(len(p) for p in parts.values()) == 1797


def test_loader_reads_a_prepared_tfds_dataset_by_name():
  """`cifar100` (as a user would have it prepared) through the same loader, via TFDS mock data."""
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    data = load_image_dataset("cifar100", "train", "/nonexistent", image_size=16)
  assert data.images.shape == (12, 16, 16, 3) and data.num_classes == 100
  assert data.domain_names == ("cifar100",) and np.all(data.domains == 0)


def test_unprepared_dataset_fails_with_instructions(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.name.*file_format=array_record"):
    load_image_dataset("cifar100", "train", str(tmp_path))


@pytest.mark.parametrize("stream", [False, True])
def test_a_corrupt_array_record_shard_is_named(cache_dirs, tmp_path, stream):
  """A damaged shard once gave a raw Riegeli error naming neither dataset nor file."""
  import glob
  import shutil
  from experiments.runner.data.loader import CorruptDataError

  load_image_dataset("digits_domains/res16", "test", cache_dirs["data_dir"])  # Prepared once.
  data_dir = str(tmp_path / "tfds")
  shutil.copytree(cache_dirs["data_dir"], data_dir)
  (shard,) = glob.glob(f"{data_dir}/digits_domains/res16/*/digits_domains-test.array_record-*")
  data = bytearray(open(shard, "rb").read())
  for i in range(1000, len(data) - 1000, 997):
    data[i] ^= 0xFF
  open(shard, "wb").write(bytes(data))
  with pytest.raises(CorruptDataError, match="'digits_domains/res16' split 'test'.*digits_domains-test.array_record"):
    images = load_image_dataset("digits_domains/res16", "test", data_dir, stream=stream).images
    images[np.arange(len(images))]  # A stream reads here.


@pytest.mark.parametrize(
  "kind,kwargs,num_clients",
  [
    ("dirichlet_label_skew", {"alpha": 0.5, "min_size": 5}, 10),
    ("k_classes_per_client", {"classes_per_client": 2}, 10),
    ("one_domain_per_client", {}, 6),
    ("domain_dirichlet", {"alpha": 0.5, "min_size": 2}, 12),
  ],
)
def test_partitions_cover_every_example_exactly_once(kind, kwargs, num_clients):
  train_labels, train_domains = _pool(seed=1)
  test_labels, test_domains = _pool(n=200, seed=2)
  train, test = partition.partition_train_test(
    kind, train_labels, train_domains, test_labels, test_domains, num_clients, seed=3, **kwargs
  )
  for parts, n in ((train, 600), (test, 200)):
    assert len(parts) == num_clients
    everything = np.concatenate(parts)
    assert len(everything) == n and set(everything.tolist()) == set(range(n))
  again, _ = partition.partition_train_test(
    kind, train_labels, train_domains, test_labels, test_domains, num_clients, seed=3, **kwargs
  )
  assert all(np.array_equal(a, b) for a, b in zip(train, again))


def _mean_label_entropy(parts, labels, classes=10):
  ent = []
  for p in parts:
    h = np.bincount(labels[p], minlength=classes) / max(len(p), 1)
    ent.append(-np.sum(h[h > 0] * np.log(h[h > 0])))
  return float(np.mean(ent))


def test_dirichlet_skew_follows_alpha_and_min_size():
  labels, domains = _pool(n=3000)
  entropy = {}
  for alpha in (0.1, 1.0, 100.0):
    train, _ = partition.partition_train_test(
      "dirichlet_label_skew", labels, domains, labels[:10], domains[:10], 10, seed=0, alpha=alpha, min_size=20
    )
    assert min(len(p) for p in train) >= 20
    entropy[alpha] = _mean_label_entropy(train, labels)
  assert entropy[0.1] < entropy[1.0] < entropy[100.0]
  assert entropy[100.0] > 0.95 * np.log(10)  # Nearly IID.


def test_test_split_follows_the_clients_train_distribution():
  labels, domains = _pool(n=6000)
  test_labels, test_domains = _pool(n=6000, seed=5)
  train, test = partition.partition_train_test(
    "dirichlet_label_skew", labels, domains, test_labels, test_domains, 5, seed=1, alpha=0.3, min_size=10
  )
  for tr, te in zip(train, test):
    h_tr = np.bincount(labels[tr], minlength=10) / len(tr)
    h_te = np.bincount(test_labels[te], minlength=10) / len(te)
    assert np.abs(h_tr - h_te).sum() < 0.15


def test_k_classes_and_one_domain_partitions_hold_what_they_say():
  labels, domains = _pool(n=2000)
  train, _ = partition.partition_train_test(
    "k_classes_per_client", labels, domains, labels, domains, 5, seed=0, classes_per_client=2
  )
  assert all(len(np.unique(labels[p])) == 2 for p in train)
  train, _ = partition.partition_train_test("one_domain_per_client", labels, domains, labels, domains, 6, seed=0)
  assert [set(np.unique(domains[p])) for p in train] == [{d} for d in range(6)]


def test_partition_errors_name_the_field():
  labels, domains = _pool()
  with pytest.raises(ValueError, match="data.num_clients"):
    partition.partition_train_test("one_domain_per_client", labels, domains, labels, domains, 4, seed=0)
  with pytest.raises(ValueError, match="data.min_client_size"):
    partition.partition_train_test(
      "dirichlet_label_skew", labels, domains, labels, domains, 50, seed=0, alpha=0.05, min_size=50
    )


def test_blocks_have_fixed_shape_masks_and_padding():
  parts = [np.arange(0, 100), np.arange(100, 103), np.zeros(0, np.int64)]
  ids = blocks.pad_client_ids(np.array([0, 1, 2]), 4)
  np.testing.assert_array_equal(ids, [0, 1, 2, blocks.PAD_CLIENT])
  idx, mask = blocks.train_block_indices(parts, ids, steps=3, batch=8, rng=np.random.default_rng(0))
  assert idx.shape == mask.shape == (4, 3, 8)
  assert mask[0].all() and set(idx[0].ravel()) <= set(range(100))
  assert (mask[1].sum(-1) == 3).all() and set(idx[1][mask[1] > 0]) == {100, 101, 102}
  assert not mask[2].any() and not mask[3].any()
  first_epoch = idx[0].ravel()[:24]
  assert len(set(first_epoch.tolist())) == 24  # No repeats within an epoch.


def test_capping_examples_keeps_a_seeded_subset_of_each_client():
  parts = [np.arange(100), np.arange(100, 105), np.zeros(0, np.int64)]
  capped = partition.cap_examples(parts, 8, seed=0)
  assert [len(p) for p in capped] == [8, 5, 0]
  assert set(capped[0]) <= set(parts[0]) and np.all(np.diff(capped[0]) > 0)  # A subset, in order.
  np.testing.assert_array_equal(capped[1], parts[1])  # Fewer than the cap: kept.
  np.testing.assert_array_equal(partition.cap_examples(parts, 8, seed=0)[0], capped[0])
  assert not np.array_equal(partition.cap_examples(parts, 8, seed=1)[0], capped[0])
  assert partition.cap_examples(parts, 0, seed=0) is parts


def test_a_data_scarce_config_caps_training_examples_but_not_test_splits(smoke_config):
  from experiments.runner.federated_data import build_federated_data
  from experiments.runner.settings import data_block

  full = build_federated_data(data_block(smoke_config), smoke_config.seed, smoke_config.eval_batch)
  smoke_config.data.max_client_examples = 8
  scarce = build_federated_data(data_block(smoke_config), smoke_config.seed, smoke_config.eval_batch)
  assert max(full.train_sizes()) > 8 and max(scarce.train_sizes()) == 8
  for whole, part in zip(full.train_parts, scarce.train_parts):
    assert set(part) <= set(whole) and len(part) == min(8, len(whole))
  for whole, part in zip(full.test_parts, scarce.test_parts):
    np.testing.assert_array_equal(whole, part)


def test_a_validation_split_is_carved_from_training_examples_and_replaces_the_test_split(smoke_config):
  from experiments.runner.federated_data import build_federated_data
  from experiments.runner.settings import data_block

  full = build_federated_data(data_block(smoke_config), smoke_config.seed, smoke_config.eval_batch)
  smoke_config.data.validation_fraction = 0.25
  tuning = build_federated_data(data_block(smoke_config), smoke_config.seed, smoke_config.eval_batch)
  assert tuning.test_pool is tuning.train_pool  # Evaluations read training examples only.
  for whole, train, held in zip(full.train_parts, tuning.train_parts, tuning.test_parts):
    assert len(held) == max(int(0.25 * len(whole)), 1)
    assert not set(train) & set(held)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.sort(whole))
  assert [len(p) for p in partition.split_validation([np.arange(1), np.arange(2)], 0.1, 0)[1]] == [0, 1]
  unsplit = [np.arange(5)]
  train, held = partition.split_validation(unsplit, 0.0, 0)
  assert train is unsplit and len(held[0]) == 0  # Off: nothing held out.


def test_corruptions_by_hand_and_by_their_formulas():
  from experiments.runner.data import corruptions

  # Two images of different means, non-square (3 x 5): contrast uses each image's own mean.
  images = np.zeros((2, 3, 5, 3), np.uint8)
  images[0, :, :2] = 255  # Image 0: 6 of 15 pixels white, mean 102.
  images[1] = 200  # Image 1: flat, unchanged by any contrast.
  out = corruptions.corrupt(images, "contrast", 2)  # Factor 0.5.
  assert out.dtype == np.uint8 and out.shape == images.shape
  assert out[0, 0, 0, 0] == round((255 - 102) * 0.5 + 102) == 178  # 178.5 rounds to even: 178.
  assert out[0, 0, 4, 0] == 51 and (out[1] == 200).all()
  np.testing.assert_array_equal(corruptions.corrupt(images, "gaussian_noise", 0), images)
  # Noise on mid-grey (no clipping): zero mean, std σ·255 (severity 3: σ = 0.18).
  grey = np.full((64, 16, 24, 3), 128, np.uint8)
  noisy = corruptions.corrupt(grey, "gaussian_noise", 3, seed=1).astype(np.float64) - 128
  assert abs(noisy.mean()) < 0.5 and abs(noisy.std() - 0.18 * 255) < 0.5
  np.testing.assert_array_equal(
    corruptions.corrupt(grey, "gaussian_noise", 3, seed=1), corruptions.corrupt(grey, "gaussian_noise", 3, seed=1)
  )
  assert (
    corruptions.corrupt(grey, "gaussian_noise", 3, seed=2) != corruptions.corrupt(grey, "gaussian_noise", 3, seed=1)
  ).any()
  # Severity grows the shift: the mean distance to the clean images rises level by level.
  distances = [
    np.abs(corruptions.corrupt(images, kind, s).astype(float) - images).mean()
    for kind in ("contrast",)
    for s in range(6)
  ]
  assert distances == sorted(distances) and distances[0] == 0
  for bad, message in (
    ({"kind": "blur", "severity": 1}, "corruption kind"),
    ({"kind": "contrast", "severity": 6}, "severity 6"),
    ({"kind": "contrast", "severity": -1}, "severity -1"),
  ):
    with pytest.raises(ValueError, match=message):
      corruptions.corrupt(images, **bad)
  with pytest.raises(ValueError, match="dtype float32"):
    corruptions.corrupt(images.astype(np.float32), "contrast", 1)
