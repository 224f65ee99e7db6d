"""Validates a run's ConfigDict before anything is loaded or compiled.

Every error names the field and what is allowed.
"""
from __future__ import annotations

import re

import ml_collections

from hyperlora_jax.data.partition import ALLOWED_PARTITIONS
from hyperlora_jax.aggregators.synthesis import CORRECTORS
from hyperlora_jax.generator import GENERATOR_LOSSES
from hyperlora_jax.signatures import parse_kinds
from hyperlora_jax.models import ALLOWED_MODELS
from hyperlora_jax.optimizers import ALLOWED_OPTIMIZERS

ALLOWED_HEAD_POLICIES = ("shared", "local")


class ConfigError(ValueError):
  """An invalid config field."""


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")


def _positive_int(config, field: str, minimum: int = 1) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, field,
           f"must be an integer >= {minimum}, got {value!r}")


def _one_of(value, allowed, field: str) -> None:
  _require(value in allowed, field, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def validate_config(config: ml_collections.ConfigDict, allowed_methods) -> None:
  """Raises `ConfigError` naming the first invalid field."""
  _one_of(config.method, sorted(allowed_methods), "method")
  _require(isinstance(config.seed, int), "seed", f"must be an integer, got {config.seed!r}")
  data, fed = config.data, config.fed
  _require(bool(data.name), "data.name", "must name a TFDS dataset, e.g. 'digits_domains/res16'")
  _one_of(data.partition, ALLOWED_PARTITIONS, "data.partition")
  for field in ("data.num_clients", "data.image_size", "fed.num_rounds", "fed.clients_per_round",
                "fed.local_steps", "fed.batch_size", "model.patch_size", "model.width",
                "model.depth", "model.num_heads", "lora.rank", "pretrain.batch_size",
                "eval_batch", "eval_every", "checkpoint_every"):
    _positive_int(config, field)
  for field in ("data.min_client_size", "data.heldout_clients", "fed.new_client_steps",
                "fed.clients_per_chunk", "fed.num_devices", "pretrain.steps"):
    _positive_int(config, field, minimum=0)
  _require(data.dirichlet_alpha > 0, "data.dirichlet_alpha", f"must be > 0, got {data.dirichlet_alpha}")
  _require(fed.clients_per_round <= data.num_clients, "fed.clients_per_round",
           f"{fed.clients_per_round} exceeds data.num_clients={data.num_clients}")
  _require(data.image_size % config.model.patch_size == 0, "model.patch_size",
           f"{config.model.patch_size} must divide data.image_size={data.image_size}")
  _require(config.model.width % config.model.num_heads == 0, "model.num_heads",
           f"{config.model.num_heads} must divide model.width={config.model.width}")
  _one_of(config.model.name, ALLOWED_MODELS, "model.name")
  _require(config.model.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
  _one_of(fed.head_policy, ALLOWED_HEAD_POLICIES, "fed.head_policy")
  if fed.clients_per_chunk and fed.num_devices:
    _require(fed.clients_per_chunk % fed.num_devices == 0, "fed.clients_per_chunk",
             f"{fed.clients_per_chunk} must be a multiple of fed.num_devices={fed.num_devices}")
  try:
    re.compile(config.lora.target_regex)
  except re.error as e:
    raise ConfigError(f"lora.target_regex: not a valid regex ({e})") from None
  _require(config.lora.alpha > 0, "lora.alpha", f"must be > 0, got {config.lora.alpha}")
  ranks = config.lora.client_ranks
  _require(all(isinstance(r, int) and 1 <= r <= config.lora.rank for r in ranks),
           "lora.client_ranks", f"each rank must be an integer in [1, lora.rank={config.lora.rank}], "
           f"got {tuple(ranks)}")
  optimizers = ["client_optimizer", "server_optimizer"]
  if "generator" in config:
    gen = config.generator
    _one_of(gen.loss, GENERATOR_LOSSES, "generator.loss")
    for field in ("generator.hidden", "generator.layer_embed_dim", "generator.server_steps"):
      _positive_int(config, field)
    _positive_int(config, "generator.client_embed_dim", minimum=0)
    optimizers.append("generator.optimizer")
  if "hyperlora" in config:
    hl = config.hyperlora
    try:
      kinds = parse_kinds(hl.signature)
    except ValueError as e:
      raise ConfigError(f"hyperlora.signature: {e}") from None
    _require(not hl.generator or bool(kinds), "hyperlora.signature",
             "the generator needs a conditioning: name at least one of label, features, embedding "
             "(or set hyperlora.generator=False)")
    _one_of(hl.synthesizer, ("learned", "uniform"), "hyperlora.synthesizer")
    _one_of(hl.corrector, CORRECTORS, "hyperlora.corrector")
    _require(hl.signature_noise_std >= 0, "hyperlora.signature_noise_std", "must be >= 0")
    _positive_int(config, "hyperlora.covariance_rank")
    _positive_int(config, "hyperlora.synthesizer_hidden")
    optimizers.append("hyperlora.meta_optimizer")
  for name in optimizers:
    block = config
    for part in name.split("."):
      block = block[part]
    _one_of(block.name, ALLOWED_OPTIMIZERS, f"{name}.name")
    _require(block.learning_rate > 0, f"{name}.learning_rate", f"must be > 0, got {block.learning_rate}")
    _require(0 <= block.momentum < 1, f"{name}.momentum", f"must be in [0, 1), got {block.momentum}")
  _require(config.pretrain.learning_rate > 0, "pretrain.learning_rate", "must be > 0")
