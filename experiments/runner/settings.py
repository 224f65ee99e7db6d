"""A validated run config unpacked into typed values at the boundary, instead of the whole
`ConfigDict` passed down:

  backbone_settings(config) -> BackboneSettings   what the backbone step reads (pretraining,
                                                   checkpoints, the model block)
  data_block(config)        -> ImageData | TextData   the data step's block
  run_settings(config)      -> RunSettings        what the round's assembly, the chunk timing,
                                                   the loop, feeding, evaluation and records read

The blocks are the dataclasses of `configs.blocks` (and the library's `Faults`). The config
itself is read by validation, by the builders that unpack it, by the steps that rewrite it before
it is unpacked (a checkpoint's `model.*`, a text run's `data.num_clients`) and by the workdir's
recorded copy; `tests/test_layout.py` keeps every other function off it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections

from configs import blocks
from experiments.runner.config_facts import CACHE_DIR, cache_dir, is_text, typed_block
from experiments.runner.methods import MethodSettings, method_settings
from hyperlora_jax.faults import Faults
from hyperlora_jax.tasks import common


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A run's settings after validation, typed.

  Attributes:
    seed: the run's seed.
    text: a text run (`task='instruction_tuning'`).
    num_clients: `data.num_clients`, resolved (a text run's groups): the population.
    input_size: (the field that sizes one example, its value): ("data.image_size", 16) or
      ("data.max_len", 128).
    backbone_dtype: `compute.backbone_dtype`: "float32", "bfloat16" or "auto".
    backbone_quantization: `compute.backbone_quantization`: "none", "int8" or "nf4".
    quantization_block: `compute.quantization_block`: weights per scale (0: the kind's default).
    model: the `model` block, as a dict (its fields depend on the architecture).
    fed: the federated rounds.
    lora: the adapters.
    client_optimizer, server_optimizer: the optimizers.
    method: what the method reads (its blocks, `robust` and `dp`).
    faults: the injected client faults; None where the config has no `faults` block.
    eval_batch: examples per evaluation batch.
    eval_every, checkpoint_every: rounds between evaluations and between checkpoints.
    export_every: rounds between the PEFT adapters a run writes (0: none).
    export_clients: whose personalized adapters it writes too ('', 'all' or ids '0,3').
    multiple_choice: a text run's `mc` block (None: the config has none).
    generation: a text run's `gen` block (None: the config has none).
    stream: images read on demand from the prepared files (`data.stream`).
    feed: "round", "chunk" or "host" (`data.feed`).
    cache_dir: where backbones and measured chunk sizes are cached.
  """

  seed: int
  text: bool
  num_clients: int
  input_size: tuple[str, int]
  backbone_dtype: str
  backbone_quantization: str
  quantization_block: int
  model: dict
  fed: blocks.Fed
  lora: blocks.Lora
  client_optimizer: blocks.Optimizer
  server_optimizer: blocks.Optimizer
  method: MethodSettings
  faults: Faults | None
  eval_batch: int
  eval_every: int
  checkpoint_every: int
  export_every: int
  export_clients: str
  multiple_choice: blocks.MultipleChoice | None
  generation: blocks.GenerationEval | None
  stream: bool
  feed: str
  cache_dir: str

  def frozen_tree(self, backbone: Any, dtype: Any) -> dict:
    """The task's frozen tree of `backbone` in `dtype`, its kernels held as
    `compute.backbone_quantization` says (`tasks.common.frozen_tree`).

    Args:
      backbone: the frozen variables; dtype: the task's compute dtype.
    Returns:
      {"variables", "base_delta"}.
    """
    return common.frozen_tree(
      backbone, dtype=dtype, quantization=self.backbone_quantization, quantization_block=self.quantization_block
    )

  @property
  def dp(self) -> blocks.DP:
    """The `dp` block."""
    return self.method.dp


@dataclasses.dataclass(frozen=True)
class BackboneSettings:
  """What the backbone step reads (`backbone`, `pretrain`, `pretrain_text`).

  Attributes:
    model: the `model` block (its fields depend on the architecture), as a dict.
    pretrain: the `pretrain` block: `ImagePretrain` (image runs) or `TextPretrain` (text runs).
    image_size: an image run's `data.image_size` (0 for text runs).
    data_dir: an image run's `data.data_dir`, where the pretraining images are prepared.
  """

  model: dict
  pretrain: blocks.ImagePretrain | blocks.TextPretrain
  image_size: int = 0
  data_dir: str = ""

  @property
  def cache_dir(self) -> str:
    """`pretrain.cache_dir`, or `config_facts.CACHE_DIR` when it is empty."""
    return self.pretrain.cache_dir or CACHE_DIR

  @property
  def checkpoint(self) -> str:
    """`pretrain.checkpoint`: a Hugging Face directory ('' for none)."""
    return self.pretrain.checkpoint

  def cache_directory(self, name: str, key_fields: dict) -> str:
    """The cache directory of an embedded backbone: `cache_dir/<name>-<12 hex characters of the
    sha1 of key_fields as sorted JSON>`, so every run whose backbone the same fields determine
    shares it.

    Args:
      name: what is cached, e.g. the model's name or "decoder".
      key_fields: JSON-able values that determine its weights.
    Returns:
      The directory (it may not exist yet).
    """
    digest = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(self.cache_dir, f"{name}-{digest}")


def backbone_settings(config: ml_collections.ConfigDict) -> BackboneSettings:
  """The typed values the backbone step reads of `config` (its `model.*` final).

  Args:
    config: a run config, image or text.
  Returns:
    Its `BackboneSettings`.
  Raises:
    ConfigError: the `pretrain` block has a field its dataclass does not know (named).
  """
  if is_text(config):
    return BackboneSettings(config.model.to_dict(), typed_block(blocks.TextPretrain, config, "pretrain"))
  return BackboneSettings(
    config.model.to_dict(),
    typed_block(blocks.ImagePretrain, config, "pretrain"),
    config.data.image_size,
    config.data.data_dir,
  )


def data_block(config: ml_collections.ConfigDict) -> blocks.ImageData | blocks.TextData:
  """The run's `data` block, typed: `ImageData` or (a text run) `TextData`.

  Raises:
    ConfigError: the block has a field its dataclass does not know (named).
  """
  return typed_block(blocks.TextData if is_text(config) else blocks.ImageData, config, "data")


def run_settings(config: ml_collections.ConfigDict) -> RunSettings:
  """The typed settings of a validated run config (the boundary: what is built below reads these).

  Args:
    config: the run config, validated, its `model.*` set from a checkpoint and a text run's
      `data.num_clients` resolved.
  Returns:
    Its `RunSettings`.
  Raises:
    ConfigError: a block has a field its dataclass does not know (named).
  """
  text = is_text(config)
  data = data_block(config)
  return RunSettings(
    seed=config.seed,
    text=text,
    num_clients=data.num_clients,
    input_size=("data.max_len", data.max_len)
    if isinstance(data, blocks.TextData)
    else ("data.image_size", data.image_size),
    backbone_dtype=config.compute.backbone_dtype,
    backbone_quantization=config.compute.get("backbone_quantization", "none"),
    quantization_block=config.compute.get("quantization_block", 0),
    model=config.model.to_dict(),
    fed=typed_block(blocks.Fed, config, "fed"),
    lora=typed_block(blocks.Lora, config, "lora"),
    client_optimizer=typed_block(blocks.Optimizer, config, "client_optimizer"),
    server_optimizer=typed_block(blocks.Optimizer, config, "server_optimizer"),
    method=method_settings(config),
    faults=typed_block(Faults, config, "faults") if "faults" in config else None,
    eval_batch=config.eval_batch,
    eval_every=config.eval_every,
    checkpoint_every=config.checkpoint_every,
    export_every=config.get("export_every", 0),
    export_clients=config.get("export_clients", ""),
    multiple_choice=typed_block(blocks.MultipleChoice, config, "mc") if "mc" in config else None,
    generation=typed_block(blocks.GenerationEval, config, "gen") if "gen" in config else None,
    stream=data.stream,
    feed=data.feed,
    cache_dir=cache_dir(config),
  )
