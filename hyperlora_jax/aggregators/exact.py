"""Exact aggregators: the server reproduces Σ_k p_k s B_k A_k without factor cross-terms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.aggregators.base import Aggregator, Capabilities, aggregate_layers, layerwise, weighted_mean
from hyperlora_jax.aggregators.products import weighted_product


def stack_factors(a_list: list[jax.Array], b_list: list[jax.Array], weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FLoRA's stacking for clients of any ranks r_k (kernel layout).

  Args:
    a_list: K arrays [d_in, r_k]; b_list: K arrays [r_k, d_out]; weights: [K].
  Returns:
    (a_s [d_in, Σr_k] = [p_1 a_1 … p_K a_K], b_s [Σr_k, d_out] = [b_1; …; b_K]) with
    a_s b_s = Σ_k p_k a_k b_k (the paper's B_s A_s, transposed).
  """
  a_s = jnp.concatenate([w * a for w, a in zip(weights, a_list)], axis=1)
  return a_s, jnp.concatenate(b_list, axis=0)


def residual_bytes(layer_shapes, ranks) -> int:
  """FedEx-LoRA: a float32 [d_in, d_out] residual per layer to every participant.

  Args:
    layer_shapes: {layer: (d_in, d_out)}.
    ranks: the participants' ranks (one residual each).
  Returns:
    Bytes down, an int.
  """
  return len(ranks) * sum(4 * d_in * d_out for d_in, d_out in layer_shapes.values())


def stacked_bytes(layer_shapes, ranks) -> int:
  """FLoRA: every participant's (A_k, B_k) goes to every other participant (its own shared
  leaves are already counted); the fresh LoRA of the next round comes from a shared seed.

  Args:
    layer_shapes: {layer: (d_in, d_out)}.
    ranks: the participants' ranks.
  Returns:
    Bytes down, an int.
  """
  per_rank = sum(4 * (d_in + d_out) for d_in, d_out in layer_shapes.values())
  return (len(ranks) - 1) * sum(ranks) * per_rank if ranks else 0


def fedex_lora(scale: float) -> Aggregator:
  """FedEx-LoRA (Singhal et al., ACL 2025).

  Clients restart from (Ā, B̄) and the server adds the residual of the factor average to the
  frozen weights:  W0 <- W0 + s (Σ_k p_k B_k A_k − B̄ Ā),  so  W0' + s B̄Ā = W0 + s Σ p_k B_kA_k
  exactly. The residual is full rank and is sent down every round (counted in bytes down).
  Kernel layout: residual = s (Σ p_k a_k b_k − ā b̄) [d_in, d_out].

  Args:
    scale: the LoRA scale s.
  Returns:
    A stateless `Aggregator` returning the residual as its base delta.
  """

  def rule(layer, global_layer, weights):
    mean = weighted_mean(layer, weights)
    return mean, scale * (weighted_product(layer["a"], layer["b"], weights) - mean["a"] @ mean["b"])

  return layerwise("fedex_lora", rule, plain_server_step=True, base_delta=True, extra_bytes_down=residual_bytes)


def flora(scale: float) -> Aggregator:
  """FLoRA (Wang et al., NeurIPS 2024): stacking.

  B_s = [B_1 … B_K], A_s = [p_1 A_1; …; p_K A_K] gives B_s A_s = Σ_k p_k B_k A_k for any ranks;
  the server merges s B_s A_s into the frozen weights and every client starts the next round
  from a fresh LoRA (A ~ U(±1/√d_in), B = 0, as `lora.init_lora`). Stacking is exactly the
  weighted product sum, computed here directly; the stacked factors are what crosses the wire
  (counted in bytes down). State: the PRNG key for the fresh A.

  Args:
    scale: the LoRA scale s.
  Returns:
    An `Aggregator` with state {"rng"}.
  """

  def init(global_params, rng=None, signature_dim=0):
    del global_params, rng, signature_dim
    return {"rng": jax.random.key_data(jax.random.key(0))}

  def rule(layer, global_layer, weights, key):
    d_in, rank = global_layer["a"].shape
    bound = 1.0 / math.sqrt(d_in)
    fresh = {
      "a": jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound),
      "b": jnp.zeros_like(global_layer["b"]),
    }
    return fresh, scale * weighted_product(layer["a"], layer["b"], weights)

  def aggregate(state, global_params, client_params, weights, context=None):
    del context
    rng, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    names = list(lora_lib.layers(global_params))
    keys = dict(zip(names, jax.random.split(sub, len(names))))
    new_params, merged = aggregate_layers(rule, global_params, client_params, weights, key=keys)
    return new_params, merged, {"rng": jax.random.key_data(rng)}

  return Aggregator(
    init,
    aggregate,
    Capabilities(
      name="flora", plain_server_step=True, heterogeneous_ranks=True, base_delta=True, extra_bytes_down=stacked_bytes
    ),
  )
