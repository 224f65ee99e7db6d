"""Optax optimizers from config blocks ({name, learning_rate, momentum}, and optionally
{schedule, decay_steps, final_fraction})."""

from __future__ import annotations

import ml_collections
import optax

ALLOWED_OPTIMIZERS = ("sgd", "adam", "adamw")
ALLOWED_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: ml_collections.ConfigDict) -> float | optax.Schedule:
  """The block's learning rate: `learning_rate`, constant, or with `schedule='cosine'` a cosine
  decay from it to `final_fraction` × it over `decay_steps` optimizer steps, then held there.
  A block without `schedule` is constant."""
  if cfg.get("schedule", "constant") == "constant":
    return cfg.learning_rate
  return optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, alpha=cfg.final_fraction)


def build_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """sgd (with optional momentum), adam or adamw from an optimizer config block."""
  rate = learning_rate(cfg)
  if cfg.name == "sgd":
    return optax.sgd(rate, momentum=cfg.momentum or None)
  if cfg.name == "adam":
    return optax.adam(rate)
  return optax.adamw(rate)
