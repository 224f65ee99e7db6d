"""Every invalid config field fails before compiling, with a message naming the field."""
import pytest

from configs import default
from experiments import sweep
from hyperlora_jax import methods
from hyperlora_jax.config_validation import ConfigError, validate_config
from hyperlora_jax.train import build_experiment

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
    ("pretrain.steps", -1, "pretrain.steps"),
]


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
  from hyperlora_jax.config_validation import used_config
  from hyperlora_jax.train import train_and_evaluate
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


@pytest.mark.parametrize("config_arg,field,value,named", [
    ("smoke,model=mixer", "model.tokens_mlp_dim", 0, "model.tokens_mlp_dim"),
    ("smoke,model=mixer", "model.patch_size", 3, "model.patch_size"),
    ("smoke", "model.text_heads", 3, "model.text_heads"),
    ("smoke", "model.prompt_template", "a photo of a digit", "model.prompt_template"),
    ("smoke", "model.vocab_size", 2, "model.vocab_size"),
    ("smoke", "pretrain.npz_path", "/no/such/file.npz", "pretrain.npz_path"),
])
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
