"""What every runner module may ask of a config, importing nothing of the runner: the error a
config field raises, which task it runs, where the caches live, and a block as its typed value."""

from __future__ import annotations

import os

from typing import TypeVar

import ml_collections

from configs import blocks

Block = TypeVar("Block")

TASKS = ("image_classification", "instruction_tuning", "preference_tuning")
TEXT_TASKS = ("instruction_tuning", "preference_tuning")
CACHE_DIR = os.path.join(
  os.path.expanduser("~"), ".cache", "hyperlora_jax", "backbones"
)  # Backbones, decoders, chunks.


class ConfigError(ValueError):
  """An invalid config field (its message starts with the field's dotted name)."""


def is_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the config is a text run (`task='instruction_tuning'` or `'preference_tuning'`;
  image runs name no task)."""
  return config.get("task", "image_classification") in TEXT_TASKS


def is_preference(config: ml_collections.ConfigDict) -> bool:
  """Whether the config is a preference (DPO) run (`task='preference_tuning'`)."""
  return config.get("task", "image_classification") == "preference_tuning"


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """`pretrain.cache_dir`, or `CACHE_DIR` when it is empty."""
  return config.pretrain.get("cache_dir", "") or CACHE_DIR


def typed_block(block_type: type[Block], config: ml_collections.ConfigDict, name: str) -> Block:
  """`config.<name>` as its dataclass (`configs.blocks.from_config`; absent: the defaults).

  Args:
    block_type: the block's dataclass, e.g. `blocks.Fed`.
    config: a run config.
    name: the block's field in it, e.g. "fed".
  Returns:
    A `block_type`.
  Raises:
    ConfigError: the block has a field the dataclass does not know (named, with the block).
  """
  try:
    return blocks.from_config(block_type, config.get(name))
  except KeyError as e:
    raise ConfigError(f"{name}: {e.args[0]}") from None
