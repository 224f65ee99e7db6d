"""The runner's caches prove their integrity: tokenized records, the embedded decoder and the
pretrained backbone each carry a manifest of their files' sha256 written last; a changed byte
is reported by name and the cache left in place, and concurrent builds of one cache all succeed."""

import multiprocessing
import os
import shutil

import numpy as np
import pytest

from configs import instruction_tuning
from experiments.runner import backbone as backbone_lib, pretrain, pretrain_text
from experiments.runner.data import instructions
from hyperlora_jax import files
from hyperlora_jax.models import hf
from experiments.runner.settings import BackboneSettings, backbone_settings
from tests.runner.data.test_instructions import FIXTURES, _data_config, write_dolly_jsonl


def _flip_bytes(path: str, offset: int = 0, count: int = 8) -> None:
  """Random bytes of the same size at `offset` (what a size check cannot see)."""
  with open(path, "r+b") as f:
    f.seek(offset)
    old = f.read(count)
    f.seek(offset)
    f.write(bytes((b + 1) % 256 for b in old))


def test_random_bytes_in_a_tokenized_file_are_named_not_used(tmp_path):
  """Same-size random bytes in loss_mask.bin are named by file (unchecked, they run to exit 0
  with 'global accuracy 90973798400.0%'); ids outside the vocabulary are refused (unchecked,
  they drop clients as non-finite)."""
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  config = _data_config(write_dolly_jsonl(tmp_path / "dolly.jsonl"), tmp_path)
  directory = instructions.prepare_tokenized(config, tokenizer, log=lambda _: None).directory
  assert os.path.isfile(os.path.join(directory, files.MANIFEST_FILE))
  _flip_bytes(os.path.join(directory, "loss_mask.bin"), offset=40)
  before = open(os.path.join(directory, "loss_mask.bin"), "rb").read()
  with pytest.raises(
    instructions.TokenizedCacheError, match=r"loss_mask.bin: its content changed.*delete the directory"
  ):
    instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  assert open(os.path.join(directory, "loss_mask.bin"), "rb").read() == before  # Left as found.
  shutil.rmtree(directory)
  records = instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  with pytest.raises(
    instructions.TokenizedCacheError,
    match=r"input_ids.bin holds ids in \[0, \d+\].*outside the 100 ids the model embeds",
  ):
    instructions.open_tokenized(records.directory, vocab_size=100)  # A model with fewer embedding rows.


def _tiny_decoder(cache_dir: str) -> BackboneSettings:
  """The backbone settings of a text smoke run whose embedded decoder pretrains 4 steps into `cache_dir`."""
  config = instruction_tuning.get_config("smoke,method=fedit")
  config.pretrain.cache_dir, config.pretrain.steps = cache_dir, 4
  return backbone_settings(config)


def _build_decoder(cache_dir: str) -> str:
  return pretrain_text.decoder_directory(_tiny_decoder(cache_dir), log=lambda _: None)


def test_two_runs_building_the_embedded_decoder_at_once_both_get_it(tmp_path):
  """Two text runs on an empty cache both get the decoder, and no .partial directory is left
  (the losing rename must not die with 'Directory not empty')."""
  context = multiprocessing.get_context("spawn")
  with context.Pool(2) as pool:
    directories = pool.map(_build_decoder, [str(tmp_path)] * 2)
  assert directories[0] == directories[1]
  assert os.listdir(tmp_path) == [os.path.basename(directories[0])]  # No partial directory left.
  files.verify_manifest(directories[0])


def test_a_changed_cached_decoder_is_reported_and_kept(tmp_path):
  """Changed bytes in a cached decoder's weights are reported by file and the cache kept (a
  NaN weight would make every client non-finite every round); a user's checkpoint with NaN is
  refused by tensor."""
  directory = _build_decoder(str(tmp_path))
  weights = os.path.join(directory, hf.WEIGHTS_FILE)
  _flip_bytes(weights, offset=os.path.getsize(weights) - 64)
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: its content changed.*left in place"):
    backbone_lib.text_backbone(_tiny_decoder(str(tmp_path)), log=lambda _: None)
  user = tmp_path / "user_checkpoint"
  shutil.copytree(os.path.join(FIXTURES, "hf_llama"), user)
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(user / hf.WEIGHTS_FILE))
  tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
  save_file(tensors, str(user / hf.WEIGHTS_FILE))
  with pytest.raises(hf.CheckpointError, match=r"tensor 'model.norm.weight' holds 32 non-finite value"):
    hf.load_causal_lm(str(user))


def test_a_changed_backbone_cache_is_reported_and_kept(smoke_config, tmp_path):
  pretrain.load_or_pretrain(backbone_settings(smoke_config), log=lambda _: None)  # The session's cache, built once.
  source = pretrain.cache_path(backbone_settings(smoke_config))
  smoke_config.pretrain.cache_dir = str(tmp_path)
  copy = pretrain.cache_path(backbone_settings(smoke_config))
  shutil.copytree(source, copy)
  data_files = sorted(
    (os.path.getsize(os.path.join(root, n)), os.path.join(root, n))
    for root, _, names in os.walk(copy)
    for n in names
    if n != files.MANIFEST_FILE
  )
  largest = data_files[-1][1]
  _flip_bytes(largest, offset=data_files[-1][0] // 2)
  with pytest.raises(RuntimeError, match=rf"{os.path.basename(largest)}: its content changed.*left in place"):
    pretrain.load_or_pretrain(backbone_settings(smoke_config), log=lambda _: None)
  assert os.path.isdir(copy)


def test_a_killed_dataset_generation_leaves_nothing_the_next_one_keeps(tmp_path):
  """A killed generation's TFDS incomplete.* directory is removed by the next preparation."""
  from experiments.runner.data import digits_domains, loader

  version = str(digits_domains.DigitsDomains.VERSION)
  leftover = tmp_path / "digits_domains" / "res16" / f"incomplete.ABC123_{version}"
  leftover.mkdir(parents=True)
  (leftover / "digits_domains-train.array_record-00000-of-00001").write_bytes(b"cut short")
  loader.prepare_dataset("digits_domains/res16", str(tmp_path))
  assert sorted(os.listdir(tmp_path / "digits_domains" / "res16")) == [version]
  assert loader.split_examples("digits_domains/res16", "train", str(tmp_path)) > 0
