"""LoRA-FAIR: a server-side correction of B̄ toward the exact product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hyperlora_jax.aggregators.base import Aggregator, layerwise, weighted_mean
from hyperlora_jax.aggregators.products import weighted_product


def fair_objective(delta_b: jax.Array, a_bar: jax.Array, b_bar: jax.Array, target: jax.Array, lam: float) -> jax.Array:
  """−cos(target, ā (b̄ + Δb)) + λ ‖Δb‖ (kernel layout; target = Σ p_k a_k b_k [d_in, d_out]).

  Args:
    delta_b: [r, d_out].
    a_bar: [d_in, r], b_bar: [r, d_out], the factor averages.
    target: [d_in, d_out].
    lam: λ.
  Returns:
    Scalar.
  """
  candidate = a_bar @ (b_bar + delta_b)
  cos = jnp.vdot(target, candidate) / (jnp.linalg.norm(target) * jnp.linalg.norm(candidate) + 1e-12)
  # safe_norm: the plain norm has a 0/0 gradient at the starting point ΔB = 0.
  return -cos + lam * optax.safe_norm(delta_b, 1e-12)


def fit_delta_b(a_bar, b_bar, target, *, lam: float, steps: int, learning_rate: float) -> jax.Array:
  """ΔB* by `steps` server Adam steps on `fair_objective` from ΔB = 0. Returns [r, d_out].

  Args:
    a_bar: [d_in, r]; b_bar: [r, d_out]; target: [d_in, d_out].
    lam: λ; steps: Adam steps; learning_rate: their step size.
  Returns:
    ΔB* [r, d_out].
  """
  optimizer = optax.adam(learning_rate)
  grad_fn = jax.grad(fair_objective)

  def step(carry, _):
    delta, opt_state = carry
    updates, opt_state = optimizer.update(grad_fn(delta, a_bar, b_bar, target, lam), opt_state)
    return (delta + updates, opt_state), None

  delta0 = jnp.zeros_like(b_bar)
  (delta, _), _ = jax.lax.scan(step, (delta0, optimizer.init(delta0)), None, length=steps)
  return delta


def lora_fair(lam: float = 0.01, steps: int = 20, learning_rate: float = 1e-3) -> Aggregator:
  """LoRA-FAIR (Bian et al., ICCV 2025).

  ΔB* = argmin −cos(Σ p_k B_k A_k, (B̄ + ΔB) Ā) + λ ‖ΔB‖ (λ = 0.01, a few server steps);
  clients get (Ā, B̄ + ΔB*). Only B is corrected, so the broadcast stays rank r.

  Args:
    lam: λ, the weight of ‖ΔB‖.
    steps: server Adam steps per layer and round.
    learning_rate: their step size.
  Returns:
    A stateless layerwise `Aggregator`.
  """

  def rule(layer, global_layer, weights):
    mean = weighted_mean(layer, weights)
    delta = fit_delta_b(
      mean["a"],
      mean["b"],
      weighted_product(layer["a"], layer["b"], weights),
      lam=lam,
      steps=steps,
      learning_rate=learning_rate,
    )
    return {"a": mean["a"], "b": mean["b"] + delta}

  return layerwise("lora_fair", rule, plain_server_step=True)
