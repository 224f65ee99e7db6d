"""Optimizer blocks: the learning-rate schedule, step by step against its formula, from the
typed block a config block becomes (`configs.blocks.from_config`)."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import blocks
from experiments.runner.optimizers import build_optimizer


def _sgd_steps(cfg: ml_collections.ConfigDict, steps: int) -> list[float]:
  """The step sizes sgd takes on a unit gradient, one per optimizer step."""
  typed = blocks.ScheduledOptimizer if "schedule" in cfg else blocks.Optimizer
  optimizer = build_optimizer(blocks.from_config(typed, cfg))
  state, sizes = optimizer.init(jnp.zeros(())), []
  for _ in range(steps):
    updates, state = optimizer.update(jnp.ones(()), state)
    sizes.append(-float(updates))
  return sizes


def test_cosine_schedule_decays_to_the_final_fraction_over_decay_steps_then_holds():
  cfg = ml_collections.ConfigDict(
    {
      "name": "sgd",
      "learning_rate": 0.2,
      "momentum": 0.0,
      "schedule": "cosine",
      "decay_steps": 4,
      "final_fraction": 0.1,
    }
  )
  cosine = lambda t: 0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)))
  np.testing.assert_allclose(_sgd_steps(cfg, 6), [cosine(t) for t in range(6)], rtol=1e-6)
  np.testing.assert_allclose(_sgd_steps(cfg, 6)[::2], [0.2, 0.11, 0.02], rtol=1e-6)  # By hand.


def test_a_block_without_schedule_or_with_constant_keeps_its_rate():
  old_block = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.2, "momentum": 0.0})
  constant = ml_collections.ConfigDict(
    {**old_block.to_dict(), "schedule": "constant", "decay_steps": 4, "final_fraction": 0.1}
  )
  np.testing.assert_allclose(_sgd_steps(old_block, 5), [0.2] * 5, rtol=1e-6)
  np.testing.assert_allclose(_sgd_steps(constant, 5), [0.2] * 5, rtol=1e-6)
