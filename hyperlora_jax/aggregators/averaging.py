"""Averaging aggregators: FedIT, head-only (pFedHN) and the identity (local-only)."""

from __future__ import annotations

from hyperlora_jax.aggregators.base import Aggregator, layerwise, stateless, weighted_mean


def fedit() -> Aggregator:
  """FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT").

  A <- Σ_k p_k A_k,  B <- Σ_k p_k B_k  (and every other leaf likewise); clients start the
  next round from (Ā, B̄). Note B̄Ā ≠ Σ p_k B_k A_k: the cross-terms B_i A_j (i ≠ j) are
  the bias HyperLoRA and the exact methods remove.
  Returns:
    A stateless `Aggregator` (plain_average: a server optimizer may step on its delta).
  """
  return stateless("fedit", lambda g, clients, w: (weighted_mean(clients, w), {}))


def identity() -> Aggregator:
  """Keeps the global params unchanged (local-only training: nothing is shared).

  Returns:
    A stateless `Aggregator`.
  """
  return stateless("identity", lambda g, clients, w: (g, {}), heterogeneous_ranks=True)


def head_only() -> Aggregator:
  """Averages every leaf but the LoRA layers, which the server keeps as they are.

  For methods whose clients' factors come from a generator (pFedHN): the generator, not
  the aggregate, carries what clients learn; the kept factors are the generator's base.
  Returns:
    A stateless `Aggregator`.
  """
  return layerwise(
    "head_only", lambda layer, global_layer, w: global_layer, plain_server_step=True, heterogeneous_ranks=True
  )
