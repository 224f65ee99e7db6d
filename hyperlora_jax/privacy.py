"""Client-level differential privacy: the Gaussian mechanism on clipped client updates, and its
accounting with Google's `dp_accounting` (RDP).

Mechanism (DP-FedAvg, McMahan et al., ICLR 2018). Each round samples `sampled` of `population`
clients uniformly without replacement. A *release* is the uniform mean over the n participants
of per-client vectors x_k clipped to L2 norm C, plus Gaussian noise of std σ·C/n on every
coordinate (`clipped_mean_weights`, `add_gaussian_noise`). Neighbouring datasets differ in one
client's data (REPLACE_ONE, the relation this sampler's accounting is defined for): the clipped
sum moves by at most 2C, so a release is a Gaussian mechanism with noise multiplier σ/2
relative to its sensitivity.

Several releases per round. DP-FedAvg makes one (the clients' updates). HyperLoRA under DP
makes m = 1 + (1 + generator steps): its product-space update, the generator's mean factor
change (the deviation targets' reference) and each clipped per-client generator gradient, each
with multiplier σ relative to its own clip norm, the later ones computed from the earlier ones.
An adaptive composition of Gaussian mechanisms with multipliers z_i is exactly as private as
one Gaussian mechanism with multiplier (Σ z_i⁻²)^(-1/2) (Gaussian DP composes as
μ = (Σ μ_i²)^(1/2); Dong, Roth, Su, JRSS-B 2022, Cor. 3.3), and that mechanism's dominating pair
is what subsampling amplifies (Zhu, Dong, Wang, AISTATS 2022): the round is one sampled Gaussian
event with multiplier σ/√m.

The uniform mean divides by n, the participants with weight > 0. The accounting takes n as
fixed by the sampler: a client whose update is non-finite (left out by the round) or dropped
(`faults.dropout`) changes n, which this bound does not cover.

Signatures (HyperLoRA's data statistics) are sent once, clipped to norm C_s with noise std
σ_s·C_s: one more Gaussian mechanism (multiplier σ_s/2), composed with the rounds. Without
noise they are not private (ε = ∞).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hyperlora_jax.pytree import Tree


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
  """min(1, C/‖x‖): what scales a vector of norm ‖x‖ into the ball of radius C. [...] -> [...].

  Args:
    norms: any shape, ‖x‖ >= 0.
    clip_norm: C > 0.
  Returns:
    `norms`' shape, in (0, 1].
  """
  return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def clipped_mean_weights(squared_norms: jax.Array, weights: jax.Array, clip_norm: float) -> tuple[jax.Array, jax.Array]:
  """Weights w_k = [p_k > 0] · min(1, C/‖x_k‖) / n: Σ_k w_k x_k is the uniform mean over the n
  participants of the x_k clipped to norm C. squared_norms, weights [C] -> (w [C], n []).

  Args:
    squared_norms: [C] ‖x_k‖².
    weights: [C] (> 0: a participant).
    clip_norm: C.
  Returns:
    (w [C], n: the number of participants, a scalar).
  """
  present = (weights > 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(present), 1.0)
  return present * clip_factors(jnp.sqrt(squared_norms), clip_norm) / count, count


def squared_norms(tree: Tree) -> jax.Array:
  """‖x_k‖² over all leaves of a [C, ...] tree -> [C].

  Args:
    tree: pytree of [C, ...] arrays.
  Returns:
    [C] float32.
  """
  return jnp.asarray(sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(tree)))


def add_gaussian_noise(tree: Tree, std: jax.Array | float, key: jax.Array) -> Tree:
  """`tree` plus independent N(0, std²) on every coordinate (one key per leaf, split from `key`).

  Args:
    tree: any pytree of float arrays.
    std: the noise standard deviation (scalar).
    key: a PRNG key.
  Returns:
    `tree` with noise added, each leaf's dtype.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def private_mean(values: Tree, weights: jax.Array, clip_norm: float, noise_multiplier: float, key: jax.Array) -> Tree:
  """One release: the uniform mean over participants (weights > 0) of `values` [C, ...] clipped
  to norm `clip_norm` jointly over all leaves, plus N(0, (σ C / n)²) noise. -> [...].

  Args:
    values: pytree of [C, ...] arrays.
    weights: [C] (> 0: a participant).
    clip_norm: C, the joint L2 bound per client.
    noise_multiplier: σ.
    key: the noise's PRNG key.
  Returns:
    pytree of [...] arrays.
  """
  mean_weights, count = clipped_mean_weights(squared_norms(values), weights, clip_norm)
  mean = jax.tree.map(lambda x: jnp.tensordot(mean_weights.astype(x.dtype), x, axes=1), values)
  return add_gaussian_noise(mean, noise_multiplier * clip_norm / count, key)


def effective_noise_multiplier(noise_multiplier: float, releases_per_round: int) -> float:
  """σ/√m: the one Gaussian mechanism as private as m releases of multiplier σ (module docstring).

  Args:
    noise_multiplier: σ of each release.
    releases_per_round: m >= 1.
  Returns:
    σ / √m.
  """
  return noise_multiplier / math.sqrt(releases_per_round)


def round_event(noise_multiplier: float, sampled: int, population: int, releases_per_round: int = 1):
  """One round's `dp_accounting` event.

  Args:
    noise_multiplier: σ.
    sampled: clients per round, drawn without replacement from `population`, all clients.
    releases_per_round: m, composed into one Gaussian of σ / √m.
  Returns:
    A `dp_accounting.DpEvent`.
  """
  from dp_accounting import dp_event

  multiplier = effective_noise_multiplier(noise_multiplier, releases_per_round)
  return dp_event.SampledWithoutReplacementDpEvent(population, sampled, dp_event.GaussianDpEvent(multiplier / 2))


def epsilon(
  rounds: int,
  noise_multiplier: float,
  sampled: int,
  population: int,
  delta: float,
  signature_noise_multiplier: float | None = None,
  releases_per_round: int = 1,
) -> float:
  """ε at `delta` after `rounds` rounds of `releases_per_round` releases each (and the
  signatures, when given: None = none sent, 0 = sent without noise, so ε = ∞).

  Args:
    rounds: rounds run.
    noise_multiplier: σ of each release.
    sampled, population: clients per round, all clients.
    delta: δ.
    signature_noise_multiplier: σ of the signatures' one release (None: not sent).
    releases_per_round: m.
  Returns:
    ε (RDP accountant), float('inf') for a release without noise.
  """
  import dp_accounting
  from dp_accounting import dp_event

  if noise_multiplier <= 0 or signature_noise_multiplier == 0:
    return math.inf
  events = [
    dp_event.SelfComposedDpEvent(round_event(noise_multiplier, sampled, population, releases_per_round), rounds)
  ]
  if signature_noise_multiplier is not None:
    events.append(dp_event.GaussianDpEvent(signature_noise_multiplier / 2))
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  accountant.compose(dp_event.ComposedDpEvent(events))
  return float(accountant.get_epsilon(delta))
