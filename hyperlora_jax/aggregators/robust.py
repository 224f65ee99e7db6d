"""Robust and private aggregation, on LoRA factors or in the LoRA product space.

Statistics over the participating clients (weight > 0) of a stack x [C, n]:
  "median"            coordinate-wise median (unweighted);
  "trimmed_mean"      coordinate-wise mean of what remains after dropping the ⌊trim·n⌋ largest
                      and smallest values (unweighted);
  "geometric_median"  argmin_z Σ_k p_k ‖x_k − z‖ (Weiszfeld iterations from the weighted mean),
                      over whole vectors: one per client in factor space, one per client and
                      layer in product space.

`robust_factors(rule)` applies the statistic to the returned factors (and every other leaf):
FedIT's average made robust. `robust_products(rule, scale)` applies it per LoRA layer to the
products s a_k b_k [d_in, d_out], then keeps the best rank-r approximation (FlexLoRA's
re-factorization, singular values split evenly), so the statistic never sees factor gauges;
other leaves as in factor space. `clip_updates(aggregator, max_norm)` clips each client's
update θ_k − θ⁰_k (from its start, `AggregationContext.client_starts`, else the global
params) to L2 norm `max_norm` over all its leaves before `aggregator` sees it.
`dp_fedavg(clip_norm, noise_multiplier)` is DP-FedAvg (McMahan et al., ICLR 2018): clipped
updates, uniform weights over the n participants, Gaussian noise of std
noise_multiplier · clip_norm / n on every coordinate of the average.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.aggregators.base import AggregationContext, Aggregator, Capabilities, aggregate_layers, no_state
from hyperlora_jax.aggregators.products import best_rank_r
from hyperlora_jax.primitives import weighted_mean
from hyperlora_jax.privacy import add_gaussian_noise, clip_factors, squared_norms
from hyperlora_jax.pytree import Tree

ROBUST_RULES = ("median", "trimmed_mean", "geometric_median")


def coordinate_median(x: jax.Array, present: jax.Array) -> jax.Array:
  """[C, n], [C] bool -> [n]: the median over present clients, coordinate by coordinate.

  Args:
    x: [C, n] stacked values; present: [C] bool.
  Returns:
    [n].
  """
  return jnp.nanmedian(jnp.where(present[:, None], x, jnp.nan), axis=0)


def trimmed_mean(x: jax.Array, present: jax.Array, trim: float) -> jax.Array:
  """[C, n], [C] bool -> [n]: per coordinate, the mean of the present values without the
  ⌊trim · n_present⌋ largest and smallest.

  Args:
    x: [C, n] stacked values; present: [C] bool; trim: the fraction cut at each end.
  Returns:
    [n].
  """
  count = jnp.sum(present)
  cut = jnp.floor(trim * count).astype(jnp.int32)
  ordered = jnp.sort(jnp.where(present[:, None], x, jnp.inf), axis=0)  # Absent clients sort last.
  rank = jnp.arange(x.shape[0])[:, None]
  kept = (rank >= cut) & (rank < count - cut)
  return jnp.sum(jnp.where(kept, ordered, 0.0), axis=0) / jnp.maximum(jnp.sum(kept, axis=0), 1)


def geometric_median(x: jax.Array, weights: jax.Array, iterations: int = 50, eps: float = 1e-8) -> jax.Array:
  """[C, n], [C] (sum 1, 0 = absent) -> [n]: argmin_z Σ_k w_k ‖x_k − z‖ by Weiszfeld's iterations.

  Args:
    x: [C, n]; weights: [C] (sum 1, 0 = absent).
    iterations: Weiszfeld steps; eps: the smallest distance divided by.
  Returns:
    [n].
  """

  def step(z, _):
    inverse = weights / jnp.maximum(jnp.linalg.norm(x - z, axis=1), eps)
    return (inverse @ x) / jnp.maximum(jnp.sum(inverse), eps), None

  z, _ = jax.lax.scan(step, weights @ x, None, length=iterations)
  return z


def robust_statistic(rule: str, x: jax.Array, weights: jax.Array, trim: float = 0.1) -> jax.Array:
  """The `rule` statistic of the stack x [C, n] over clients with weight > 0 -> [n].

  Args:
    rule: "median", "trimmed_mean" or "geometric_median".
    x: [C, n]; weights: [C].
    trim: for "trimmed_mean".
  Returns:
    [n].
  """
  present = weights > 0
  if rule == "median":
    return coordinate_median(x, present)
  if rule == "trimmed_mean":
    return trimmed_mean(x, present, trim)
  if rule == "geometric_median":
    return geometric_median(x, weights)
  raise ValueError(f"robust rule {rule!r}; allowed: {ROBUST_RULES}")


def _flat(tree: Tree) -> tuple[jax.Array, Any]:
  """[C, ...] leaves -> ([C, n] one vector per client, unflatten: [n] -> tree)."""
  leaves, treedef = jax.tree.flatten(tree)
  shapes = [leaf.shape[1:] for leaf in leaves]
  sizes = [math.prod(s) for s in shapes]
  stacked = jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)

  def unflatten(vector):
    parts, start = [], 0
    for shape, size in zip(shapes, sizes):
      parts.append(vector[start : start + size].reshape(shape))
      start += size
    return jax.tree.unflatten(treedef, parts)

  return stacked, unflatten


def _robust_tree(rule: str, tree: Tree, weights: jax.Array, trim: float) -> Tree:
  """The statistic over clients of a [C, ...] tree: whole vectors for the geometric median,
  each leaf coordinate-wise otherwise."""
  if rule == "geometric_median":
    stacked, unflatten = _flat(tree)
    return unflatten(geometric_median(stacked, weights))
  return jax.tree.map(
    lambda x: robust_statistic(rule, x.reshape(x.shape[0], -1), weights, trim).reshape(x.shape[1:]), tree
  )


def robust_factors(rule: str, trim: float = 0.1) -> Aggregator:
  """FedIT made robust: the `rule` statistic of the clients' params, leaf by leaf.

  Args:
    rule: as `robust_statistic`; trim: for "trimmed_mean".
  Returns:
    A stateless `Aggregator`.
  """
  if rule not in ROBUST_RULES:
    raise ValueError(f"robust rule {rule!r}; allowed: {ROBUST_RULES}")

  def aggregate(state, global_params, client_params, weights, context=None):
    del global_params, context
    return _robust_tree(rule, client_params, weights, trim), {}, state

  return Aggregator(no_state, aggregate, Capabilities(name=f"robust_factors[{rule}]", heterogeneous_ranks=False))


def robust_products(rule: str, scale: float, trim: float = 0.1) -> Aggregator:
  """The `rule` statistic of s a_k b_k per LoRA layer, then the best rank-r approximation
  (as FlexLoRA); other leaves as `robust_factors`.

  Args:
    rule: as `robust_statistic`; scale: the LoRA scale s; trim: for "trimmed_mean".
  Returns:
    A stateless `Aggregator`.
  """
  if rule not in ROBUST_RULES:
    raise ValueError(f"robust rule {rule!r}; allowed: {ROBUST_RULES}")

  def rule_fn(layer, global_layer, weights):
    rank = global_layer["a"].shape[-1]
    products = scale * jnp.einsum("cir,cro->cio", layer["a"], layer["b"])
    flat = products.reshape(products.shape[0], -1)
    statistic = robust_statistic(rule, flat, weights, trim).reshape(products.shape[1:])
    a, b = best_rank_r(statistic, rank, scale)
    return {"a": a, "b": b}

  def aggregate(state, global_params, client_params, weights, context=None):
    del context
    new_params, _ = aggregate_layers(rule_fn, global_params, client_params, weights)
    robust_rest = _robust_tree(rule, without_layers(client_params), weights, trim)
    return merge_rest(new_params, robust_rest), {}, state

  return Aggregator(no_state, aggregate, Capabilities(name=f"robust_products[{rule}]", plain_server_step=True))


def without_layers(tree: Tree) -> Tree:
  """`tree` without its LoRA layers (nested dicts; {} where nothing remains).

  Args:
    tree: nested dicts.
  Returns:
    The nested dicts of its other leaves.
  """
  if lora_lib.is_layer(tree):
    return {}
  if isinstance(tree, dict):
    return {k: without_layers(v) for k, v in tree.items()}
  return tree


def merge_rest(tree: Tree, rest: Tree) -> Tree:
  """`tree` with the non-layer leaves of `rest` (`without_layers`-shaped) put in.

  Args:
    tree: nested dicts holding LoRA layers.
    rest: `without_layers(tree)`-shaped leaves to put in.
  Returns:
    A new tree.
  """
  if isinstance(rest, dict) and isinstance(tree, dict) and not lora_lib.is_layer(tree):
    return {k: (merge_rest(v, rest[k]) if k in rest else v) for k, v in tree.items()}
  return tree if isinstance(rest, dict) else rest


def clip_to_norm(client_params: Tree, starts: Tree, max_norm: float) -> tuple[Tree, jax.Array]:
  """Each client's params moved so that ‖θ_k − θ⁰_k‖₂ (all leaves) <= max_norm.
  Returns (clipped [C, ...], the update norms before clipping [C]).

  Args:
    client_params: the clients' trained trees, [C, ...] leaves.
    starts: their starts, [C, ...] leaves.
    max_norm: the L2 bound on each client's whole update.
  """
  updates = jax.tree.map(jnp.subtract, client_params, starts)
  norms = jnp.sqrt(squared_norms(updates))
  factor = clip_factors(norms, max_norm)
  clipped = jax.tree.map(lambda s, u: s + u * factor.reshape((-1,) + (1,) * (u.ndim - 1)), starts, updates)
  return clipped, norms


def _starts(global_params: Tree, client_params: Tree, context: AggregationContext | None) -> Tree:
  if context is not None and context.client_starts is not None:
    return context.client_starts
  clients = jax.tree.leaves(client_params)[0].shape[0]
  return jax.tree.map(lambda g: jnp.broadcast_to(g, (clients,) + g.shape), global_params)


def clip_updates(aggregator: Aggregator, max_norm: float) -> Aggregator:
  """`aggregator` on updates clipped to L2 norm `max_norm` (from each client's start).

  Args:
    aggregator: any aggregator.
    max_norm: the L2 bound on each client's whole update.
  Returns:
    An `Aggregator` with `aggregator`'s state and capabilities.
  """

  def aggregate(state, global_params, client_params, weights, context=None):
    clipped, _ = clip_to_norm(client_params, _starts(global_params, client_params, context), max_norm)
    return aggregator.aggregate(state, global_params, clipped, weights, context)

  caps = aggregator.capabilities
  return Aggregator(
    aggregator.init, aggregate, Capabilities(**{**caps.__dict__, "name": f"clip[{max_norm}]({caps.name})"})
  )


def dp_fedavg(clip_norm: float, noise_multiplier: float) -> Aggregator:
  """DP-FedAvg (module docstring). State: {"rng": the noise key's data}.

  Args:
    clip_norm: C, the L2 bound on each client's update.
    noise_multiplier: z; the noise std on the sum is z C.
  Returns:
    An `Aggregator` (private_rounds: each round is one Gaussian release).
  """

  def init(global_params, rng=None, signature_dim=0):
    del global_params, signature_dim
    key = rng if rng is not None else jax.random.key(0)
    return {"rng": jax.random.key_data(jax.random.fold_in(key, 11))}

  def aggregate(state, global_params, client_params, weights, context=None):
    present = (weights > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(present), 1.0)
    clipped, _ = clip_to_norm(client_params, _starts(global_params, client_params, context), clip_norm)
    mean = weighted_mean(clipped, present / count)  # Uniform: one client moves it by <= clip/n.
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    noisy = add_gaussian_noise(mean, noise_multiplier * clip_norm / count, noise_key)
    return noisy, {}, {"rng": jax.random.key_data(key)}

  return Aggregator(init, aggregate, Capabilities(name=f"dp_fedavg[{clip_norm}, {noise_multiplier}]"))
