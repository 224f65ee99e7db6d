"""What every runner module may ask of a config, importing nothing of the runner: the error a
config field raises, which task it runs, and where the caches live."""

from __future__ import annotations

import os

import ml_collections

TASKS = ("image_classification", "instruction_tuning")
CACHE_DIR = os.path.join(
  os.path.expanduser("~"), ".cache", "hyperlora_jax", "backbones"
)  # Backbones, decoders, chunks.


class ConfigError(ValueError):
  """An invalid config field (its message starts with the field's dotted name)."""


def is_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the config is a text run (`task='instruction_tuning'`; image runs name no task)."""
  return config.get("task", "image_classification") == "instruction_tuning"


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """`pretrain.cache_dir`, or `CACHE_DIR` when it is empty."""
  return config.pretrain.get("cache_dir", "") or CACHE_DIR
