"""Per-round diagnostics of a federated LoRA round: pure functions, computed inside the jitted
round (`FederatedRound.step`) and written to `metrics.jsonl` with the round's metrics.

  aggregation_bias     per LoRA layer, the paper's "structural aggregation bias" of averaging
                       the factors separately: ‖B̄Ā − Σ_k p_k B_k A_k‖_F / ‖Σ_k p_k B_k A_k‖_F,
                       Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k, over the factors the clients returned
                       (0 when every client's A is the same, as in FFA-LoRA, or C = 1).
  client_drift         how far the clients' updates Δ_k = trained_k − start_k spread around
                       their weighted mean Δ̄: sqrt(Σ_k p_k ‖Δ_k − Δ̄‖²) / ‖Δ̄‖, over every
                       trainable leaf (0: all clients moved alike).
  first/last step loss the p-weighted mean loss of the clients' first and last local steps;
                       their difference is the initialization lag that a generator (a better
                       start) should shrink.
  generator_offset_norm  Σ_k p_k ‖o_k‖_F of the generator's offsets (methods with one).

The synthesizer's weight entropy and the corrector's gate are the HyperLoRA aggregator's own
metrics (`hyper/synthesis.py`). Here, weights p_k are the round's normalized aggregation
weights (0 for padding, non-finite and dropped clients).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib

Tree = Any
_TINY = 1e-12
METRICS = ("aggregation_bias", "aggregation_bias_per_layer", "client_drift", "first_step_loss",
           "last_step_loss", "init_lag", "generator_offset_norm")  # Those a round may report.


def layer_aggregation_bias(a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
  """‖ā b̄ − Σ_k p_k a_k b_k‖_F / ‖Σ_k p_k a_k b_k‖_F for one layer (a scalar).

  a [C, d_in, r], b [C, r, d_out] (kernel layout: a b = (B A)ᵀ, the norms are the same);
  weights [C] summing to 1. The exact mean Σ_k p_k a_k b_k is one contraction over (k, r),
  so no [C, d_in, d_out] product is formed.
  """
  mean_a = jnp.einsum("k,kir->ir", weights, a)
  mean_b = jnp.einsum("k,kro->ro", weights, b)
  exact = jnp.einsum("k,kir,kro->io", weights, a, b)
  return jnp.linalg.norm(mean_a @ mean_b - exact) / jnp.maximum(jnp.linalg.norm(exact), _TINY)


def aggregation_bias(client_params: Tree, weights: jax.Array) -> dict[str, jax.Array]:
  """{layer path: `layer_aggregation_bias`} for every LoRA layer of [C, ...] `client_params`."""
  return {path: layer_aggregation_bias(layer["a"], layer["b"], weights)
          for path, layer in lora_lib.layers(client_params).items()}


def _flat_clients(tree: Tree) -> jax.Array:
  """[C, P]: every [C, ...] leaf of `tree` flattened per client and concatenated."""
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], axis=1)


def client_drift(trained: Tree, starts: Tree, weights: jax.Array) -> jax.Array:
  """sqrt(Σ_k p_k ‖Δ_k − Δ̄‖²) / ‖Δ̄‖ with Δ_k = trained_k − starts_k (a scalar).

  trained, starts: [C, ...] trees; weights [C] summing to 1 (0 = not counted).
  """
  updates = _flat_clients(trained) - _flat_clients(starts)                     # [C, P]
  mean_update = weights @ updates                                              # [P]
  spread = weights @ jnp.sum(jnp.square(updates - mean_update), axis=1)
  return jnp.sqrt(spread) / jnp.maximum(jnp.linalg.norm(mean_update), _TINY)


def offset_norm(offsets: Tree, weights: jax.Array) -> jax.Array:
  """Σ_k p_k ‖o_k‖_F over all leaves of the [C, ...] offsets (a scalar)."""
  return weights @ jnp.linalg.norm(_flat_clients(offsets), axis=1)


def round_diagnostics(trained: Tree, starts: Tree, weights: jax.Array, client_metrics: dict,
                      offsets: Tree | None = None) -> dict[str, Any]:
  """The diagnostics of one round (module docstring), as round metrics.

  trained, starts: [C, ...] the clients' returned params and where each started; weights [C]
  normalized aggregation weights; client_metrics: the client update's metrics with
  "first_loss" and "last_loss" [C]; offsets: [C, ...] generator offsets or None.
  Returns {"aggregation_bias": mean over layers, "aggregation_bias_per_layer": {path: ...}
  (only with LoRA layers), "client_drift", "first_step_loss", "last_step_loss",
  "init_lag" (first − last), "generator_offset_norm" (only with offsets)}.
  """
  first = weights @ jnp.where(weights > 0, client_metrics["first_loss"], 0.0)
  last = weights @ jnp.where(weights > 0, client_metrics["last_loss"], 0.0)
  diagnostics = {"client_drift": client_drift(trained, starts, weights),
                 "first_step_loss": first, "last_step_loss": last, "init_lag": first - last}
  per_layer = aggregation_bias(trained, weights)
  if per_layer:
    diagnostics["aggregation_bias"] = jnp.mean(jnp.stack(list(per_layer.values())))
    diagnostics["aggregation_bias_per_layer"] = per_layer
  if offsets is not None and jax.tree.leaves(offsets):
    diagnostics["generator_offset_norm"] = offset_norm(offsets, weights)
  return diagnostics


__all__ = ["METRICS", "aggregation_bias", "client_drift", "layer_aggregation_bias", "offset_norm", "round_diagnostics"]
