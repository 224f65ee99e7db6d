"""Runs that cannot fit are refused before the hours they would cost (`experiments.runner.memory`):
by the config alone before anything is prepared, then by the compiled round before it runs."""

import os

import pytest

from configs import instruction_tuning
from experiments.runner import memory
from experiments.runner.config_validation import ConfigError, preflight
from experiments.runner.train import train_and_evaluate


def test_a_decoder_steps_memory_follows_its_formula_by_hand():
  # B=2, T=3, V=5, D=4, depth 1, H=2: logits 2·2·3·5 = 60, attention 1·2·2·3² = 36, hidden 12·1·2·3·4 = 288.
  assert memory.decoder_step_bytes(2, 3, 5, 4, 1, 2) == (60 + 36 + 288) * 4


@pytest.mark.parametrize(
  "field, value, named",
  [
    ("data.max_len", 100000, "data.max_len"),  # Used to tokenize 602 MB, then ask for 3.2 TB.
    ("fed.batch_size", 100000, "fed.batch_size"),  # Used to fail after compiling.
    ("pretrain.sequence_length", 100000, "pretrain.sequence_length"),
  ],
)  # Used to be killed by the OOM killer.
def test_a_text_run_that_cannot_fit_is_refused_before_anything_is_prepared(field, value, named, tmp_path):
  config = instruction_tuning.get_config("")
  config.pretrain.cache_dir, config.data.data_dir = str(tmp_path / "cache"), str(tmp_path / "tokenized")
  block, name = field.split(".")
  setattr(config[block], name, value)
  with pytest.raises(ConfigError, match=rf"^{named}: .* needs about [\d.]+ GiB, more than the [\d.]+ GiB"):
    preflight(config)
  assert not os.path.exists(tmp_path / "tokenized") and not os.path.exists(tmp_path / "cache" / "backbones")
  preflight(instruction_tuning.get_config(""))  # The default fits.


def test_a_compiled_round_larger_than_the_device_is_refused_before_it_runs(smoke_config, tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1000)
  with pytest.raises(
    ConfigError,
    match=r"fed.clients_per_chunk: the compiled round needs about [\d.]+ GiB, more "
    r"than the 0.0 GiB .*fed.batch_size=8, data.image_size=16",
  ):
    train_and_evaluate(smoke_config, str(tmp_path), progress=False, log=lambda _: None)
  from experiments.runner import reporting

  assert reporting.read_metrics(str(tmp_path)) == []  # Not one round ran.


def test_a_small_vocabulary_is_refused_before_the_decoder_is_pretrained(tmp_path):
  """pretrain.vocab_size=300 is refused by data.max_len in about a second, before the 52 s of
  pretraining it would otherwise cost."""
  from experiments.runner.text_experiment import prepare_text_inputs

  config = instruction_tuning.get_config("smoke")
  config.pretrain.cache_dir, config.data.data_dir = str(tmp_path / "cache"), str(tmp_path / "tokenized")
  config.pretrain.vocab_size, config.data.max_len = 300, 64
  logs = []
  with pytest.raises(
    ConfigError,
    match=r"data.max_len: \d+ of 526 records keep no response token.*"
    r"pretrain.vocab_size=300",
  ):
    prepare_text_inputs(config, logs.append)
  assert not any("pretraining a" in line for line in logs), logs
