"""Per-round diagnostics of a federated LoRA round: pure functions, computed inside the jitted
round (`FederatedRound.step`) and written to `metrics.jsonl` with the round's metrics.

  aggregation_bias     per LoRA layer, the paper's "structural aggregation bias" of averaging
                       the factors separately: ‖B̄Ā − Σ_k p_k B_k A_k‖_F / ‖Σ_k p_k B_k A_k‖_F,
                       Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k, over the factors the clients returned
                       (0 when every client's A is the same, as in FFA-LoRA, or C = 1).
                       Computed for every method: for one that does not average the factors
                       (FedEx-LoRA, FLoRA, FlexLoRA, HyperLoRA's synthesizer, local-only) it is
                       the error a factor average of the same updates would have made.
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

import functools
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.pytree import Tree

_TINY = 1e-12
METRICS = (
  "aggregation_bias",
  "aggregation_bias_per_layer",
  "client_drift",
  "first_step_loss",
  "last_step_loss",
  "init_lag",
  "generator_offset_norm",
)  # Those a round may report.


def layer_aggregation_bias(a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
  """‖ā b̄ − Σ_k p_k a_k b_k‖_F / ‖Σ_k p_k a_k b_k‖_F for one layer (a scalar).

  Two exact ways, picked by the layer's shapes (static): the cheaper in the values a
  clients-sharded mesh moves (`gram_aggregation_bias` gathers about 3 C r (d_in + d_out) factor
  values; `product_aggregation_bias` all-reduces one [d_in, d_out] matrix). Wide layers with
  few clients (a 7B decoder's projections: 16 clients of rank 16 move 6.3M values instead of
  16.8M) take the Gram matrices; small layers or many clients the product (ViT-B/16's 768 x 768
  at 16 clients of rank 16: 0.59M instead of 1.18M). They agree to float32 rounding.

  Args:
    a: [C, d_in, r]; b: [C, r, d_out] (kernel layout: a b = (B A)ᵀ, the norms are the same).
    weights: [C] summing to 1.
  Returns:
    Scalar.
  """
  clients, d_in, rank = a.shape
  d_out = b.shape[-1]
  if 3 * clients * rank * (d_in + d_out) < d_in * d_out:
    return gram_aggregation_bias(a, b, weights)
  return product_aggregation_bias(a, b, weights)


def product_aggregation_bias(a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
  """`layer_aggregation_bias` by the products: the exact mean Σ_k p_k a_k b_k is one contraction
  over (k, r) (no [C, d_in, d_out] product is formed; one [d_in, d_out] matrix is).

  Args:
    a: [C, d_in, r]; b: [C, r, d_out].
    weights: [C] summing to 1.
  Returns:
    Scalar.
  """
  mean_a = jnp.einsum("k,kir->ir", weights, a)
  mean_b = jnp.einsum("k,kro->ro", weights, b)
  exact = jnp.einsum("k,kir,kro->io", weights, a, b)
  return jnp.linalg.norm(mean_a @ mean_b - exact) / jnp.maximum(jnp.linalg.norm(exact), _TINY)


def gram_aggregation_bias(a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
  """`layer_aggregation_bias` by Gram matrices: with Σ p_k = 1 the difference is
  Σ_k p_k (ā − a_k) b_k, and ‖Σ_k u_k b_k‖²_F = Σ_kj tr(u_kᵀ u_j · b_j b_kᵀ), so both norms come
  from [C, r, C, r] Gram matrices of the factors and no [d_in, d_out] matrix is formed. The
  difference is built from the deviations ā − a_k, not as a difference of two large products;
  products in float32 at full precision (TPUs' default would round them to bfloat16).

  Args:
    a: [C, d_in, r]; b: [C, r, d_out].
    weights: [C] summing to 1.
  Returns:
    Scalar.
  """
  a, b, weights = a.astype(jnp.float32), b.astype(jnp.float32), weights.astype(jnp.float32)
  einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  mean_a = einsum("k,kir->ir", weights, a)
  deviations = weights[:, None, None] * (mean_a[None] - a)  # p_k (ā − a_k) [C, d_in, r].
  scaled = weights[:, None, None] * a  # p_k a_k [C, d_in, r].
  gram_b = einsum("kro,jso->krjs", b, b)  # [C, r, C, r].
  bias_sq = jnp.sum(einsum("kir,jis->krjs", deviations, deviations) * gram_b)
  exact_sq = jnp.sum(einsum("kir,jis->krjs", scaled, scaled) * gram_b)
  return jnp.sqrt(jnp.maximum(bias_sq, 0.0)) / jnp.maximum(jnp.sqrt(jnp.maximum(exact_sq, 0.0)), _TINY)


def aggregation_bias(client_params: Tree, weights: jax.Array) -> dict[str, jax.Array]:
  """{layer path: `layer_aggregation_bias`} for every LoRA layer of [C, ...] `client_params`.

  Args:
    client_params: trainable trees with [C, ...] leaves.
    weights: [C] summing to 1.
  Returns:
    {layer path: scalar}.
  """
  return {
    path: layer_aggregation_bias(layer["a"], layer["b"], weights)
    for path, layer in lora_lib.layers(client_params).items()
  }


def _weighted_sum(weights: jax.Array, per_client: jax.Array) -> jax.Array:
  """Σ_k p_k x_k over the leading axis, as a reduction: XLA fuses the producer of
  `per_client` into it, so no [C, ...] temporary is made (a dot would need one)."""
  return jnp.sum(weights.reshape((-1,) + (1,) * (per_client.ndim - 1)) * per_client, axis=0)


def client_drift(trained: Tree, starts: Tree, weights: jax.Array) -> jax.Array:
  """sqrt(Σ_k p_k ‖Δ_k − Δ̄‖²) / ‖Δ̄‖ with Δ_k = trained_k − starts_k (a scalar), over all
  leaves together.

  trained, starts: [C, ...] trees; weights [C] summing to 1 (0 = not counted).
  Returns:
    Scalar.
  """
  deltas = jax.tree.leaves(jax.tree.map(lambda t, s: t.astype(jnp.float32) - s.astype(jnp.float32), trained, starts))
  means = [_weighted_sum(weights, d) for d in deltas]  # Δ̄, leaf by leaf.
  spread = sum(_weighted_sum(weights, jnp.square(d - m)).sum() for d, m in zip(deltas, means))
  mean_norm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in means))
  return jnp.sqrt(spread) / jnp.maximum(mean_norm, _TINY)


def offset_norm(offsets: Tree, weights: jax.Array) -> jax.Array:
  """Σ_k p_k ‖o_k‖_F over all leaves of the [C, ...] offsets (a scalar).

  Args:
    offsets: pytree of [C, ...] arrays.
    weights: [C] summing to 1.
  Returns:
    Scalar.
  """
  squares = sum(
    jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(offsets)
  )  # [C]
  return weights @ jnp.sqrt(squares)


def round_diagnostics(
  trained: Tree, starts: Tree, weights: jax.Array, client_metrics: dict, offsets: Tree | None = None
) -> dict[str, Any]:
  """The diagnostics of one round (module docstring), as round metrics.

  Args:
    trained, starts: [C, ...] the clients' returned params and where each started.
    weights: [C] normalized aggregation weights.
    client_metrics: the client update's metrics, with "first_loss" and "last_loss" [C].
    offsets: [C, ...] generator offsets, or None.
  Returns:
    {"aggregation_bias": mean over layers, "aggregation_bias_per_layer": {path: ...} (only with
    LoRA layers), "client_drift", "first_step_loss", "last_step_loss", "init_lag" (first −
    last), "generator_offset_norm" (only with offsets)}, scalars.
  """
  first = weights @ jnp.where(weights > 0, client_metrics["first_loss"], 0.0)
  last = weights @ jnp.where(weights > 0, client_metrics["last_loss"], 0.0)
  diagnostics: dict[str, Any] = {
    "client_drift": client_drift(trained, starts, weights),
    "first_step_loss": first,
    "last_step_loss": last,
    "init_lag": first - last,
  }
  per_layer = aggregation_bias(trained, weights)
  if per_layer:
    diagnostics["aggregation_bias"] = jnp.mean(jnp.stack(list(per_layer.values())))
    diagnostics["aggregation_bias_per_layer"] = per_layer
  if offsets is not None and jax.tree.leaves(offsets):
    diagnostics["generator_offset_norm"] = offset_norm(offsets, weights)
  return diagnostics


__all__ = ["METRICS", "aggregation_bias", "client_drift", "layer_aggregation_bias", "offset_norm", "round_diagnostics"]
