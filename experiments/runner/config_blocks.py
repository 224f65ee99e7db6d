"""Config blocks whose defaults have one source: these dataclasses.

`configs/default.py` builds each block from its dataclass (`dataclasses.asdict`), and
`workdir.ADDED_FIELDS` reads the same defaults as the values that mean "as before" for runs
recorded before a block existed. (The faults block is the library's `hyperlora_jax.faults.Faults`.)
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Robust:
  """Robust aggregation (`hyperlora_jax.aggregators.robust`).

  Attributes:
    rule: "mean" (the method's own rule), "median", "trimmed_mean" or "geometric_median".
    space: "factors" (replaces the average of A and B apart: fedit, ffa_lora, fedsa_lora,
      rolora) or "products" (flexlora: the statistic of s a_k b_k).
    trim: trimmed_mean: the fraction cut at each end.
    clip_norm: > 0: every client's update is clipped to this L2 norm (any method).
  """
  rule: str = "mean"
  space: str = "factors"
  trim: float = 0.1
  clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class DP:
  """Client-level differential privacy: DP-FedAvg for the averaging methods, HyperLoRA's private rounds.

  Attributes:
    noise_multiplier: σ; 0 = off. The noise std is σ x clip_norm / participants.
    clip_norm: the clip of each client's update.
    delta: ε is reported at this δ, every round.
    generator_clip_norm: HyperLoRA: the clip of each client's G_φ gradient (DP-SGD).
    signature_clip_norm: HyperLoRA: signatures are clipped to this norm ...
    signature_noise_multiplier: ... and noised with std this x signature_clip_norm (> 0 needed
      under DP when the signatures are data statistics).
  """
  noise_multiplier: float = 0.0
  clip_norm: float = 1.0
  delta: float = 1e-5
  generator_clip_norm: float = 1.0
  signature_clip_norm: float = 1.0
  signature_noise_multiplier: float = 0.0
