"""Instruction tuning of a frozen decoder language model: one task built on the library.

The trainable pytree is `{"lora": adapter}`; the frozen pytree is `{"variables": backbone
variables, "base_delta": {layer: [d_in, d_out]}}` (`tasks.common.frozen_tree`, as the image
task's, so every method runs unchanged); a batch is `hyperlora_jax.text`'s arrays
`{"input_ids": [B, T] int32, "attention_mask": [B, T], "loss_mask": [B, T]}`: position t's
logits predict token t + 1, counted where `loss_mask[t + 1]` is 1 (the response tokens). Rows of
packed examples (`text.pack_examples`: attention_mask holds segment ids) are read alike, each
example attending and predicting within itself.

The loss is the mean negative log-likelihood over a batch's response tokens (a batch with
none gives 0). Metrics: next-token accuracy and perplexity exp(Σ nll / Σ tokens) over the
response tokens of a split; `token_counts` gives the sums so splits of any size add up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib


class TokenCounts(NamedTuple):
  """Sums over the counted (response) tokens: negative log-likelihood, correct argmax
  predictions, tokens. Scalars float32, or [c] per client."""

  nll: jax.Array
  correct: jax.Array
  tokens: jax.Array


def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  """(targets [B, T], weights [B, T] float32): at position t, token t + 1 and whether it is
  counted (the last position predicts nothing: weight 0; in packed rows, nor does a sequence's
  last token predict the next sequence's first). Aligned with the [B, T, V] logits, so that
  they need no [:, :-1] copy.

  Args:
    batch: {"input_ids": [B, T], "loss_mask": [B, T], "attention_mask": [B, T] (segment ids when
      packed; optional), ...} (`text.encode_instructions`, `text.pack_examples`).
  Returns:
    (targets [B, T] int32, weights [B, T] float32).
  """
  targets = jnp.roll(batch["input_ids"], -1, axis=1)
  counted = jnp.roll(batch["loss_mask"], -1, axis=1) > 0
  if "attention_mask" in batch:  # Within one sequence only.
    counted &= jnp.roll(batch["attention_mask"], -1, axis=1) == batch["attention_mask"]
  weights = counted.astype(jnp.float32).at[:, -1].set(0.0)
  return targets, weights


@jax.custom_vjp
def weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ_t w_t (logsumexp(logits_t) - logits_t[target_t]): the weighted next-token negative
  log-likelihood, a float32 scalar, of logits [..., V] float32, targets int [...], weights [...].
  Its gradient, w_t (softmax(logits_t) - onehot(target_t)), is written by hand: the forward's
  exponentials exp(logits - max) are the residual, so the backward computes no exponential (one
  multiply over the [..., V] logits; the one-hot part a scatter at the targets on the CPU, a select
  fused into that multiply on accelerators, the same numbers), where autodiff
  of log-softmax took three passes and an exponential (a tiny decoder's client step on the CPU:
  182 -> 146 ms). The targets and weights get no gradient.

  Args:
    logits: [..., V] float32.
    targets: [...] int.
    weights: [...].
  Returns:
    Scalar float32.
  """
  return _weighted_nll_forward(logits, targets, weights)[0]


def _weighted_nll_forward(logits, targets, weights):
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exp = jnp.exp(logits - top)
  total = jnp.sum(exp, axis=-1)
  lse = jnp.log(total) + top[..., 0]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - target_logits) * weights), (exp, total, targets, weights)


def _weighted_nll_backward(residuals, grad):
  exp, total, targets, weights = residuals
  scale = weights * grad
  softmax_part = exp * (scale / total)[..., None]  # w_t softmax(logits_t): the forward's exponentials reused.
  return _subtract_at_targets(softmax_part, scale, targets), None, None  # - w_t onehot(target_t).


def _subtract_at_targets(values, scale, targets):
  """values [..., V] less scale [...] at each row's target [...], the same numbers either way, bit
  for bit: on the CPU a scatter at the targets only (a select pass over [..., V] was slower there
  at small vocabularies); on accelerators a select, fused into the pass that makes `values`: the
  TPU cost model priced the scatter at twice the select on a v5e, and a v6e offloads it to a
  custom fusion it cannot price."""
  return jax.lax.platform_dependent(
    values, scale, targets, cpu=_subtract_at_targets_by_scatter, default=_subtract_at_targets_by_select
  )


def _subtract_at_targets_by_scatter(values, scale, targets):
  """values [..., V] less scale [...] at each row's target [...]: a scatter at the targets."""
  flat = values.reshape(-1, values.shape[-1])
  flat = flat.at[jnp.arange(flat.shape[0]), targets.reshape(-1)].add(-scale.reshape(-1))
  return flat.reshape(values.shape)


def _subtract_at_targets_by_select(values, scale, targets):
  """values [..., V] less scale [...] at each row's target [...]: a select over the vocabulary."""
  hit = jax.lax.broadcasted_iota(targets.dtype, values.shape, values.ndim - 1) == targets[..., None]
  return jnp.where(hit, values - scale[..., None], values)


weighted_nll.defvjp(_weighted_nll_forward, _weighted_nll_backward)


@jax.custom_vjp
def _values_at_targets(values, targets):
  """values[..., target] [...] of values [..., V] and targets int [...]: a gather whose backward
  puts the cotangent at the targets as `weighted_nll`'s does (`_subtract_at_targets`: a scatter
  on the CPU, as autodiff of the gather makes it; a select on accelerators)."""
  return jnp.take_along_axis(values, targets[..., None], axis=-1)[..., 0]


def _values_at_targets_forward(values, targets):
  return _values_at_targets(values, targets), (jnp.zeros((), values.dtype), values.shape, targets)


def _values_at_targets_backward(residuals, grad):
  zero, shape, targets = residuals
  return _subtract_at_targets(jnp.broadcast_to(zero, shape), -grad, targets), None


_values_at_targets.defvjp(_values_at_targets_forward, _values_at_targets_backward)


def perplexity(counts: TokenCounts) -> jax.Array:
  """exp(Σ nll / Σ tokens) (1 where no token is counted).

  Args:
    counts: summed `TokenCounts`.
  Returns:
    Scalar.
  """
  return jnp.exp(counts.nll / jnp.maximum(counts.tokens, 1.0))


def token_accuracy(counts: TokenCounts) -> jax.Array:
  """Correct next tokens / counted tokens (0 where none is counted).

  Args:
    counts: summed `TokenCounts`.
  Returns:
    Scalar.
  """
  return counts.correct / jnp.maximum(counts.tokens, 1.0)


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """A frozen Flax decoder (e.g. `models.llama.DecoderLM`) with a trainable `{"lora"}` pytree.

  Attributes:
    model: the Flax module: (input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V].
    scale: LoRA scale s = alpha / r.
    compute_dtype: the dtype the frozen weights are cast to (give the model the same `dtype`
      for its activations); LoRA factors, the loss and every gradient stay float32.
  """

  model: nn.Module
  scale: float
  compute_dtype: Any = jnp.float32  # The frozen weights' dtype (`tasks.common.frozen_tree`).

  def logits(self, frozen: dict, trainable: Any, batch: dict) -> jax.Array:
    """[B, T, V] float32 logits of `batch`'s sequences.

    Args:
      frozen: the task's frozen tree (`common.frozen_tree`).
      trainable: {"lora": ...}.
      batch: {"input_ids": [B, T], "attention_mask": [B, T], ...}.
    Returns:
      [B, T, V] float32.
    """
    out = lora_lib.apply(
      self.model,
      frozen["variables"],
      trainable["lora"],
      batch["input_ids"],
      batch["attention_mask"],
      scale=self.scale,
      base_delta=frozen["base_delta"],
    )
    return out.astype(jnp.float32)

  def token_counts(self, frozen: dict, trainable: Any, batch: dict) -> TokenCounts:
    """`TokenCounts` of one batch's response tokens.

    Args:
      frozen, trainable, batch: as `logits`.
    Returns:
      `TokenCounts` of scalars.
    """
    logits = self.logits(frozen, trainable, batch)
    targets, weights = next_token_targets(batch)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return TokenCounts(weighted_nll(logits, targets, weights), jnp.sum(correct * weights), jnp.sum(weights))

  def loss_fn(self, trainable: Any, frozen: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Mean nll over the batch's response tokens (the library's loss contract; rng unused);
    no argmax, which training does not need.

    Args:
      trainable: {"lora": ...}; frozen: the frozen tree; batch: one step's batch; rng: unused.
    Returns:
      (scalar loss, {}).
    """
    del rng
    targets, weights = next_token_targets(batch)
    nll = weighted_nll(self.logits(frozen, trainable, batch), targets, weights)
    return nll / jnp.maximum(jnp.sum(weights), 1.0), {}

  def accuracy(self, frozen: dict, trainable: Any, data: dict) -> tuple[jax.Array, jax.Array]:
    """(correct, counted tokens) over `data`: the image task's contract, so its evaluation
    (`image_classification.make_evaluate`) reports next-token accuracy.

    Args:
      frozen, trainable: as `logits`; data: a batch.
    Returns:
      (correct tokens, counted tokens), scalars.
    """
    counts = self.token_counts(frozen, trainable, data)
    return counts.correct, counts.tokens

  def sequence_logprob(self, frozen: dict, trainable: Any, batch: dict) -> jax.Array:
    """[B] Σ log p of each sequence's counted (loss_mask) tokens given the tokens before them.

    Args:
      frozen, trainable: as `logits`; batch: {"input_ids", "attention_mask", "loss_mask": [B, T]}.
    Returns:
      [B] float32.
    """
    targets, weights = next_token_targets(batch)
    logprobs = jax.nn.log_softmax(self.logits(frozen, trainable, batch), axis=-1)
    return jnp.sum(_values_at_targets(logprobs, targets) * weights, axis=-1)

  def multiple_choice_scores(self, frozen: dict, trainable: Any, block: dict) -> jax.Array:
    """[Q, K] log p of each choice's letter after the question (-inf for a padded choice). With
    `letter_ids` (the choices differ in their last token only), one forward pass per question:
    the log-probabilities of the shared scored tokens (a space before the letter, say) plus the
    log-softmax at the slot before the last token, read at each choice's (the scores of K passes,
    in 1/K of the compute); else each choice's sequence is scored (`sequence_logprob`).

    Args:
      frozen, trainable: as `logits`; block: `text.encode_multiple_choice`'s arrays of Q
        questions ([Q, K, T], choice_mask [Q, K], optionally letter_ids [Q, K] and
        letter_position [Q]).
    Returns:
      [Q, K] float32.
    """
    questions, choices, tokens = block["input_ids"].shape
    keys = ("input_ids", "attention_mask", "loss_mask")
    if "letter_ids" in block:
      first = {k: block[k][:, 0] for k in keys}  # The prompt, then the first choice's letter.
      logprobs = jax.nn.log_softmax(self.logits(frozen, trainable, first), axis=-1)  # [Q, T, V]
      targets, weights = next_token_targets(first)
      before = block["letter_position"] - 1  # The slot whose logits predict the last token.
      shared = weights * (jnp.arange(tokens)[None, :] != before[:, None])  # Scored, but not the last.
      token_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
      last = jnp.take_along_axis(logprobs, before[:, None, None], axis=1)[:, 0]  # [Q, V]
      scores = jnp.sum(token_logprobs * shared, axis=-1)[:, None] + jnp.take_along_axis(
        last, block["letter_ids"], axis=-1
      )
    else:
      flat = {k: block[k].reshape(questions * choices, tokens) for k in keys}
      scores = self.sequence_logprob(frozen, trainable, flat).reshape(questions, choices)
    return jnp.where(block["choice_mask"] > 0, scores, -jnp.inf)

  def multiple_choice_correct(self, frozen: dict, trainable: Any, block: dict) -> jax.Array:
    """[Q] 1.0 where the likeliest choice (`multiple_choice_scores`) is the answer.

    Args:
      frozen, trainable: as `logits`; block: `text.encode_multiple_choice`'s arrays (answer [Q]).
    Returns:
      [Q] float32.
    """
    scores = self.multiple_choice_scores(frozen, trainable, block)
    return (jnp.argmax(scores, axis=-1) == block["answer"]).astype(jnp.float32)

  def accuracy_and_nll(self, frozen: dict, trainable: Any, data: dict) -> tuple[jax.Array, jax.Array]:
    """([correct tokens, Σ nll], counted tokens) over `data`, one forward pass:
    `image_classification.make_evaluate(counts=...)` then gives [next-token accuracy, mean nll]
    (exp: the perplexity).

    Args:
      frozen, trainable: as `logits`; data: a batch.
    Returns:
      ([2]: correct tokens and Σ nll, counted tokens).
    """
    counts = self.token_counts(frozen, trainable, data)
    return jnp.stack([counts.correct, counts.nll]), counts.tokens

  def accuracy_rate(self, frozen: dict, trainable: Any, data: dict) -> jax.Array:
    """Next-token accuracy over `data`'s response tokens (0 where none is counted).

    Args:
      frozen, trainable: as `logits`; data: a batch.
    Returns:
      Scalar.
    """
    correct, count = self.accuracy(frozen, trainable, data)
    return correct / jnp.maximum(count, 1.0)


def mean_hidden_state(model: nn.Module, variables: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """[B, D] float32: the frozen decoder's final hidden states averaged over each sequence's real
  tokens: a text client's features for HyperLoRA's signatures (`hyper.signatures`).

  Args:
    model: the decoder (`models.llama.DecoderLM`); variables: its variables.
    input_ids: [B, T]; attention_mask: [B, T].
  Returns:
    [B, D] float32.
  """
  hidden = cast(jax.Array, model.apply(variables, input_ids, attention_mask, return_hidden=True)).astype(jnp.float32)
  mask = (attention_mask > 0).astype(jnp.float32)[..., None]  # Packed rows hold segment ids.
  return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def split_counts(task: CausalLM, frozen: dict, trainable: Any, data: dict, batch_size: int) -> TokenCounts:
  """`TokenCounts` of a split {"input_ids": [N, T], ...}, N a multiple of `batch_size`,
  `batch_size` sequences at a time.

  Args:
    task: the task; frozen, trainable: as `CausalLM.logits`.
    data: {"input_ids": [N, T], ...}.
    batch_size: sequences per forward pass (divides N).
  Returns:
    `TokenCounts` summed over the split.
  """
  n = data["input_ids"].shape[0]
  if n % batch_size:
    raise ValueError(
      f"a split of {n} sequences must be padded to a multiple of batch_size={batch_size} "
      f"(padding rows have loss_mask 0)"
    )
  batches = jax.tree.map(lambda x: x.reshape((-1, batch_size) + x.shape[1:]), data)
  counts = jax.lax.map(lambda b: task.token_counts(frozen, trainable, b), batches)
  return TokenCounts(*(jnp.sum(c) for c in counts))
