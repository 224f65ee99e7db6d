"""Optax optimizers from typed optimizer blocks (`configs.blocks.Optimizer`, and
`ScheduledOptimizer` with a learning-rate schedule)."""

from __future__ import annotations

import optax

from configs import blocks

ALLOWED_OPTIMIZERS = ("sgd", "adam", "adamw")
ALLOWED_SCHEDULES = ("constant", "cosine")


def learning_rate(block: blocks.Optimizer) -> float | optax.Schedule:
  """The block's learning rate: `learning_rate`, constant, or with `schedule='cosine'` a cosine
  decay from it to `final_fraction` × it over `decay_steps` optimizer steps, then held there.
  A block without a schedule (`blocks.Optimizer`) is constant."""
  if getattr(block, "schedule", "constant") == "constant":
    return block.learning_rate
  return optax.cosine_decay_schedule(block.learning_rate, block.decay_steps, alpha=block.final_fraction)


def build_optimizer(block: blocks.Optimizer) -> optax.GradientTransformation:
  """sgd (with optional momentum), adam or adamw from an optimizer block.

  Args:
    block: a `blocks.Optimizer` or `blocks.ScheduledOptimizer` (`blocks.from_config` of a
      config's optimizer block).
  Returns:
    The optax transformation.
  """
  rate = learning_rate(block)
  if block.name == "sgd":
    return optax.sgd(rate, momentum=block.momentum or None)
  if block.name == "adam":
    return optax.adam(rate)
  return optax.adamw(rate)
