"""One client's local LoRA update: a `lax.scan` over its padded batches.

The engine vmaps `local_update` over the clients axis; the backbone and the base deltas are
closed over unbatched (one copy for all clients).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import preprocess_images


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
  """A frozen Flax backbone run with a trainable `{"lora": ..., "head": ...}` pytree.

  Attributes:
    model: the Flax module (knows nothing of LoRA).
    scale: LoRA scale s = alpha / r.
    head_name: top-level param collection entry replaced by `trainable["head"]` (None: no
      trainable head).
  """
  model: nn.Module
  scale: float
  head_name: str | None = "head"

  def logits(self, backbone: Any, trainable: Any, images: jax.Array,
             base_delta: Any = None) -> jax.Array:
    """images: [B, H, W, 3] uint8 -> logits [B, num_classes]."""
    params = backbone
    if self.head_name is not None:
      params = {**backbone, "params": {**backbone["params"], self.head_name: trainable["head"]}}
    return lora_lib.apply(self.model, params, trainable["lora"], preprocess_images(images),
                          scale=self.scale, base_delta=base_delta)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over unmasked examples (0 if none). logits [B, K], labels/mask [B]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Number of correct unmasked predictions (scalar float)."""
  return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


def local_update(adapted: AdaptedModel, optimizer: optax.GradientTransformation, backbone: Any,
                 base_delta: Any, start: Any, update_mask: Any, block: dict[str, jax.Array]):
  """Runs one client's local steps from `start` with a fresh optimizer state.

  Args:
    start: the client's initial trainable pytree.
    update_mask: pytree like `start` of float scalars; 0 freezes a leaf (FFA-LoRA's A,
      RoLoRA's alternation) by zeroing its updates.
    block: {"image": [S, B, H, W, 3] uint8, "label": [S, B], "mask": [S, B]}.
  Returns:
    (trained pytree like `start`, {"loss": mean train loss over unmasked steps,
     "examples": number of unmasked examples seen}).
  """
  def step(carry, batch):
    params, opt_state = carry
    loss_fn = lambda p: masked_cross_entropy(
        adapted.logits(backbone, p, batch["image"], base_delta), batch["label"], batch["mask"])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, m: u * m, updates, update_mask)
    return (optax.apply_updates(params, updates), opt_state), (loss, jnp.sum(batch["mask"]))

  (trained, _), (losses, counts) = jax.lax.scan(step, (start, optimizer.init(start)), block)
  active = (counts > 0).astype(losses.dtype)
  mean_loss = jnp.sum(losses * active) / jnp.maximum(jnp.sum(active), 1.0)
  return trained, {"loss": mean_loss, "examples": jnp.sum(counts)}
