"""HetLoRA: heterogeneous-rank aggregation by zero-padding and norm weights."""

from __future__ import annotations

import jax.numpy as jnp

from hyperlora_jax.aggregators.base import Aggregator, layerwise, weighted_mean


def product_norms(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """‖a_k b_k‖_F per client without forming the product. a: [C, d_in, r], b: [C, r, d_out] -> [C].

  ‖a b‖_F² = tr(aᵀa b bᵀ) = Σ_ij (aᵀa)_ij (b bᵀ)_ij.

  Args:
    a: [C, d_in, r]; b: [C, r, d_out].
  Returns:
    [C].
  """
  gram_a = jnp.einsum("cir,cis->crs", a, a)
  gram_b = jnp.einsum("cro,cso->crs", b, b)
  return jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b, axis=(1, 2)), 0.0))


def norm_weights(norms: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """w_k ∝ ‖B_kA_k‖_F over the clients with weight > 0 (the data weights if all norms are 0).

  Args:
    norms: [C] ‖B_kA_k‖_F.
    weights: [C] data weights (0: not a participant).
  Returns:
    [C], summing to 1 over the participants.
  """
  participating = weights > 0
  raw = jnp.where(participating, norms, 0.0)
  total = jnp.sum(raw)
  return jnp.where(total > 0, raw / jnp.maximum(total, 1e-30), weights)


def hetlora() -> Aggregator:
  """HetLoRA (Cho et al., EMNLP 2024), sparsity-weighted aggregation.

  Clients of rank r_k hold factors zero-padded to r_max (components beyond r_k are zero,
  see `lora.truncate`). Per layer, the server weights client k by
  w_k = ‖B_kA_k‖_F / Σ_j ‖B_jA_j‖_F and averages the padded factors, A ← Σ w_k A_k,
  B ← Σ w_k B_k; each client truncates the result to its own rank at the start of the next
  round. The head (shared policy) is averaged with the data weights p_k. HetLoRA's optional
  local rank self-pruning is not implemented.
  Returns:
    A stateless `Aggregator` (takes heterogeneous ranks).
  """

  def rule(layer, global_layer, weights):
    return weighted_mean(layer, norm_weights(product_norms(layer["a"], layer["b"]), weights))

  return layerwise("hetlora", rule, plain_server_step=True, heterogeneous_ranks=True)
