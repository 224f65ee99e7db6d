"""Privacy accounting for client-level DP (DP-FedAvg), with Google's `dp_accounting` (RDP).

Each round samples `sampled` of `population` clients uniformly without replacement and releases
the average of their updates clipped to L2 norm C, plus Gaussian noise of std σ·C/n
(`aggregators.dp_fedavg`). Neighbouring datasets differ in one client's data (REPLACE_ONE, the
relation this sampler's accounting is defined for): the clipped sum moves by at most 2C, so each
round is a Gaussian mechanism with noise multiplier σ/2 relative to its sensitivity, sampled
without replacement. Signatures (HyperLoRA's data statistics) sent once, clipped to norm C_s
with noise std σ_s·C_s, are one more Gaussian mechanism (multiplier σ_s/2), composed with the
rounds; without noise they are not private (ε = ∞).
"""
from __future__ import annotations

import math


def round_event(noise_multiplier: float, sampled: int, population: int):
  """One round's `dp_accounting` event."""
  from dp_accounting import dp_event
  return dp_event.SampledWithoutReplacementDpEvent(population, sampled,
                                                   dp_event.GaussianDpEvent(noise_multiplier / 2))


def epsilon(rounds: int, noise_multiplier: float, sampled: int, population: int, delta: float,
            signature_noise_multiplier: float | None = None) -> float:
  """ε at `delta` after `rounds` rounds (and the signatures, when given: None = none sent,
  0 = sent without noise, so ε = ∞)."""
  import dp_accounting
  from dp_accounting import dp_event
  if noise_multiplier <= 0 or signature_noise_multiplier == 0:
    return math.inf
  events = [dp_event.SelfComposedDpEvent(round_event(noise_multiplier, sampled, population), rounds)]
  if signature_noise_multiplier is not None:
    events.append(dp_event.GaussianDpEvent(signature_noise_multiplier / 2))
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  accountant.compose(dp_event.ComposedDpEvent(events))
  return float(accountant.get_epsilon(delta))
