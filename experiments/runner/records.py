"""A round's `metrics.jsonl` record: the round's device metrics on the host, its bytes and ε."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.runner import methods
from experiments.runner.assembly import Experiment
from experiments.runner.settings import RunSettings
from hyperlora_jax import federated, privacy
from hyperlora_jax.hyper import signatures as signatures_lib


# Round metrics counting server parts rejected as non-finite or exploding (`FederatedRound.step`).
REJECTION_METRICS = ("rejected_aggregate", "rejected_server_step", "rejected_plugins")


def number(value: Any) -> int | float:
  """A scalar metric as a Python int (integer dtypes) or float."""
  value = np.asarray(value)
  return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def privacy_spent(settings: RunSettings, rounds: int, method: methods.Method) -> float:
  """ε (at `dp.delta`) of a private run after `rounds` rounds (`hyperlora_jax.privacy`): the
  method's releases per round, and its signatures (sent once) where it sends any.

  Args:
    settings: the run's (its `dp` block, cohort and population).
    rounds: rounds done.
    method: the run's method.
  Returns:
    ε.
  """
  dp = settings.dp
  signature_noise = dp.signature_noise_multiplier if signatures_lib.statistic_kinds(method.signature_kinds) else None
  return privacy.epsilon(
    rounds,
    dp.noise_multiplier,
    settings.fed.clients_per_round,
    settings.num_clients,
    dp.delta,
    signature_noise_multiplier=signature_noise,
    releases_per_round=method.releases_per_round,
  )


def communication_bytes(exp: Experiment, round_index: int, client_ids: np.ndarray) -> tuple[int, int]:
  """(bytes up, bytes down) of one round, summed over its participants
  (`round.communication_bytes`); signatures go up once, in round 0; a pooled-data learner
  communicates nothing.
  Args:
    client_ids: [C] the round's ids, -1 for padding.
  """
  if exp.method.pooled_data:
    return 0, 0
  ranks = [int(exp.client_ranks[c]) for c in client_ids if c >= 0]
  signature_bytes = exp.signatures.size * 4 if round_index == 0 and exp.signatures is not None else 0
  return federated.communication_bytes(exp.fed_round, exp.initial_trainable, round_index, ranks, signature_bytes)
