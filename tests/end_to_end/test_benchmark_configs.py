"""The benchmark configs: embedded (DomainNet-like, label skew 100, vision-language, Mixer)
and real-dataset (DomainNet, CIFAR-100 through TFDS, tested with TFDS mock data)."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar100, domainnet, domainnet_like, label_skew, vision_language
from hyperlora_jax import models
from experiments.runner import methods
from experiments.runner.config_validation import ConfigError, validate_config
from experiments.runner.data import partition
from experiments.runner.data.loader import load_image_dataset
from hyperlora_jax.models import npz
from experiments.runner.experiment import build_experiment
from experiments.runner.train import train_and_evaluate

QUIET = {"progress": False, "log": lambda _: None}


def _hermetic(config, cache_dirs):
  config.data.data_dir = config.data.data_dir or cache_dirs["data_dir"]
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  return config


def test_embedded_benchmarks_are_what_their_docstrings_say():
  one = domainnet_like.get_config("clients_per_domain=1")
  assert (one.data.partition, one.data.num_clients, one.fed.clients_per_round) == ("one_domain_per_client", 6, 6)
  five = domainnet_like.get_config("")
  assert (five.data.partition, five.data.num_clients, five.fed.clients_per_round) == ("domain_dirichlet", 30, 10)
  assert five.data.dirichlet_alpha == 0.5 and five.benchmark == "domainnet_like/5_per_domain"
  assert domainnet_like.get_config("model=mixer").model.name == "mixer"
  for alpha in ("0.1", "0.5", "1.0"):
    ls = label_skew.get_config(f"alpha={alpha}")
    assert (ls.data.num_clients, ls.fed.clients_per_round, ls.data.heldout_clients) == (100, 10, 10)
    assert ls.data.dirichlet_alpha == float(alpha) and ls.benchmark == f"label_skew_100/alpha{float(alpha):g}"
  vl = vision_language.get_config("")
  assert vl.model.name == "clip" and vl.lora.target_regex.startswith("(image|text)_tower/")
  for config in (
    one,
    five,
    ls,
    vl,
    domainnet_like.get_config("smoke,model=mixer"),
    vision_language.get_config("smoke"),
    label_skew.get_config("smoke,alpha=0.1"),
  ):
    validate_config(config, methods.METHODS)


def test_label_skew_100_partitions_the_embedded_data_at_every_alpha(cache_dirs):
  train = load_image_dataset("digits_domains/res16", "train", cache_dirs["data_dir"], 16)
  test = load_image_dataset("digits_domains/res16", "test", cache_dirs["data_dir"], 16)
  for alpha in (0.1, 0.5, 1.0):
    tr, te = partition.partition_train_test(
      "client_dirichlet", train.labels, train.domains, test.labels, test.domains, 110, seed=0, alpha=alpha, min_size=5
    )
    assert min(map(len, tr)) >= 5 and sum(map(len, tr)) == len(train) and sum(map(len, te)) == len(test)
    classes_per_client = np.mean([len(np.unique(train.labels[p])) for p in tr])
    assert classes_per_client < 10  # Skewed: clients miss classes (fewer at smaller alpha).


def test_real_dataset_configs_need_a_checkpoint():
  for module in (domainnet, cifar100):
    config = module.get_config("")
    assert config.model.width == 768 and config.data.image_size == 224
    with pytest.raises(ConfigError, match="pretrain.npz_path"):
      validate_config(config, methods.METHODS)
  with pytest.raises(ConfigError, match="pretrain.npz_path: no such file"):
    validate_config(cifar100.get_config("npz=/nonexistent.npz"), methods.METHODS)


def _write_smoke_vit_npz(config, path):
  arch = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  model = models.ViT(num_classes=7, **arch)
  x = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
  npz.save_npz(path, "vit", model.init(jax.random.key(0), x)["params"], num_heads=arch["num_heads"])


@pytest.mark.parametrize("module,num_classes,num_domains", [(cifar100, 100, 1), (domainnet, 345, 6)])
def test_real_dataset_configs_run_on_tfds_mock_data(module, num_classes, num_domains, tmp_path, cache_dirs):
  probe = module.get_config("smoke")
  npz = str(tmp_path / "vit.npz")
  _write_smoke_vit_npz(probe, npz)
  config = _hermetic(
    module.get_config(f"smoke,npz={npz},data_dir={tmp_path / 'tfds'},method=flexlora,rounds=2"), cache_dirs
  )
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    exp = build_experiment(config, log=lambda _: None)
    assert exp.data.num_classes == num_classes and len(exp.data.train_pool.domain_names) == num_domains
    assert exp.data.train_pool.images.shape[1:] == (32, 32, 3)  # Resized from the stored sizes.
    result = train_and_evaluate(config, str(tmp_path / "run"), **QUIET)
  last = result["records"][-1]
  assert last["round"] == 2 and 0.0 <= last["global_accuracy"] <= 1.0 and last["cum_bytes"] > 0


@pytest.mark.parametrize("method", [pytest.param("fedit", marks=pytest.mark.slow), "hyperlora"])
def test_vision_language_adapts_both_towers_and_classifies_zero_shot(method, tmp_path, cache_dirs):
  config = _hermetic(vision_language.get_config(f"smoke,method={method},rounds=2"), cache_dirs)
  exp = build_experiment(config, log=lambda _: None)
  assert exp.initial_trainable["head"] == {} and exp.task.head_name is None
  assert {p.split("/")[0] for p in exp.targets} == {"image_tower", "text_tower"}
  result = train_and_evaluate(config, str(tmp_path), **QUIET)
  last = result["records"][-1]
  assert result["round_traces"] == 1 and np.isfinite(last["train_loss"]) and last["nonfinite_clients"] == 0
  assert 0.0 <= last["global_accuracy"] <= 1.0


@pytest.mark.slow
def test_mixer_backbone_runs_the_domainnet_like_benchmark(tmp_path, cache_dirs):
  config = _hermetic(
    domainnet_like.get_config("smoke,model=mixer,clients_per_domain=1,method=fedit,rounds=2"), cache_dirs
  )
  result = train_and_evaluate(config, str(tmp_path), **QUIET)
  assert result["records"][-1]["round"] == 2 and np.isfinite(result["records"][-1]["train_loss"])
