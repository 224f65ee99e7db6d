"""Averaging aggregators: FedIT, head-only (pFedHN) and the identity (local-only)."""
from __future__ import annotations

from hyperlora_jax.aggregators.base import Aggregator, no_state, weighted_mean


def fedit() -> Aggregator:
  """FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT").

  A <- Σ_k p_k A_k,  B <- Σ_k p_k B_k  (and the shared head likewise); clients start the
  next round from (Ā, B̄). Note B̄Ā ≠ Σ p_k B_k A_k: the cross-terms B_i A_j (i ≠ j) are
  the bias HyperLoRA and the exact methods remove.
  """
  def aggregate(state, global_trainable, client_trainables, weights):
    del global_trainable
    return weighted_mean(client_trainables, weights), {}, state
  return Aggregator(init=no_state, aggregate=aggregate)


def identity() -> Aggregator:
  """Keeps the global trainable unchanged (local-only training: nothing is shared)."""
  def aggregate(state, global_trainable, client_trainables, weights):
    del client_trainables, weights
    return global_trainable, {}, state
  return Aggregator(init=no_state, aggregate=aggregate)


def head_only() -> Aggregator:
  """Averages every leaf but the LoRA factors, which the server keeps as they are.

  For methods whose clients' factors come from a generator (pFedHN): the generator, not
  the aggregate, carries what clients learn; the kept factors are the generator's base.
  """
  def aggregate(state, global_trainable, client_trainables, weights):
    return {**weighted_mean(client_trainables, weights), "lora": global_trainable["lora"]}, {}, state
  return Aggregator(init=no_state, aggregate=aggregate)
