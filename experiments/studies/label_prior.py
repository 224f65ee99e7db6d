"""How far a client's label distribution alone goes: the accuracy of predicting, for every test
example of a client, the most frequent label of that client's training examples.

Under strong label skew a client's signature (its label histogram) names its one or two classes,
so a generator that reads it can score well with zero local steps without having learned
anything about the images. This is the reference that separates the two:

  python -m experiments.studies.label_prior --configs configs/label_skew.py:alpha=0.1 \
      --configs configs/default.py --seeds 0,1,2
  python -m experiments.studies.label_prior --grid data.dirichlet_alpha=1.0,0.5,0.1

prints, per config and over the seeds, the mean (± std) over clients of this majority-label
accuracy, for the training clients and for the held-out new clients (`data.heldout_clients`).
It reads only labels; no model is built.
"""

from __future__ import annotations

import argparse

import numpy as np

from experiments.sweep import load_config_file, parse_override, set_field


def majority_label_accuracy(
  train_labels: np.ndarray, test_labels: np.ndarray, train_parts: list[np.ndarray], test_parts: list[np.ndarray]
) -> np.ndarray:
  """[num_clients] fraction of client k's test labels (`test_labels[test_parts[k]]`) equal to the
  most frequent label of its training labels (`train_labels[train_parts[k]]`, ties to the
  smallest label); NaN for a client with no test examples or no training examples."""
  accuracy = np.full(len(train_parts), np.nan)
  for k, (train_idx, test_idx) in enumerate(zip(train_parts, test_parts)):
    if len(train_idx) and len(test_idx):
      majority = np.argmax(np.bincount(train_labels[train_idx]))
      accuracy[k] = np.mean(test_labels[test_idx] == majority)
  return accuracy


def prior_accuracy(config_spec: str, seed: int, overrides: tuple[str, ...] = ()) -> tuple[float, float | None]:
  """(training clients' mean, new clients' mean or None) of `majority_label_accuracy` for a
  config file spec (path[:arg]) with FIELD=VALUE `overrides` at `seed`."""
  from experiments.runner.federated_data import build_federated_data
  from experiments.runner.settings import data_block

  config = load_config_file(config_spec)
  config.seed = seed
  for override in overrides:
    set_field(config, *parse_override(override))
  data = build_federated_data(data_block(config), config.seed, config.eval_batch)
  train, test = data.train_pool.labels, data.test_pool.labels
  clients = np.nanmean(majority_label_accuracy(train, test, data.train_parts, data.test_parts))
  new = (
    np.nanmean(majority_label_accuracy(train, test, data.new_train_parts, data.new_test_parts))
    if data.new_train_parts
    else None
  )
  return float(clients), None if new is None else float(new)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", action="append", default=None)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every config.")
  parser.add_argument("--grid", default=None, help="FIELD=V1,V2,...: one row per value.")
  args = parser.parse_args(argv)
  print("| config | clients: majority-label accuracy % | new clients % |\n|---|---|---|")
  field, _, values = (args.grid or "").partition("=")
  settings = [(f"{field}={v}",) for v in values.split(",")] if args.grid else [()]
  for spec, setting in ((spec, setting) for spec in args.configs or ["configs/default.py"] for setting in settings):
    overrides = (*args.set, *setting)
    results = [prior_accuracy(spec, int(seed), overrides) for seed in args.seeds.split(",")]
    cells = []
    for values in zip(*results):
      values = [v for v in values if v is not None]
      cells.append(f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}" if values else "–")
    print(f"| {' '.join((spec, *overrides))} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
