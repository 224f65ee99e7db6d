"""experiments.studies.label_prior: the majority-label reference, counted by hand."""

import numpy as np

from experiments.studies import label_prior


def test_majority_label_accuracy_uses_each_clients_training_majority_by_hand():
  train_labels = np.array([0, 0, 1, 2, 2, 2])
  test_labels = np.array([2, 0, 1, 1])
  train_parts = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([2, 3]), np.array([0]), np.array([], int)]
  test_parts = [np.array([0, 2, 3]), np.array([0]), np.array([2, 3]), np.array([], int), np.array([1])]
  accuracy = label_prior.majority_label_accuracy(train_labels, test_labels, train_parts, test_parts)
  # Client 0: training majority 0, test labels 2, 1, 1 -> 0 (its test majority, 1, would give 2/3).
  # Client 1: majority 2, test label 2 -> 1. Client 2: a tie of 1 and 2 goes to 1; test 1, 1 -> 1.
  # Clients 3 and 4: no test examples, no training examples -> NaN.
  np.testing.assert_array_equal(accuracy[:3], [0.0, 1.0, 1.0])
  assert np.isnan(accuracy[3:]).all()


def test_prior_accuracy_is_high_under_strong_label_skew_and_low_without():
  strong, _ = label_prior.prior_accuracy("configs/default.py", 0, ("data.dirichlet_alpha=0.05",))
  mild, _ = label_prior.prior_accuracy("configs/default.py", 0, ("data.dirichlet_alpha=100.0",))
  # Ten classes: near-uniform clients (α = 100) score about 1/10, near-one-class clients far more.
  assert mild < 0.2 < 0.5 < strong
