"""Product-space helpers shared by the exact, SVD and fair aggregators.

All in Flax kernel layout: a client's update of layer `path` is `s * a_k @ b_k` [d_in, d_out]
(the paper's `s B_k A_k` transposed), see `hyperlora_jax.lora`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_product(a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ_k w_k a_k b_k. a: [C, d_in, r], b: [C, r, d_out], weights: [C] -> [d_in, d_out].

  Args:
    a: [C, d_in, r]; b: [C, r, d_out]; weights: [C].
  Returns:
    [d_in, d_out].
  """
  return jnp.einsum("c,cir,cro->io", weights, a, b)


def best_rank_r(matrix: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """Factors (a, b) with s a b = the best rank-r approximation of `matrix` (Eckart-Young).

  With matrix = U Σ V^T, a = U_r sqrt(Σ_r / s) [d_in, r] and b = sqrt(Σ_r / s) V_r^T [r, d_out]:
  the singular values are split evenly between the factors.

  Args:
    matrix: [d_in, d_out].
    rank: r.
    scale: s > 0.
  Returns:
    (a [d_in, r], b [r, d_out]).
  """
  u, sigma, vt = jnp.linalg.svd(matrix, full_matrices=False)
  root = jnp.sqrt(sigma[:rank] / scale)
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]
