"""Image classification on a frozen Flax backbone: one task built on the library.

The trainable pytree is `{"lora": adapter, "head": head params ({} for a model without a
head, e.g. CLIP)}`; the frozen pytree is `{"variables": backbone variables, "base_delta":
{layer: [d_in, d_out]}}`; a batch is `{"image": [B, H, W, 3] uint8, "label": [B] int32,
"mask": [B] float}`. The round sees none of this: it gets `loss_fn` and `apply_base_delta`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax import primitives
from hyperlora_jax.client import ClientUpdate, masked_mean
from hyperlora_jax.federated import NEW_CLIENT, FederatedRound, round_update_mask
from hyperlora_jax.tasks.common import apply_base_delta, backbone_dtype, frozen_tree  # noqa: F401 (their home was here)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over unmasked examples (0 if none). logits [B, K], labels/mask [B].

  Args:
    logits: [B, K]; labels: [B] int; mask: [B] in {0, 1}.
  Returns:
    Scalar.
  """
  return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def masked_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Number of correct unmasked predictions (scalar float).

  Args:
    logits: [B, K]; labels: [B] int; mask: [B] in {0, 1}.
  Returns:
    Scalar float32.
  """
  return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


@dataclasses.dataclass(frozen=True)
class ImageClassification:
  """A frozen Flax backbone classifying images with a trainable `{"lora", "head"}` pytree.

  Attributes:
    model: the Flax module (knows nothing of LoRA).
    scale: LoRA scale s = alpha / r.
    preprocess: images [B, H, W, 3] uint8 -> the model's float inputs (the backbone's own input
      convention, e.g. `hyperlora_jax.models.preprocess_images`: [-1, 1]).
    head_name: top-level param entry replaced by `trainable["head"]` (None: no trainable head).
    compute_dtype: dtype the images enter the backbone in; with the frozen weights cast to it
      (`frozen_tree(..., dtype=)`) the backbone computes in it. LoRA factors, the head, the
      logits' loss and every gradient stay float32.
  """

  model: nn.Module
  scale: float
  preprocess: Callable[[jax.Array], jax.Array]
  head_name: str | None = "head"
  compute_dtype: Any = jnp.float32

  def logits(self, frozen: dict, trainable: Any, images: jax.Array) -> jax.Array:
    """images: [B, H, W, 3] uint8 -> logits [B, num_classes].

    Args:
      frozen: the task's frozen tree; trainable: {"lora", "head"}.
      images: [B, H, W, 3] uint8.
    Returns:
      [B, num_classes] float32.
    """
    params = frozen["variables"]
    if self.head_name is not None:
      params = {**params, "params": {**params["params"], self.head_name: trainable["head"]}}
    logits = lora_lib.apply(
      self.model,
      params,
      trainable["lora"],
      self.preprocess(images).astype(self.compute_dtype),
      scale=self.scale,
      base_delta=frozen["base_delta"],
    )
    return logits.astype(jnp.float32)

  def loss_fn(self, trainable: Any, frozen: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Masked cross-entropy of one batch (the library's loss contract; rng unused).

    Args:
      trainable: {"lora", "head"}; frozen: the frozen tree.
      batch: {"image": [B, H, W, 3], "label": [B], "mask": [B]}; rng: unused.
    Returns:
      (scalar loss, {}).
    """
    del rng
    logits = self.logits(frozen, trainable, batch["image"])
    return masked_cross_entropy(logits, batch["label"], batch["mask"]), {}

  def accuracy(self, frozen: dict, trainable: Any, data: dict) -> tuple[jax.Array, jax.Array]:
    """(correct, count) over the unmasked examples of `data` {"image", "label", "mask"}.

    Args:
      frozen, trainable: as `logits`; data: {"image": [M, ...], "label": [M], "mask": [M]}.
    Returns:
      (correct, count), scalars.
    """
    logits = self.logits(frozen, trainable, data["image"])
    return masked_correct(logits, data["label"], data["mask"]), jnp.sum(data["mask"])

  def accuracy_rate(self, frozen: dict, trainable: Any, data: dict) -> jax.Array:
    """Fraction of the unmasked examples of `data` classified correctly (0 if none).

    Args:
      frozen, trainable, data: as `accuracy`.
    Returns:
      Scalar.
    """
    correct, count = self.accuracy(frozen, trainable, data)
    return correct / jnp.maximum(count, 1.0)


class Evaluation(NamedTuple):
  """Pure evaluation functions over blocks (jit each; the caller loops over blocks).

  global_counts(state, frozen, block) -> (correct, count)   scalars, the global model on a
      global test block {"image": [M, H, W, 3], "label": [M], "mask": [M]}, M a multiple
      of eval_batch
  client_accuracy(state, frozen, client_ids, block) -> [c]  each client's own model on its
      own test split, block {"image": [c, n_max, H, W, 3], "label", "mask"}, ids [c]; n_max
      at most eval_batch or a multiple of it (evaluated eval_batch examples at a time)
  """

  global_counts: Callable
  client_accuracy: Callable


def block_counts(
  task: ImageClassification, frozen: dict, trainable: Any, block: dict, eval_batch: int, counts: Callable | None = None
) -> tuple[jax.Array, jax.Array]:
  """(correct, count) of one model on a global test block {"image": [M, H, W, 3], "label": [M],
  "mask": [M]}, M a multiple of `eval_batch`, evaluated `eval_batch` examples at a time
  (`counts`: another (frozen, trainable, batch) -> (hits, count) than `task.accuracy`; hits may
  be [m], several sums over one count).

  Args:
    task: the task; frozen, trainable: one model's trees.
    block: the test block; eval_batch: examples per forward pass (divides M).
    counts: as described, or None (`task.accuracy`).
  Returns:
    (hits, scalar or [m]; count, scalar).
  """
  counts = counts or task.accuracy
  # Batch j holds examples j, j + nb, j + 2 nb, ...: with the examples sharded contiguously
  # over the devices, every device evaluates its share of every batch (counts need no order).
  batches = jax.tree.map(lambda x: x.reshape((eval_batch, -1) + x.shape[1:]).swapaxes(0, 1), block)
  correct, count = jax.lax.map(lambda b: counts(frozen, trainable, b), batches)
  return jnp.sum(correct, axis=0), jnp.sum(count)


def make_evaluate(
  task: ImageClassification,
  fed_round: FederatedRound,
  *,
  eval_batch: int = 256,
  clients_per_chunk: int = 0,
  counts: Callable | None = None,
) -> Evaluation:
  """The `Evaluation` of a run. Each client's model is what it would start the next round
  from (`FederatedRound.client_start`: its local leaves, the plug-ins' offsets for it,
  truncated to its rank); no local steps. Clients are evaluated like they train:
  `primitives.map_clients`, `clients_per_chunk` at a time (0: the whole block at once),
  sharded over the round's mesh.

  counts: (frozen, trainable, batch) -> (hits, count) summed over a split, the "accuracy"
  being hits / count (default `task.accuracy`); hits may be [m] sums over one count, e.g.
  `CausalLM.accuracy_and_nll`'s (correct tokens, their nll), and the accuracies are then [m]
  (per client [c, m]). Any task with `accuracy` works (`tasks.causal_lm.CausalLM` too).

  Args:
    task: any task with `accuracy`.
    fed_round: the run's round (its `client_start`, mesh).
    eval_batch: examples per forward pass.
    clients_per_chunk: clients evaluated at once (0: all).
  Returns:
    An `Evaluation`: global and per-client accuracies of a server state.
  """
  counts = counts or task.accuracy

  def global_counts(state, frozen, block):
    frozen = apply_base_delta(frozen, state.base_delta)
    return block_counts(task, frozen, fed_round.global_params(state), block, eval_batch, counts)

  def split_accuracy(frozen, trainable, data):
    """hits / count on one client's split [n, ...], `eval_batch` examples at a time."""
    n = data["mask"].shape[0]
    if n <= eval_batch:
      hits, count = counts(frozen, trainable, data)
      return hits / jnp.maximum(count, 1.0)
    if n % eval_batch:
      raise ValueError(
        f"a client's test split of {n} examples must be padded to a multiple of "
        f"eval_batch={eval_batch} (FederatedData.client_test_blocks does)"
      )
    batches = jax.tree.map(lambda x: x.reshape((-1, eval_batch) + x.shape[1:]), data)
    correct, count = jax.lax.map(lambda b: counts(frozen, trainable, b), batches)
    return jnp.sum(correct, axis=0) / jnp.maximum(jnp.sum(count), 1.0)

  def client_accuracy(state, frozen, client_ids, block):
    frozen = apply_base_delta(frozen, state.base_delta)
    local, _, offsets, masks = fed_round.client_inputs(state, client_ids)

    def one_client(inputs):
      client_local, data, offset, rank_mask = inputs
      trainable = fed_round.client_start(state.global_params, client_local, offset, rank_mask)
      return split_accuracy(frozen, trainable, data)

    return primitives.map_clients(one_client, (local, block, offsets, masks), clients_per_chunk, fed_round.mesh)

  return Evaluation(global_counts, client_accuracy)


def make_new_client_evaluate(
  task: ImageClassification, fed_round: FederatedRound, client_update: ClientUpdate
) -> Callable:
  """Builds the pure `evaluate_new(state, frozen, train_block, test_block, signatures)`.

  Amortization for clients never seen in training. Each new client (id `NEW_CLIENT`: mean
  embedding, its own signature) is evaluated on its test split from:
    "global"              the global model, zero local steps (its local leaves, if the
                          method has any, start from the global ones);
    "generated"           global + the plug-ins' offsets, zero local steps (with plug-ins);
    "<start>_finetuned"   either start after the local steps of `train_block`.
  Args of `evaluate_new`:
    train_block: {"image": [H, S, B, ...], "label", "mask"}: the steps a new client may take.
    test_block: {"image": [H, n, ...], "label", "mask"}; signatures: [H, D].
  Returns:
    {name: [H] accuracy} for the names above.
  """

  def evaluate_new(state, frozen, train_block, test_block, signatures):
    frozen = apply_base_delta(frozen, state.base_delta)
    num_new = test_block["label"].shape[0]
    update_mask = round_update_mask(fed_round.frozen_leaves, state.global_params, jnp.int32(0))
    full_rank = jnp.ones((lora_lib.rank_of(state.global_params),), jnp.float32)
    generated = (
      fed_round.offsets(state, signatures, jnp.full((num_new,), NEW_CLIENT, jnp.int32))
      if fed_round.plugins
      else jnp.zeros((num_new,))
    )

    def one_client(inputs):
      train, test, offset = inputs
      out = {}
      for name, start_offset in (("global", None), ("generated", offset)):
        if name == "generated" and not fed_round.plugins:
          continue
        start = fed_round.client_start(state.global_params, {}, start_offset, full_rank)
        out[name] = task.accuracy_rate(frozen, start, test)
        tuned, _ = client_update(start, frozen, train, jax.random.key(0), update_mask)
        out[f"{name}_finetuned"] = task.accuracy_rate(frozen, tuned, test)
      return out

    return jax.lax.map(one_client, (train_block, test_block, generated))

  return evaluate_new
