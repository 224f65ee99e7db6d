"""Every invalid config field fails before compiling, with a message naming the field."""

import os

import ml_collections
import pytest

from configs import default
from experiments import sweep
from experiments.runner import methods
from experiments.runner.config_validation import ConfigError, validate_config
from experiments.runner.experiment import build_experiment

from tests.repo_paths import ROOT

INVALID = [
  ("method", "fedavgx", "method"),
  ("data.partition", "random", "data.partition"),
  ("data.num_clients", 0, "data.num_clients"),
  ("data.dirichlet_alpha", 0.0, "data.dirichlet_alpha"),
  ("data.image_size", 18, "model.patch_size"),
  ("data.name", "", "data.name"),
  ("fed.clients_per_round", 50, "fed.clients_per_round"),
  ("fed.local_steps", 0, "fed.local_steps"),
  ("fed.batch_size", -1, "fed.batch_size"),
  ("fed.head_policy", "private", "fed.head_policy"),
  ("fed.clients_per_chunk", -2, "fed.clients_per_chunk"),
  ("fed.model_parallel", 0, "fed.model_parallel"),
  ("compute.backbone_dtype", "fp8", "compute.backbone_dtype"),
  ("data.feed", "disk", "data.feed"),
  ("model.name", "resnet", "model.name"),
  ("model.num_heads", 3, "model.num_heads"),
  ("model.mlp_ratio", 0.0, "model.mlp_ratio"),
  ("lora.rank", 0, "lora.rank"),
  ("lora.alpha", -1.0, "lora.alpha"),
  ("lora.target_regex", "(unclosed", "lora.target_regex"),
  ("client_optimizer.name", "lion", "client_optimizer.name"),
  ("client_optimizer.learning_rate", 0.0, "client_optimizer.learning_rate"),
  ("server_optimizer.momentum", 1.5, "server_optimizer.momentum"),
  ("eval_every", 0, "eval_every"),
  ("checkpoint_every", 0, "checkpoint_every"),
  ("export_every", -1, "export_every"),
  ("export_clients", "0;3", "export_clients"),
  ("export_clients", "some", "export_clients"),
  ("pretrain.steps", -1, "pretrain.steps"),
  # Fuzzed values: without their checks each ends in a deep traceback or is accepted.
  ("seed", -1, "seed"),
  ("pretrain.steps", 0, "pretrain.steps"),
  ("model.mlp_ratio", 1e-9, "model.mlp_ratio"),
  ("client_optimizer.learning_rate", float("inf"), "client_optimizer.learning_rate"),
  ("pretrain.learning_rate", float("inf"), "pretrain.learning_rate"),
  ("lora.alpha", float("inf"), "lora.alpha"),
  ("data.dirichlet_alpha", float("nan"), "data.dirichlet_alpha"),
  ("data.min_client_size", 0, "data.min_client_size"),
  ("benchmark", "../outside", "benchmark"),
  ("benchmark", "/abs/path", "benchmark"),
]

# Fields of method blocks: (method, field, value, named).
INVALID_FOR_METHOD = [
  ("lora_fair", "lora_fair.steps", 0, "lora_fair.steps"),  # Was FedIT under LoRA-FAIR's name.
  ("lora_fair", "lora_fair.learning_rate", -1.0, "lora_fair.learning_rate"),  # Was gradient ascent.
  ("lora_fair", "lora_fair.lam", -0.5, "lora_fair.lam"),
  ("pfedhn", "generator.client_embed_dim", 0, "generator.client_embed_dim"),
  ("hyperlora", "hyperlora.signature_noise_std", float("inf"), "hyperlora.signature_noise_std"),
  ("hyperlora", "generator.optimizer.learning_rate", float("inf"), "generator.optimizer.learning_rate"),
]

# Checks that need dataset metadata or model shapes, made before any example or weight is read.
INVALID_BEFORE_LOADING = [
  ("data.name", "no_such_dataset", "data.name"),
  ("data.train_split", "no_such_split", "data.train_split"),
  ("data.test_split", "no_such_split", "data.test_split"),
  ("pretrain.split", "no_such_split", "pretrain.split"),
  ("pretrain.batch_size", 10**7, "pretrain.batch_size"),
  ("data.num_clients", 100000, "data.num_clients"),
  ("fed.num_devices", 64, "fed.num_devices"),
  ("fed.model_parallel", 2, "fed.model_parallel"),  # A model axis of 2 on this 1-device machine.
  ("pretrain.cache_dir", "/proc/no_such/cache", "pretrain.cache_dir"),
  ("lora.rank", 64, "lora.rank"),  # The smoke model's attention is 16 wide.
]


@pytest.mark.parametrize(
  "changes,named",
  [
    ({"schedule": "linear"}, "generator.optimizer.schedule"),
    ({"schedule": "cosine", "decay_steps": 0}, "generator.optimizer.decay_steps"),
    ({"schedule": "cosine", "final_fraction": 1.5}, "generator.optimizer.final_fraction"),
  ],
)
def test_the_generator_learning_rate_schedule_is_checked_field_by_field(changes, named):
  config = default.get_config("method=hyperlora")
  config.generator.optimizer.update(changes)
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    validate_config(config, methods.METHODS)
  config.generator.optimizer.schedule = "constant"  # Unused fields of a constant rate are not checked.
  assert validate_config(config, methods.METHODS) is None


def test_default_smoke_and_every_method_config_are_valid():
  for arg in (None, "smoke", "method=local_only,seed=3"):
    assert validate_config(default.get_config(arg), methods.METHODS) is None
  for name in methods.METHODS:  # `configs/default.py:method=X` selects every method.
    config = default.get_config(f"method={name},seed=4")
    assert (config.method, config.seed) == (name, 4)
    assert validate_config(config, methods.METHODS, methods.METHOD_BLOCKS) is None


def test_other_methods_blocks_are_not_validated_or_saved_with_a_run(smoke_config, tmp_path):
  """A FedIT run neither checks nor records `hyperlora.*`, so a changed HyperLoRA default
  cannot stop it from resuming; a HyperLoRA run checks and records it."""
  from experiments.runner.config_validation import used_config
  from experiments.runner.train import train_and_evaluate

  smoke_config.hyperlora.corrector = "no_such_corrector"
  assert validate_config(smoke_config, methods.METHODS, methods.METHOD_BLOCKS) is None
  assert {"hyperlora", "generator", "lora_fair"}.isdisjoint(used_config(smoke_config, methods.METHOD_BLOCKS))
  smoke_config.hyperlora.corrector = "learned"
  train_and_evaluate(smoke_config, str(tmp_path), stop_after_round=1, progress=False)
  smoke_config.hyperlora.synthesizer_hidden = 7  # Unrelated to FedIT: the workdir still resumes.
  smoke_config.fed.num_rounds = 2
  assert [r["round"] for r in train_and_evaluate(smoke_config, str(tmp_path), progress=False)["records"]] == [1, 2]
  smoke_config.method, smoke_config.hyperlora.corrector = "hyperlora", "no_such_corrector"
  with pytest.raises(ConfigError, match="^hyperlora[.]corrector"):
    validate_config(smoke_config, methods.METHODS, methods.METHOD_BLOCKS)


@pytest.mark.parametrize("field,value,named", INVALID, ids=[f for f, _, _ in INVALID])
def test_invalid_field_is_named(field, value, named):
  config = default.get_config("smoke")
  sweep.set_field(config, field, value)
  with pytest.raises(ConfigError, match=rf"^{named.replace('.', '[.]')}:"):
    validate_config(config, methods.METHODS)


@pytest.mark.parametrize("method,field,value,named", INVALID_FOR_METHOD, ids=[f for _, f, _, _ in INVALID_FOR_METHOD])
def test_invalid_method_block_field_is_named(method, field, value, named):
  config = default.get_config(f"smoke,method={method}")
  sweep.set_field(config, field, value)
  with pytest.raises(ConfigError, match=rf"^{named.replace('.', '[.]')}:"):
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)


@pytest.mark.parametrize("field,value,named", INVALID_BEFORE_LOADING, ids=[f for f, _, _ in INVALID_BEFORE_LOADING])
def test_invalid_field_needing_metadata_is_named_before_anything_is_read(field, value, named, cache_dirs, tmp_path):
  """From dataset metadata and abstract model shapes: no image is read and nothing is
  pretrained (the backbone cache stays empty), so the error comes in seconds."""
  import os
  import time

  config = default.get_config("smoke")
  config.data.data_dir = cache_dirs["data_dir"]
  config.pretrain.cache_dir = str(tmp_path / "backbones")
  sweep.set_field(config, field, value)
  start = time.time()
  with pytest.raises(ConfigError, match=rf"^{named.replace('.', '[.]')}:"):
    build_experiment(config, log=lambda _: None)
  assert time.time() - start < 60
  assert not os.path.exists(tmp_path / "backbones") or not os.listdir(tmp_path / "backbones")


def test_build_experiment_validates_before_loading_anything(tmp_path):
  config = default.get_config("smoke")
  config.data.data_dir = str(tmp_path / "never_created")
  config.lora.rank = 0
  with pytest.raises(ConfigError, match="lora.rank"):
    build_experiment(config)
  assert not (tmp_path / "never_created").exists()


def test_hyperlora_ablation_configs_switch_components_off():
  from configs import hyperlora

  for name, fields in hyperlora.ABLATIONS.items():
    config = hyperlora.get_config(f"smoke,seed=2,ablation={name}")
    assert config.method == "hyperlora" and config.seed == 2 and config.fed.num_rounds == 3
    for field, value in fields.items():
      assert config.hyperlora[field] == value
  assert hyperlora.get_config("ablation=distill_generator").generator.loss == "product_distill"
  both = hyperlora.get_config("ablation=no_generator+no_corrector").hyperlora
  assert (both.generator, both.corrector) == (False, "none")
  with pytest.raises(ValueError, match="ablation"):
    hyperlora.get_config("ablation=no_such_thing")


@pytest.mark.parametrize(
  "config_arg,field,value,named",
  [
    ("smoke,model=mixer", "model.tokens_mlp_dim", 0, "model.tokens_mlp_dim"),
    ("smoke,model=mixer", "model.patch_size", 3, "model.patch_size"),
    ("smoke", "model.text_heads", 3, "model.text_heads"),
    ("smoke", "model.prompt_template", "a photo of a digit", "model.prompt_template"),
    ("smoke", "model.vocab_size", 2, "model.vocab_size"),
    ("smoke", "pretrain.npz_path", "/no/such/file.npz", "pretrain.npz_path"),
  ],
)
def test_invalid_backbone_field_is_named(config_arg, field, value, named):
  from configs import domainnet_like, vision_language

  module = domainnet_like if "mixer" in config_arg else vision_language
  config = module.get_config(config_arg)
  sweep.set_field(config, field, value)
  with pytest.raises(ConfigError, match=rf"^{named.replace('.', '[.]')}"):
    validate_config(config, methods.METHODS)


def test_a_field_of_another_backbone_is_named():
  from configs import domainnet_like

  config = domainnet_like.get_config("model=mixer")
  config.model.num_heads = 4  # A ViT field.
  with pytest.raises(ConfigError, match=r"^model[.]num_heads: not a field of model 'mixer'; its fields: patch_size"):
    validate_config(config, methods.METHODS)


def test_a_run_recorded_before_a_field_existed_resumes_when_the_field_means_as_before(smoke_config, tmp_path):
  import json

  from experiments.runner.config_validation import used_config
  from experiments.runner.workdir import CONFIG_FILE, config_differences

  recorded = used_config(smoke_config, methods.METHOD_BLOCKS)
  del recorded["data"]["max_client_examples"]  # As written before the field was added,
  for block in ("faults", "robust", "dp"):  # and before these blocks were (`make run`'s old workdirs).
    del recorded[block]
  with open(tmp_path / CONFIG_FILE, "w") as f:
    json.dump(recorded, f)
  assert config_differences(str(tmp_path), smoke_config) == []
  smoke_config.data.max_client_examples = 8  # Not what the recorded run did.
  assert config_differences(str(tmp_path), smoke_config) == ["data.max_client_examples"]
  smoke_config.data.max_client_examples, smoke_config.method = 0, "hyperlora"  # Before the schedule:
  recorded = used_config(smoke_config, methods.METHOD_BLOCKS)
  for field in ("schedule", "decay_steps", "final_fraction"):
    del recorded["generator"]["optimizer"][field]
  with open(tmp_path / CONFIG_FILE, "w") as f:
    json.dump(recorded, f)
  assert config_differences(str(tmp_path), smoke_config) == []
  smoke_config.generator.optimizer.schedule = "cosine"
  assert config_differences(str(tmp_path), smoke_config) == ["generator.optimizer.schedule"]
  from configs import instruction_tuning

  text = instruction_tuning.get_config("smoke")  # A text run recorded before data.data_dir.
  recorded = used_config(text, methods.METHOD_BLOCKS)
  del recorded["data"]["data_dir"]
  with open(tmp_path / CONFIG_FILE, "w") as f:
    json.dump(recorded, f)
  assert config_differences(str(tmp_path), text) == []
  text.data.data_dir = "/elsewhere"
  assert config_differences(str(tmp_path), text) == ["data.data_dir"]


def test_a_checkpoint_written_before_the_synthesizer_metrics_restores_with_them_at_init(tmp_path):
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp

  from experiments.runner.workdir import checkpoint_manager as _checkpoint_manager, restore_state

  old = {"round": jnp.int32(7), "agg": {"meta_loss": jnp.float32(0.5), "residual": {"l": jnp.ones((2, 3))}}}
  manager = _checkpoint_manager(str(tmp_path / "old"))
  manager.save(7, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  fresh = {
    "round": jnp.int32(0),
    "agg": {
      "meta_loss": jnp.float32(0.0),
      "residual": {"l": jnp.zeros((2, 3))},
      "synth_weight_kl": jnp.float32(0.0),
      "corrector_gate": jnp.float32(0.5),
    },
  }
  restored, step = restore_state(manager, fresh)
  manager.close()
  assert step == 7 and int(restored["round"]) == 7 and float(restored["agg"]["meta_loss"]) == 0.5
  np.testing.assert_array_equal(restored["agg"]["residual"]["l"], np.ones((2, 3)))
  assert float(restored["agg"]["corrector_gate"]) == 0.5 and float(restored["agg"]["synth_weight_kl"]) == 0.0
  # Any other mismatch is still reported, not papered over.
  wrong = {**fresh, "agg": {**fresh["agg"], "residual": {"l": jnp.zeros((3, 3))}}}
  with pytest.raises(RuntimeError, match="corrupt or incompatible"):
    restore_state(_checkpoint_manager(str(tmp_path / "old")), wrong)


def test_a_config_argument_or_error_is_one_line_without_a_traceback_unless_verbose(tmp_path):
  """`:clients=abc` and `partition=nope` are one-line errors naming the argument (not a
  traceback, nor a run as a Dirichlet partition); --verbose adds the traceback."""
  import subprocess
  import sys

  command = [sys.executable, "-m", "experiments.main", "--workdir", str(tmp_path / "run")]
  for arg, message in (
    ("partition=dirichlet,clients=abc", "config argument clients='abc': an integer expected"),
    ("partition=nope", "config argument partition='nope': one of category, dirichlet expected"),
  ):
    result = subprocess.run(
      command + [f"--config=configs/instruction_tuning.py:{arg}"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
      f"error: ConfigArgumentError: {message} (--verbose: the traceback)"
    )
  verbose = subprocess.run(
    command + ["--config=configs/instruction_tuning.py:partition=nope", "--verbose"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
  "field, value, named",
  [
    ("data.data_dir", "/nonexistent/x", "neither '/nonexistent/x' nor its parent '/nonexistent' exists"),
    ("data.data_dir", "/proc/x", "cannot write to '/proc/x'"),
    ("pretrain.cache_dir", __file__, "is a file, not a directory"),
    ("data.test_fraction", 0.0, "must be in \\(0, 1\\)"),
    ("mc.path", "/nonexistent/mmlu.jsonl", "does not exist"),
    ("mc.every", -1, ""),
    ("mc.max_questions", -2, ""),
  ],
)
def test_text_fields_that_used_to_fail_late_or_create_nonsense_are_named(field, value, named):
  from configs import instruction_tuning

  config = instruction_tuning.get_config("smoke")
  block, name = field.split(".")
  config[block][name] = value
  with pytest.raises(ConfigError, match=rf"^{field}: .*{named}"):
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  assert not os.path.exists("/nonexistent")


def test_multiple_choice_is_a_text_runs_evaluation(smoke_config):
  smoke_config.mc = ml_collections.ConfigDict({"path": "embedded", "every": 0, "max_questions": 0, "max_len": 0})
  with pytest.raises(ConfigError, match="^mc.path: multiple-choice evaluation is for text runs"):
    validate_config(smoke_config, methods.METHODS, methods.METHOD_BLOCKS)


def test_a_host_feed_is_refused_by_name_where_the_devices_have_no_host_memory(smoke_config, monkeypatch):
  """data.feed='host' on devices listing no pinned host memory fails before anything is built,
  naming the field; where they have it (this CPU) it passes. Text runs take 'round' or 'host'."""
  from configs import instruction_tuning
  from experiments.runner import config_validation

  smoke_config.data.feed = "host"
  assert config_validation.check_mesh_fits(smoke_config).size == 1
  monkeypatch.setattr(config_validation, "has_host_memory", lambda device: False)
  with pytest.raises(ConfigError, match=r"^data.feed: 'host' holds each round's block in pinned host memory"):
    config_validation.check_mesh_fits(smoke_config)
  text = instruction_tuning.get_config("smoke")
  text.data.feed = "host"
  validate_config(text, methods.METHODS, methods.METHOD_BLOCKS)
  text.data.feed = "chunk"
  with pytest.raises(ConfigError, match=r"^data.feed: text runs feed whole rounds"):
    validate_config(text, methods.METHODS, methods.METHOD_BLOCKS)
