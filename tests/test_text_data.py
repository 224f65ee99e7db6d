"""Instruction data for text runs: files in each format and layout, groups, splits, blocks, the
embedded records, and the text config's checks."""
import json
import os

import numpy as np
import pytest

from configs import instruction_tuning
from experiments.runner import methods
from experiments.runner.config_validation import ConfigError, validate_config
from experiments.runner.data import instructions, stdlib_docs
from hyperlora_jax.models import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DOLLY = [{"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "brainstorming"},
         {"instruction": "Capital of France?", "context": "It is in Europe.", "response": "Paris.", "category": "open_qa"},
         {"instruction": "Sum 2 and 3.", "context": "", "response": "5", "category": "open_qa"},
         {"instruction": "Is a cat a pet?", "context": "", "response": "Yes.", "category": "classification"}]


def write_dolly_jsonl(path, records=DOLLY, copies=1):
  with open(path, "w") as f:
    for _ in range(copies):
      for r in records:
        f.write(json.dumps(r) + "\n")
  return str(path)


def test_each_file_format_gives_the_same_records(tmp_path):
  """Dolly's .jsonl, Alpaca's .json list, and a .parquet table of the same records."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  jsonl = write_dolly_jsonl(tmp_path / "dolly.jsonl")
  (tmp_path / "dolly.json").write_text(json.dumps(DOLLY))
  pq.write_table(pa.Table.from_pylist(DOLLY), str(tmp_path / "dolly.parquet"))
  for path in (jsonl, tmp_path / "dolly.json", tmp_path / "dolly.parquet"):
    assert instructions.read_records(str(path)) == DOLLY


def test_a_bad_file_is_named_with_what_is_wrong(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(DOLLY[0]) + "\n{not json\n")
  with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object"):
    instructions.read_records(str(bad))
  (tmp_path / "dict.json").write_text(json.dumps({"instruction": "x"}))
  with pytest.raises(ValueError, match="must hold a list of records"):
    instructions.read_records(str(tmp_path / "dict.json"))
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unknown format '.csv'; supported: .jsonl, .json, .parquet"):
    instructions.read_records(str(tmp_path / "data.csv"))
  with pytest.raises(ValueError, match="data.group_field='category': record 1 has no such field"):
    instructions.group_ids([{"instruction": "x"}], "category")


def test_groups_and_the_per_group_split_by_hand():
  """Sorted group names; each group of n records keeps round(f n) (at least 1 of 2+) for test."""
  records = [{"category": c} for c in ["b"] * 10 + ["a"] * 5 + ["c"]]
  groups, names = instructions.group_ids(records, "category")
  assert names == ("a", "b", "c") and (groups[:10] == 1).all() and groups[-1] == 2
  train, test = instructions.split_train_test(groups, 0.2, seed=0)
  assert sorted(np.bincount(groups[test], minlength=3).tolist()) == [0, 1, 2]  # c (1 record) keeps it for train.
  assert np.bincount(groups[test], minlength=3).tolist() == [1, 2, 0]
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
  again = instructions.split_train_test(groups, 0.2, seed=0)
  assert all((a == b).all() for a, b in zip((train, test), again))
  assert not (instructions.split_train_test(groups, 0.2, seed=1)[1] == test).all()


def test_padding_entries_of_a_block_count_no_loss():
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  groups, names = instructions.group_ids(DOLLY, "category")
  pool = instructions.tokenized_dataset(DOLLY, np.arange(4), groups, names, tokenizer, 96, "dolly", False)
  block = pool.gather(np.array([[1, 0], [3, 0]]), np.array([[1.0, 1.0], [1.0, 0.0]], np.float32))
  assert block["input_ids"].shape == (2, 2, 96) and block["label"].tolist() == [[2, 0], [1, 0]]
  assert block["loss_mask"][1, 1].sum() == 0 and block["loss_mask"][0, 1].sum() > 0  # Same record, masked.
  np.testing.assert_array_equal(block["input_ids"][1, 1], pool.tokens["input_ids"][0])


def test_the_embedded_records_are_real_docstrings_by_category():
  records = stdlib_docs.instruction_records()
  counts = {c: sum(r["category"] == c for r in records) for c in stdlib_docs.CATEGORIES}
  assert len(records) > 400 and min(counts.values()) >= 10
  assert all(isinstance(r[k], str) for r in records for k in ("instruction", "context", "response", "category"))
  gcd = next(r for r in records if "`math.gcd`" in r["instruction"] or " math.gcd " in r["instruction"])
  assert gcd["response"] == "Greatest Common Divisor." and gcd["context"].startswith("math.gcd(")
  assert len({r["response"] for r in records}) == len(records)  # No duplicates.
  assert not any(stdlib_docs.SIGNATURE_LINE.match(r["response"]) for r in records)
  assert stdlib_docs.instruction_records() == records  # Deterministic.
  assert sum(map(len, stdlib_docs.pretraining_text())) > 300_000


@pytest.mark.parametrize("change, message", [
    ({"data.layout": "sharegpt"}, "data.layout: got 'sharegpt'; allowed: alpaca, dolly"),
    ({"data.name": "/no/such.jsonl"}, "data.name: no such file"),
    ({"data.name": "train.csv"}, "data.name: must be 'stdlib_docs' or a .jsonl / .json / .parquet file"),
    ({"data.test_fraction": 1.0}, "data.test_fraction: must be in"),
    ({"data.chat_template": True}, "data.chat_template: the embedded tokenizer has no chat template"),
    ({"model.gelu": "tanh"}, "model.gelu: not a field of the decoder"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads: 3 must divide model.num_heads=2"),
    ({"pretrain.checkpoint": os.path.join(FIXTURES, "hf_vit")}, "pretrain.checkpoint: a vit checkpoint"),
])
def test_a_text_config_names_the_field_it_cannot_take(change, message):
  config = instruction_tuning.get_config("smoke")
  for field, value in change.items():
    block, key = field.split(".")
    config[block][key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)


def test_the_text_config_is_valid_for_every_method():
  """Every method's text config passes validation (a refusal raises) and builds that method."""
  for method in methods.METHODS:
    config = instruction_tuning.get_config(f"smoke,method={method}")
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
    assert methods.build_method(config).name == method and config.task == "instruction_tuning"
