"""Exact aggregators: the server reproduces Σ_k p_k s B_k A_k without factor cross-terms."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.aggregators.base import Aggregator, no_state, weighted_mean
from hyperlora_jax.aggregators.products import weighted_product


def stack_factors(a_list: list[jax.Array], b_list: list[jax.Array],
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FLoRA's stacking for clients of any ranks r_k (kernel layout).

  Args:
    a_list: K arrays [d_in, r_k]; b_list: K arrays [r_k, d_out]; weights: [K].
  Returns:
    (a_s [d_in, Σr_k] = [p_1 a_1 … p_K a_K], b_s [Σr_k, d_out] = [b_1; …; b_K]) with
    a_s b_s = Σ_k p_k a_k b_k (the paper's B_s A_s, transposed).
  """
  a_s = jnp.concatenate([w * a for w, a in zip(weights, a_list)], axis=1)
  return a_s, jnp.concatenate(b_list, axis=0)


def fedex_lora(scale: float) -> Aggregator:
  """FedEx-LoRA (Singhal et al., ACL 2025).

  Clients restart from (Ā, B̄) and the server adds the residual of the factor average to the
  frozen weights:  W0 <- W0 + s (Σ_k p_k B_k A_k − B̄ Ā),  so  W0' + s B̄Ā = W0 + s Σ p_k B_kA_k
  exactly. The residual is full rank and is sent down every round (counted in bytes down).
  Kernel layout: residual = s (Σ p_k a_k b_k − ā b̄) [d_in, d_out].
  """
  def aggregate(state, global_trainable, client_trainables, weights):
    del global_trainable
    mean = weighted_mean(client_trainables, weights)
    residual = {
        path: scale * (weighted_product(f["a"], f["b"], weights) - mean["lora"][path]["a"] @ mean["lora"][path]["b"])
        for path, f in client_trainables["lora"].items()}
    return mean, residual, state
  return Aggregator(init=no_state, aggregate=aggregate)


def flora(scale: float) -> Aggregator:
  """FLoRA (Wang et al., NeurIPS 2024): stacking.

  B_s = [B_1 … B_K], A_s = [p_1 A_1; …; p_K A_K] gives B_s A_s = Σ_k p_k B_k A_k for any ranks;
  the server merges s B_s A_s into the frozen weights and every client starts the next round
  from a fresh LoRA (A random, B = 0). Stacking is exactly the weighted product sum, computed
  here directly; the stacked factors are what crosses the wire (counted in bytes down).
  State: the PRNG key for the fresh A.
  """
  def init(global_trainable):
    del global_trainable
    return {"rng": jax.random.key_data(jax.random.key(0))}

  def aggregate(state, global_trainable, client_trainables, weights):
    merged = {path: scale * weighted_product(f["a"], f["b"], weights)
              for path, f in client_trainables["lora"].items()}
    rng, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    targets = {path: (f["a"].shape[0], f["b"].shape[1]) for path, f in global_trainable["lora"].items()}
    rank = next(iter(global_trainable["lora"].values()))["a"].shape[1]
    fresh = lora_lib.init_lora(sub, targets, rank)
    new_global = {**weighted_mean(client_trainables, weights), "lora": fresh}
    return new_global, merged, {"rng": jax.random.key_data(rng)}
  return Aggregator(init=init, aggregate=aggregate)
