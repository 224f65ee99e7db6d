"""HyperLoRA's generator as a round plug-in (also pFedHN's hypernetwork).

`generator_plugin(generator, target=...)` gives the round two hooks and a state
(`clip_plugin_updates` bounds what one client's update can teach it):
  client start        offsets G_φ(s_k) added to each client's starting LoRA layers;
  after aggregation   G_φ learns a target offset for each client (`Generator.update`: the
                      pFedHN VJP rule or product distillation), one of
    "from_global"  where the client ended relative to the new global factors, θ̃_k − θ_new
                   (pFedHN: the global LoRA never moves, so this is the offset plus the
                   client's whole local change);
    "deviation"    the offset plus the client's change minus the cohort's mean change,
                   o_k + Δ_k − Σ_j p_j Δ_j, with Δ_k = θ̃_k − θ⁰_k measured from its start
                   (HyperLoRA: the global already carries the mean change, so G_φ learns
                   only what is personal). The weighted mean target is the mean offset, so
                   G_φ does not drift with the shared update, and the targets live in the
                   gauge the clients trained in, not in the new global's re-factorized one.
Under client-level DP (`privacy=(C, σ)`), the cohort's mean change in "deviation" is itself a
release (`privacy.private_mean` of the changes clipped to C, noise σ C / n): it enters every
client's target, so without noise one client would move all the targets. The generator's own
gradient is private through `make_generator(privacy=...)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax import privacy as privacy_lib
from hyperlora_jax.aggregators.robust import clip_to_norm
from hyperlora_jax.federated import Plugin, RoundOutcome
from hyperlora_jax.hyper.generator import Generator

GENERATOR_TARGETS = ("from_global", "deviation")


def deviation_targets(trained: dict, starts: dict, weights: jax.Array, mean_change: dict | None = None) -> dict:
  """θ̃_k − Σ_j p_j (θ̃_j − θ⁰_j): each client's factors less the cohort's mean change.

  trained, starts: LoRA layers {path: {"a", "b"}} with a leading [C] axis; weights [C]
  (sum 1, 0 = absent); mean_change: the mean change to use instead (shaped like one client's
  layers; the private release under DP). With base = the starts' global factors, the
  generator's residual (base + offset_k) − target_k is −(Δ_k − Δ̄): zero on average over the cohort.
  Returns:
    {path: {"a", "b"}} with a leading [C] axis.
  """
  if mean_change is None:
    mean_change = jax.tree.map(lambda t, s: jnp.einsum("c,c...->...", weights, t - s), trained, starts)
  return jax.tree.map(lambda t, m: t - m[None], trained, mean_change)


def generator_plugin(
  generator: Generator, name: str = "generator", target: str = "from_global", privacy: tuple[float, float] | None = None
) -> Plugin:
  """The round plug-in of a `Generator` (state: the generator's); `target` as above.
  `privacy=(clip_norm, noise_multiplier)` releases "deviation"'s mean change privately (the
  generator must then be private too: its state's "rng" also draws this noise).

  Args:
    generator: the `Generator` (G_φ) whose offsets start each client.
    name: the plug-in's name in the state and metrics.
    target: what the generator learns to produce: "from_global" or "deviation" (`GENERATOR_TARGETS`).
    privacy: (clip_norm, noise_multiplier), or None.
  Returns:
    A `Plugin`.
  """
  if target not in GENERATOR_TARGETS:
    raise ValueError(f"generator target {target!r}; allowed: {GENERATOR_TARGETS}")

  def after_aggregation(state, outcome: RoundOutcome):
    if privacy is not None and getattr(state, "rng", None) is None:
      raise ValueError(
        "a private generator plug-in needs a private generator "
        "(make_generator(..., privacy=...)), whose state carries the noise key"
      )
    trained = lora_lib.layers(outcome.client_params)
    if target == "deviation":
      base = lora_lib.layers(outcome.previous_global)
      starts = lora_lib.layers(outcome.client_starts)
      mean_change = None
      if privacy is not None:
        key, mean_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        state = state.replace(rng=jax.random.key_data(key))
        mean_change = privacy_lib.private_mean(
          jax.tree.map(jnp.subtract, trained, starts), outcome.weights, *privacy, mean_key
        )
      trained = deviation_targets(trained, starts, outcome.weights, mean_change)
    else:
      base = lora_lib.layers(outcome.new_global)
    return generator.update(
      state, outcome.signatures, outcome.client_ids, base, trained, outcome.weights, outcome.rank_masks
    )

  return Plugin(
    name=name,
    init=generator.init,
    client_offsets=generator.generate,
    after_aggregation=after_aggregation,
    signature_dim=generator.signature_dim,
  )


def clip_plugin_updates(plugin: Plugin, max_norm: float) -> Plugin:
  """`plugin` learning from client updates clipped to L2 norm `max_norm` from each client's
  start (`robust.clip_norm`), as `aggregators.clip_updates` does for the aggregate: one client
  (a Byzantine one) then moves the generator's targets by a bounded amount.

  Args:
    plugin: any plug-in.
    max_norm: the L2 bound on each client's whole update.
  Returns:
    A `Plugin`.
  """

  def after_aggregation(state, outcome: RoundOutcome):
    clipped, _ = clip_to_norm(outcome.client_params, outcome.client_starts, max_norm)
    return plugin.after_aggregation(state, dataclasses.replace(outcome, client_params=clipped))

  return plugin._replace(after_aggregation=after_aggregation)
