"""SVD redistribution: FlexLoRA."""
from __future__ import annotations

from hyperlora_jax.aggregators.base import Aggregator, no_state, weighted_mean
from hyperlora_jax.aggregators.products import best_rank_r, weighted_product


def flexlora(scale: float) -> Aggregator:
  """FlexLoRA (Bai et al., NeurIPS 2024).

  W_g = Σ_k p_k s B_k A_k, truncated SVD to the LoRA rank r; Σ is split as √Σ on each side:
  a = U_r √(Σ_r/s), b = √(Σ_r/s) V_r^T (kernel layout), so s a b is the best rank-r
  approximation of W_g. The head is averaged.
  """
  def aggregate(state, global_trainable, client_trainables, weights):
    new_global = weighted_mean(client_trainables, weights)
    for path, f in client_trainables["lora"].items():
      rank = global_trainable["lora"][path]["a"].shape[1]
      a, b = best_rank_r(scale * weighted_product(f["a"], f["b"], weights), rank, scale)
      new_global["lora"][path] = {"a": a, "b": b}
    return new_global, {}, state
  return Aggregator(init=no_state, aggregate=aggregate)
