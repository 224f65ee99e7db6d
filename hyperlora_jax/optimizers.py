"""Optax optimizers from config blocks ({name, learning_rate, momentum})."""
from __future__ import annotations

import ml_collections
import optax

ALLOWED_OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """sgd (with optional momentum), adam or adamw from an optimizer config block."""
  if cfg.name == "sgd":
    return optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
  if cfg.name == "adam":
    return optax.adam(cfg.learning_rate)
  return optax.adamw(cfg.learning_rate)
