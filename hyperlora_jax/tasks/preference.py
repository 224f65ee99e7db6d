"""Preference tuning by DPO (Rafailov et al. 2023, "Direct Preference Optimization") of a frozen
decoder with a LoRA adapter: one task built on the library, as `causal_lm` is.

A batch holds pairs, the chosen response first: `hyperlora_jax.text.encode_preference_pairs`'
{"input_ids", "attention_mask", "loss_mask": [B, 2, T]} (and "mask" [B], 1 for a real pair). With
log π(y|x) the sum of a response's token log-probabilities (its loss mask) under the adapted model
and log π_ref(y|x) under the reference, the DPO loss of a pair is

    -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

averaged over the batch's real pairs. **The reference is the frozen decoder itself**: the adapter
off and no merged server residual (`base_delta`), which with LoRA is the model the run starts
from, so no second copy of the weights is kept (OpenFedLLM's federated DPO keeps one). The
implicit reward of a response is β (log π - log π_ref); the task's accuracy is the share of pairs
whose chosen response gets the larger reward (TRL's `rewards/accuracies`; a tie, as at the start
where the adapter is the identity, counts as wrong).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax.tasks.causal_lm import CausalLM

PAIR_KEYS = ("input_ids", "attention_mask", "loss_mask")


LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
  policy: jax.Array,
  reference: jax.Array,
  beta: float,
  mask: jax.Array | None = None,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """(mean preference loss over the real pairs, margins [B]) of response log-probabilities, as
  TRL's `DPOTrainer` computes its `loss_type`s. With h = Δ_chosen - Δ_rejected (Δ = log π -
  log π_ref) and margin m = β h:
    "sigmoid"  DPO: -log σ(m); with label smoothing ε (conservative DPO, the labels flipped with
               probability ε): -(1 - ε) log σ(m) - ε log σ(-m)
    "ipo"      IPO (Azar et al. 2023): (h - 1 / (2β))²

  Args:
    policy: [B, 2] log π of (chosen, rejected) under the adapted model.
    reference: [B, 2] the same under the reference (no gradient flows to it).
    beta: β, the strength of the implicit KL penalty.
    mask: [B] 1 for a real pair (None: all).
    loss_type: "sigmoid" or "ipo".
    label_smoothing: ε in [0, 0.5) ("sigmoid" only).
  Returns:
    (scalar loss, margins [B] = β h).
  """
  delta = policy - jax.lax.stop_gradient(reference)
  lead = delta[:, 0] - delta[:, 1]
  margins = beta * lead
  if loss_type == "sigmoid":
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(margins) - label_smoothing * jax.nn.log_sigmoid(-margins)
  elif loss_type == "ipo":
    losses = (lead - 1 / (2 * beta)) ** 2
  else:
    raise ValueError(f"loss_type={loss_type!r}; known: {', '.join(LOSS_TYPES)}")
  weights = jnp.ones_like(margins) if mask is None else mask.astype(margins.dtype)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0), margins


@dataclasses.dataclass(frozen=True)
class PreferenceLM:
  """DPO on a frozen decoder (module docstring), with `CausalLM`'s model, scale and dtype.

  Attributes:
    lm: the causal LM task whose log-probabilities are scored (`CausalLM.sequence_logprob`).
    beta: β (0.1: DPO's and TRL's default).
    loss_type: "sigmoid" (DPO) or "ipo" (`dpo_loss`).
    label_smoothing: conservative DPO's ε ("sigmoid" only).
  """

  lm: CausalLM
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  sequences_per_example = 2  # A batch entry is a pair [2, T] (what a runner's random blocks mimic).

  @property
  def model(self):
    return self.lm.model

  @property
  def scale(self) -> float:
    return self.lm.scale

  @property
  def compute_dtype(self) -> Any:
    return self.lm.compute_dtype

  def pair_logprobs(self, frozen: dict, trainable: Any, batch: dict) -> jax.Array:
    """[B, 2] log π of each pair's (chosen, rejected) response under the adapted model.

    Args:
      frozen: the task's frozen tree; trainable: {"lora": ...}; batch: [B, 2, T] arrays.
    Returns:
      [B, 2] float32.
    """
    pairs, two, tokens = batch["input_ids"].shape
    flat = {k: batch[k].reshape(pairs * two, tokens) for k in PAIR_KEYS}
    return self.lm.sequence_logprob(frozen, trainable, flat).reshape(pairs, two)

  def reference_logprobs(self, frozen: dict, batch: dict) -> jax.Array:
    """[B, 2] log π_ref: the frozen decoder alone (no adapter, no merged residual).

    Args:
      frozen: the task's frozen tree; batch: [B, 2, T] arrays.
    Returns:
      [B, 2] float32, without gradient.
    """
    bare = {**frozen, "base_delta": {}}
    return jax.lax.stop_gradient(self.pair_logprobs(bare, {"lora": {}}, batch))

  def margins(self, frozen: dict, trainable: Any, batch: dict) -> jax.Array:
    """[B] β (Δ_chosen - Δ_rejected), the chosen response's reward lead.

    Args:
      frozen, trainable, batch: as `pair_logprobs`.
    Returns:
      [B] float32.
    """
    return dpo_loss(self.pair_logprobs(frozen, trainable, batch), self.reference_logprobs(frozen, batch), self.beta)[1]

  def loss_fn(self, trainable: Any, frozen: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """The mean DPO loss over the batch's real pairs (the library's loss contract; rng unused).

    Args:
      trainable: {"lora": ...}; frozen: the frozen tree; batch: one step's pairs; rng: unused.
    Returns:
      (scalar loss, {"reward_accuracy": share of real pairs whose margin is positive}).
    """
    del rng
    mask = real_pairs(batch)
    loss, margins = dpo_loss(
      self.pair_logprobs(frozen, trainable, batch),
      self.reference_logprobs(frozen, batch),
      self.beta,
      mask,
      self.loss_type,
      self.label_smoothing,
    )
    accuracy = jnp.sum((margins > 0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"reward_accuracy": accuracy}

  def accuracy(self, frozen: dict, trainable: Any, data: dict) -> tuple[jax.Array, jax.Array]:
    """(pairs whose chosen response gets the larger implicit reward, real pairs): the image
    task's contract, so the runner's evaluation reports preference accuracy.

    Args:
      frozen, trainable: as `pair_logprobs`; data: [B, 2, T] pairs.
    Returns:
      (correct, counted) scalars.
    """
    mask = real_pairs(data)
    return jnp.sum((self.margins(frozen, trainable, data) > 0) * mask), jnp.sum(mask)

  def accuracy_rate(self, frozen: dict, trainable: Any, data: dict) -> jax.Array:
    """Preference accuracy over `data`'s real pairs (0 where there is none).

    Args:
      frozen, trainable: as `pair_logprobs`; data: [B, 2, T] pairs.
    Returns:
      Scalar.
    """
    correct, count = self.accuracy(frozen, trainable, data)
    return correct / jnp.maximum(count, 1.0)

  def multiple_choice_correct(self, frozen: dict, trainable: Any, block: dict) -> jax.Array:
    """`CausalLM.multiple_choice_correct` of the adapted model.

    Args:
      frozen, trainable: as `pair_logprobs`; block: `text.encode_multiple_choice`'s arrays.
    Returns:
      [Q] float32.
    """
    return self.lm.multiple_choice_correct(frozen, trainable, block)


def real_pairs(batch: dict) -> jax.Array:
  """[B] float32: 1 for a pair whose two responses both have loss tokens (and whose "mask", if
  the batch has one, is set).

  Args:
    batch: [B, 2, T] pairs, optionally "mask" [B].
  Returns:
    [B] float32.
  """
  real = jnp.all(jnp.sum(batch["loss_mask"], axis=-1) > 0, axis=-1).astype(jnp.float32)
  return real * batch["mask"].astype(jnp.float32) if "mask" in batch else real
