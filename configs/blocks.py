"""Config blocks whose defaults have one source: these dataclasses.

`configs/default.py` builds each block from its dataclass (`dataclasses.asdict`), and
`workdir.ADDED_FIELDS` reads the same defaults as the values that mean "as before" for runs
recorded before a block existed. (The faults block is the library's `hyperlora_jax.faults.Faults`.)
"""

from __future__ import annotations

import dataclasses

import ml_collections


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


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax optimizer (`experiments.runner.optimizers.build_optimizer`).

  Attributes:
    name: "adam" or "sgd" (`config_validation.ALLOWED_OPTIMIZERS`).
    learning_rate: its learning rate (> 0).
    momentum: sgd's momentum, in [0, 1).
  """

  name: str = "adam"
  learning_rate: float = 1e-3
  momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class ScheduledOptimizer(Optimizer):
  """An `Optimizer` with a learning-rate schedule.

  Attributes:
    schedule: "constant", or "cosine": decay to final_fraction x learning_rate over decay_steps
      steps (for the generator, one a round with loss='vjp'), e.g. fast early, slow at
      convergence (RESULTS.md).
    decay_steps: the steps of the decay.
    final_fraction: the learning rate at its end, as a fraction of the first.
  """

  schedule: str = "constant"
  decay_steps: int = 100
  final_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class LoraFair:
  """LoRA-FAIR's server correction ΔB of B̄ (method=lora_fair, and hyperlora.corrector='fair').

  Attributes:
    lam: λ, the weight of ‖ΔB‖² in the fit.
    steps: the server's gradient steps on ΔB per round (> 0; 0 would run FedIT).
    learning_rate: their learning rate.
  """

  lam: float = 0.01
  steps: int = 20
  learning_rate: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Generator:
  """The LoRA generator of method=pfedhn and method=hyperlora (`hyperlora_jax.hyper.generator`).

  Attributes:
    hidden: the width of its MLP.
    layer_embed_dim: the width of its learned layer embeddings.
    client_embed_dim: the width of learned client embeddings (pFedHN's v_k; HyperLoRA's
      'embedding' signature).
    loss: "vjp" (the pFedHN rule) or "product_distill".
    server_steps: its server steps per round with loss='product_distill'.
    optimizer: its optimizer, with a schedule.
  """

  hidden: int = 64
  layer_embed_dim: int = 16
  client_embed_dim: int = 16
  loss: str = "vjp"
  server_steps: int = 5
  optimizer: ScheduledOptimizer = ScheduledOptimizer()


@dataclasses.dataclass(frozen=True)
class HyperLoRA:
  """method=hyperlora's parts, each ablatable (configs/hyperlora.py names the ablations).

  Attributes:
    signature: '+'-joined conditioning of the generator: label, features, embedding.
    signature_noise_std: Gaussian noise on the signatures sent (privacy without DP accounting).
    covariance_rank: q of the feature-covariance summary QᵀΣQ.
    generator: False: clients start from the global adapter (no G_φ).
    synthesizer: "learned" (S_ψ) or "uniform" (exact average + rank-r SVD).
    synthesizer_hidden: the width of S_ψ's scorer.
    corrector: "learned" (C_ω), "fair" (LoRA-FAIR's ΔB fit, the lora_fair block) or "none".
    meta_optimizer: the optimizer of (ψ, ω).
    meta_steps: its steps on (ψ, ω) per round, on the round's meta-objective.
  """

  signature: str = "label+features"
  signature_noise_std: float = 0.0
  covariance_rank: int = 8
  generator: bool = True
  synthesizer: str = "learned"
  synthesizer_hidden: int = 32
  corrector: str = "learned"
  meta_optimizer: Optimizer = Optimizer()
  meta_steps: int = 1


def as_config(block) -> ml_collections.ConfigDict:
  """The ConfigDict of a block dataclass (nested blocks as nested ConfigDicts)."""
  return ml_collections.ConfigDict(dataclasses.asdict(block))


def dotted_defaults(prefix: str, block) -> dict:
  """{"prefix.field[.subfield]": default} of a block dataclass (`workdir.ADDED_FIELDS`)."""
  flat = {}
  for name, value in dataclasses.asdict(block).items():
    if isinstance(value, dict):
      flat.update({f"{prefix}.{name}.{k}": v for k, v in value.items()})
    else:
      flat[f"{prefix}.{name}"] = value
  return flat
