"""Shared fixtures: a hermetic data dir and backbone cache, and the smoke config."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs/` and `experiments/` are plain directories.


@pytest.fixture(scope="session")
def cache_dirs(tmp_path_factory):
  """A per-session TFDS data_dir and backbone cache, so tests never touch ~/.cache."""
  base = tmp_path_factory.mktemp("hyperlora_cache")
  return {"data_dir": str(base / "tfds"), "cache_dir": str(base / "backbones")}


@pytest.fixture
def smoke_config(cache_dirs):
  """The `smoke` variant of configs/default.py pointed at the session caches."""
  from configs import default
  config = default.get_config("smoke")
  config.data.data_dir = cache_dirs["data_dir"]
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  return config
