"""Global models built from a finished run's personalized models, evaluated on the global test set.

A generator method (HyperLoRA, pFedHN) serves every client from the global model plus its own
offset. Its global model is evaluated as it stands; but the clients' models, averaged, may hold
more. This evaluates, from the run's last checkpoint (no training), three global models:

  run            the run's own global model (`FederatedRound.global_params`), as in metrics.jsonl
  factor mean    Σ p_k θ_k leaf by leaf over the N training clients' starts θ_k (the model each
                 client would start the next round from), LoRA factors averaged separately
  product mean   Σ p_k B_k A_k per LoRA layer, exactly, as one rank-N·r LoRA (`lora.product_mean`);
                 other leaves averaged

with p_k ∝ client k's training examples. If the product mean is far above the run's global model,
the personalized models share something the global model lacks; if the factor mean is below the
product mean, averaging factors loses it (the structural aggregation bias, between clients'
starts rather than their updates).

  python -m experiments.studies.global_from_clients runs/converge_ablate runs/converge --benchmark default \
      --methods hyperlora,fedit

reads each RUNS_DIR/index.json's finished runs of those methods (the sweep's config, overrides and
workdir) and prints one row per run and a mean ± std per (runs dir, method, setting).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sweep import RunSpec, make_config


def global_test_accuracy(exp, frozen) -> Callable[[Any], float]:
  """A function: one model (`trainable`) -> its accuracy on the union of the clients' test
  splits. Compiled once per model shape, so models of the same shape share the compilation."""
  from hyperlora_jax.tasks.image_classification import block_counts

  counts = jax.jit(lambda trainable, block: block_counts(exp.task, frozen, trainable, block, exp.settings.eval_batch))

  def accuracy(trainable) -> float:
    totals = np.array([np.asarray(counts(trainable, block), np.float64) for block in exp.data.global_test_blocks()])
    return float(totals[:, 0].sum() / max(totals[:, 1].sum(), 1.0))

  return accuracy


def client_starts(exp, state) -> tuple[dict, jax.Array]:
  """(every training client's start [N, ...], weights [N] ∝ its training examples)."""
  fed_round = exp.fed_round
  ids = jnp.arange(exp.data.num_clients, dtype=jnp.int32)
  starts = fed_round.client_params(state, ids)
  sizes = np.asarray(exp.data.train_sizes(), np.float32)
  return starts, jnp.asarray(sizes / sizes.sum())


def evaluate_run(config, workdir: str) -> dict[str, float]:
  """{"run", "factor mean", "product mean": global test accuracy} of `workdir`'s last checkpoint."""
  from hyperlora_jax import lora, primitives
  from experiments.runner import workdir as workdir_lib
  from hyperlora_jax.tasks.image_classification import apply_base_delta

  exp, state, _ = workdir_lib.restore_run(config, workdir)
  frozen = apply_base_delta(exp.frozen(), state["base_delta"])
  starts, weights = client_starts(exp, state)
  accuracy = global_test_accuracy(exp, frozen)
  return {
    "run": accuracy(exp.fed_round.global_params(state)),
    "factor mean": accuracy(primitives.weighted_mean(starts, weights)),
    "product mean": accuracy(lora.product_mean(starts, weights)),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dirs", nargs="+")
  parser.add_argument("--benchmark", default=None, help="Only runs of this config.benchmark.")
  parser.add_argument("--methods", default="hyperlora")
  args = parser.parse_args(argv)
  methods = args.methods.split(",")
  groups = collections.defaultdict(list)
  print("| workdir | run's global % | factor mean % | product mean % |\n|---|---|---|---|")
  for runs_dir in args.runs_dirs:
    with open(os.path.join(runs_dir, "index.json")) as f:
      entries = json.load(f)["runs"]
    for entry in entries:
      if entry["status"] != "finished" or entry["method"] not in methods:
        continue
      if args.benchmark and entry.get("benchmark") != args.benchmark:
        continue
      config = make_config(RunSpec(entry["config"], entry["method"], entry["seed"], tuple(entry["overrides"])))
      accuracy = evaluate_run(config, entry["workdir"])
      print(f"| {entry['workdir']} | " + " | ".join(f"{100 * v:.1f}" for v in accuracy.values()) + " |", flush=True)
      groups[os.path.dirname(entry["workdir"])].append(accuracy)
  print("\n| runs | seeds | run's global % | factor mean % | product mean % |\n|---|---|---|---|---|")
  for name, rows in groups.items():
    cells = [f"{100 * np.mean([r[k] for r in rows]):.1f} ± {100 * np.std([r[k] for r in rows]):.1f}" for k in rows[0]]
    print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
