"""The config unpacked into typed values (`configs.blocks.from_config`, `experiments.runner.settings`)."""

import dataclasses

import ml_collections
import pytest

from configs import blocks, default, instruction_tuning
from experiments.runner import methods
from experiments.runner.config_facts import ConfigError
from experiments.runner.settings import backbone_settings, data_block, run_settings
from hyperlora_jax.faults import Faults


def test_from_config_types_nested_blocks_fills_missing_fields_and_names_unknown_ones():
  recorded = {  # As a workdir's config.json holds a block: lists, a nested block, a field missing.
    "hidden": 8,
    "loss": "product_distill",
    "optimizer": {"name": "sgd", "learning_rate": 0.5, "momentum": 0.9},
  }
  generator = blocks.from_config(blocks.Generator, recorded)
  assert generator == blocks.Generator(
    hidden=8, loss="product_distill", optimizer=blocks.ScheduledOptimizer(name="sgd", learning_rate=0.5, momentum=0.9)
  )
  assert generator.optimizer.schedule == "constant"  # Recorded before the schedule existed: the default.
  lora = blocks.from_config(blocks.Lora, ml_collections.ConfigDict({"rank": 8, "client_ranks": [2, 4]}))
  assert lora.client_ranks == (2, 4) and isinstance(lora.client_ranks, tuple)
  assert blocks.from_config(blocks.DP, None) == blocks.DP()
  with pytest.raises(KeyError, match="Lora has no field ranks"):
    blocks.from_config(blocks.Lora, {"ranks": 8})


def test_every_block_of_the_default_configs_is_its_dataclass_with_the_same_values():
  """The typed values hold every field of the config as it is (a dataclass default drifting from
  a config file, or a field the dataclass lacks, fails here)."""
  for config in (default.get_config(), default.get_config("smoke"), instruction_tuning.get_config("smoke")):
    text = config.get("task") == "instruction_tuning"
    typed = {
      "data": (blocks.TextData if text else blocks.ImageData),
      "pretrain": (blocks.TextPretrain if text else blocks.ImagePretrain),
      "lora": blocks.Lora,
      "fed": blocks.Fed,
      "client_optimizer": blocks.Optimizer,
      "server_optimizer": blocks.Optimizer,
      "generator": blocks.Generator,
      "hyperlora": blocks.HyperLoRA,
      "lora_fair": blocks.LoraFair,
      "robust": blocks.Robust,
      "dp": blocks.DP,
      "faults": Faults,
      **({"mc": blocks.MultipleChoice, "gen": blocks.GenerationEval} if text else {}),
    }
    assert set(typed) | {"model", "compute"} == {
      k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)
    }
    for name, block_type in typed.items():
      value = blocks.from_config(block_type, config[name])
      assert dataclasses.asdict(value) == config[name].to_dict(), name


def test_run_settings_read_what_the_config_says():
  config = default.get_config("smoke,method=hyperlora")
  config.fed.clients_per_round, config.lora.client_ranks, config.dp.delta = 3, (2, 4), 1e-6
  settings = run_settings(config)
  assert settings.fed.clients_per_round == 3 and settings.lora.client_ranks == (2, 4)
  assert settings.method == methods.method_settings(config) and settings.dp.delta == 1e-6
  assert settings.input_size == ("data.image_size", 16) and not settings.text
  assert settings.faults == Faults() and settings.num_clients == config.data.num_clients == 6
  text = run_settings(instruction_tuning.get_config("smoke"))
  assert text.text and text.input_size == ("data.max_len", 176)
  assert isinstance(data_block(instruction_tuning.get_config("smoke")), blocks.TextData)
  backbone = backbone_settings(config)
  assert backbone.image_size == 16 and backbone.pretrain == blocks.ImagePretrain(
    steps=300, batch_size=32, learning_rate=3e-3
  )


def test_a_block_field_the_dataclass_does_not_know_is_a_config_error_naming_the_block():
  config = default.get_config("smoke")
  config.fed.unlock()
  config.fed.clients_per_roud = 4  # A misspelled field added to a config file.
  with pytest.raises(ConfigError, match="^fed: Fed has no field clients_per_roud"):
    run_settings(config)
