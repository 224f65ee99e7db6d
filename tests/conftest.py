"""Shared fixtures: a hermetic data dir and backbone cache, and the smoke config."""

import atexit
import os
import shutil
import sys
import tempfile

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs/` and `experiments/` are plain directories.

# Tests compile with XLA's CPU backend at LLVM optimization level 0: compiling is most of a
# test's time (a smoke HyperLoRA run: 25 -> 19 s; the suite on 2 cores: 808 -> 602 s), and the
# tests check what a computation gives, not how fast. Floats may round differently from a run
# at the default level, so tests compare runs of the session with each other or against
# references within tolerances, never against numbers a run at another level wrote.
# HYPERLORA_TEST_XLA_O0=0 keeps XLA's default level. Set before the backend starts; the tests'
# subprocesses inherit it (`tests/cpu_devices.py` keeps it beside the device count).
if os.environ.get("HYPERLORA_TEST_XLA_O0", "1") != "0" and "xla_backend_optimization_level" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# A persistent compilation cache shared by the whole test session: the many end-to-end tests
# compile the same smoke-config rounds again and again (straight, killed, resumed runs), in both
# pytest-xdist workers and in the subprocesses some tests start; compiled once, each is loaded
# from disk after that (one resume test: 80 s -> 52 s on 2 cores). The first pytest process (the
# xdist controller) makes the directory and names it in the environment, which its workers and
# the tests' subprocesses inherit. No size limit: a limit makes JAX lock the directory and scan
# every entry at each write (thousands here: slower than compiling); an entry read while another
# process writes it fails to decompress, and JAX then warns and compiles. The executable is the
# same, so results are too. HYPERLORA_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("HYPERLORA_TEST_COMPILE_CACHE", "1") != "0":
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hyperlora_test_jit_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
