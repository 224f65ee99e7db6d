"""HyperLoRA's generator as a round plug-in (also pFedHN's hypernetwork).

`generator_plugin(generator)` gives the round two hooks and a state:
  client start        offsets G_φ(s_k) added to each client's starting LoRA layers;
  after aggregation   G_φ learns where each client ended relative to the new global factors
                      (`Generator.update`: the pFedHN VJP rule or product distillation).
"""
from __future__ import annotations

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.hyper.generator import Generator
from hyperlora_jax.federated import Plugin, RoundOutcome


def generator_plugin(generator: Generator, name: str = "generator") -> Plugin:
  """The round plug-in of a `Generator` (state: {"params", "opt"})."""
  def after_aggregation(state, outcome: RoundOutcome):
    return generator.update(state, outcome.signatures, outcome.client_ids,
                            lora_lib.layers(outcome.new_global), lora_lib.layers(outcome.client_params),
                            outcome.weights, outcome.rank_masks)
  return Plugin(name=name, init=generator.init, client_offsets=generator.generate,
                after_aggregation=after_aggregation)
