"""SVD redistribution: FlexLoRA."""

from __future__ import annotations

from hyperlora_jax.aggregators.base import Aggregator, layerwise
from hyperlora_jax.aggregators.products import best_rank_r, weighted_product


def flexlora(scale: float) -> Aggregator:
  """FlexLoRA (Bai et al., NeurIPS 2024).

  W_g = Σ_k p_k s B_k A_k, truncated SVD to the LoRA rank r; Σ is split as √Σ on each side:
  a = U_r √(Σ_r/s), b = √(Σ_r/s) V_r^T (kernel layout), so s a b is the best rank-r
  approximation of W_g. Other leaves (a head) are averaged. A client of rank r_k keeps the
  first r_k components: the best rank-r_k approximation.

  Args:
    scale: the LoRA scale s.
  Returns:
    A stateless `Aggregator` (takes heterogeneous ranks).
  """

  def rule(layer, global_layer, weights):
    a, b = best_rank_r(scale * weighted_product(layer["a"], layer["b"], weights), global_layer["a"].shape[1], scale)
    return {"a": a, "b": b}

  return layerwise("flexlora", rule, plain_server_step=True, heterogeneous_ranks=True)
