"""Instruction data for text runs: files in each format and layout, groups, splits, blocks, the
embedded records, and the text config's checks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import blocks as config_blocks
from configs import instruction_tuning
from experiments.runner import methods
from experiments.runner.config_validation import ConfigError, validate_config
from experiments.runner.data import instructions, stdlib_docs
from hyperlora_jax import text
from hyperlora_jax.models import hf

from tests.repo_paths import FIXTURES, ROOT

DOLLY = [
  {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "brainstorming"},
  {"instruction": "Capital of France?", "context": "It is in Europe.", "response": "Paris.", "category": "open_qa"},
  {"instruction": "Sum 2 and 3.", "context": "", "response": "5", "category": "open_qa"},
  {"instruction": "Is a cat a pet?", "context": "", "response": "Yes.", "category": "classification"},
]


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
    assert list(instructions.iter_records(str(path))) == DOLLY


def test_a_bad_file_is_named_with_what_is_wrong(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(DOLLY[0]) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2:2: not a JSON value \(.*\); the line starts '\{not json'"):
    list(instructions.iter_records(str(bad)))
  (tmp_path / "dict.json").write_text(json.dumps({"instruction": "x"}))
  with pytest.raises(ValueError, match="must hold a list of records"):
    list(instructions.iter_records(str(tmp_path / "dict.json")))
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unknown format '.csv'; supported: .jsonl, .json, .parquet"):
    list(instructions.iter_records(str(tmp_path / "data.csv")))
  with pytest.raises(ValueError, match="data.group_field='category': record 1 has no such field"):
    instructions.group_value({"instruction": "x"}, "category", 1)


def test_files_that_used_to_end_in_a_bare_traceback_are_named_by_line(tmp_path):
  """Non-UTF-8 text, a file that is not parquet, Alpaca's .json with a trailing comma, a numeric
  response (reported as a missing field), a null category (a group named 'None')."""
  (tmp_path / "latin1.jsonl").write_bytes(json.dumps(DOLLY[0]).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 21 of the line is b'\\xe9'\)"):
    list(instructions.iter_records(str(tmp_path / "latin1.jsonl")))
  (tmp_path / "fake.parquet").write_text("instruction,response\n")
  with pytest.raises(ValueError, match=r"fake.parquet: not a parquet file \(ArrowInvalid"):
    list(instructions.iter_records(str(tmp_path / "fake.parquet")))
  (tmp_path / "alpaca.json").write_text('[{"instruction": "a", "output": "b"},\n]')
  with pytest.raises(ValueError, match=r"alpaca.json:2:1: not valid JSON"):
    list(instructions.iter_records(str(tmp_path / "alpaca.json")))
  with pytest.raises(ValueError, match=r"record 3: field 'response' \(response\) is a int \('42'\), not text"):
    text.check_record({"instruction": "x", "response": 42}, "dolly", where="record 3")
  with pytest.raises(ValueError, match=r"record 5's category is None, not a group name"):
    instructions.group_value({"instruction": "x", "category": None}, "category", 5)


def test_groups_and_the_per_group_split_by_hand():
  """Sorted group names; each group of n records keeps round(f n) (at least 1 of 2+) for test."""
  records = [{"category": c} for c in ["b"] * 10 + ["a"] * 5 + ["c"]]
  groups, names = instructions.group_ids_of(
    [instructions.group_value(r, "category", n) for n, r in enumerate(records, 1)]
  )
  assert names == ("a", "b", "c") and (groups[:10] == 1).all() and groups[-1] == 2
  train, test = instructions.split_train_test(groups, 0.2, seed=0)
  assert sorted(np.bincount(groups[test], minlength=3).tolist()) == [0, 1, 2]  # c (1 record) keeps it for train.
  assert np.bincount(groups[test], minlength=3).tolist() == [1, 2, 0]
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
  again = instructions.split_train_test(groups, 0.2, seed=0)
  assert all((a == b).all() for a, b in zip((train, test), again))
  assert not (instructions.split_train_test(groups, 0.2, seed=1)[1] == test).all()


def _data_config(name, tmp_path, **fields):
  """The typed `data` block of the records `name`, tokenized under `tmp_path`."""
  config = instruction_tuning.get_config(f"data={name}").data
  config.data_dir, config.max_len = str(tmp_path / "tokenized"), 96
  config.update(fields)
  return config_blocks.from_config(config_blocks.TextData, config)


def test_padding_entries_of_a_block_count_no_loss(tmp_path):
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  config = _data_config(write_dolly_jsonl(tmp_path / "dolly.jsonl"), tmp_path)
  pool = instructions.prepare_tokenized(config, tokenizer, log=lambda _: None).split(np.arange(4), stream=False)
  block = pool.gather(np.array([[1, 0], [3, 0]]), np.array([[1.0, 1.0], [1.0, 0.0]], np.float32))
  assert block["input_ids"].shape == (2, 2, 96) and block["label"].tolist() == [[2, 0], [1, 0]]
  assert block["loss_mask"][1, 1].sum() == 0 and block["loss_mask"][0, 1].sum() > 0  # Same record, masked.
  np.testing.assert_array_equal(block["input_ids"][1, 1], pool.tokens["input_ids"][0])


def test_records_are_tokenized_once_in_chunks_into_files_that_read_back_exactly(tmp_path, monkeypatch):
  """Tokenized 3 records at a time (chunks that do not divide the 10 records), the files hold
  what `text.encode_instructions` gives for all records at once, in file order, with each
  record's group, truncation and no-loss flag; a second run reads them (nothing tokenized);
  a changed file is tokenized again into another directory."""
  monkeypatch.setattr(instructions, "CHUNK_RECORDS", 3)
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  records = DOLLY * 2 + [{**DOLLY[0], "response": "long " * 60}, {**DOLLY[1], "context": "wide " * 90}]
  config = _data_config(write_dolly_jsonl(tmp_path / "dolly.jsonl", records), tmp_path, max_len=160)
  lines = []
  tokenized = instructions.prepare_tokenized(config, tokenizer, log=lines.append)
  assert len(lines) == 1 and lines[0].startswith("data: tokenized 10 records")
  expected = text.encode_instructions(tokenizer, records, 160, "dolly")
  for key in instructions.TOKEN_KEYS:
    assert isinstance(tokenized.tokens[key], np.memmap) and tokenized.tokens[key].dtype == np.int32
    np.testing.assert_array_equal(tokenized.tokens[key], expected[key], err_msg=key)
  assert tokenized.group_names == ("brainstorming", "classification", "open_qa")
  assert tokenized.groups.tolist() == [0, 2, 2, 1] * 2 + [0, 2]
  assert tokenized.truncated.tolist() == [False] * 8 + [True, True]
  assert tokenized.no_loss.tolist() == [False] * 9 + [True]  # Its context fills the 160 tokens.
  again = instructions.prepare_tokenized(config, tokenizer, log=lines.append)
  assert len(lines) == 1 and again.directory == tokenized.directory
  write_dolly_jsonl(tmp_path / "dolly.jsonl", records[:5])
  changed = instructions.prepare_tokenized(config, tokenizer, log=lines.append)
  assert changed.directory != tokenized.directory and len(changed.groups) == 5
  assert instructions.prepare_tokenized(
    _data_config(config.name, tmp_path, max_len=64), tokenizer, log=lines.append
  ).tokens["input_ids"].shape == (5, 64)


def test_a_streamed_split_reads_only_the_rows_a_block_needs_and_equals_the_split_in_memory(tmp_path):
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  config = _data_config(write_dolly_jsonl(tmp_path / "dolly.jsonl", copies=3), tmp_path)
  tokenized = instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  rows = np.array([11, 2, 7, 5, 0])
  in_memory, streamed = tokenized.split(rows, stream=False), tokenized.split(rows, stream=True)
  assert isinstance(streamed.tokens["input_ids"], instructions.TokenRows)
  assert streamed.tokens["input_ids"].shape == in_memory.tokens["input_ids"].shape == (5, 96)
  assert (streamed.truncated, streamed.no_loss) == (in_memory.truncated, in_memory.no_loss)
  np.testing.assert_array_equal(streamed.labels, tokenized.groups[rows])
  indices, mask = np.array([[4, 1], [3, 3]]), np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
  want, got = in_memory.gather(indices, mask), streamed.gather(indices, mask)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_array_equal(got["input_ids"][1, 0], tokenized.tokens["input_ids"][5])  # Row 3 of the split.
  assert streamed.tokens["input_ids"].rows_read == 4  # Only the block's rows.
  np.testing.assert_array_equal(streamed.tokens["attention_mask"][:2], tokenized.tokens["attention_mask"][[11, 2]])
  with pytest.raises(IndexError, match="out of range"):
    streamed.tokens["input_ids"][np.array([5])]


def test_a_cut_tokenized_file_is_reported_and_kept(tmp_path):
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  config = _data_config(write_dolly_jsonl(tmp_path / "dolly.jsonl"), tmp_path)
  directory = instructions.prepare_tokenized(config, tokenizer, log=lambda _: None).directory
  path = os.path.join(directory, "loss_mask.bin")
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(
    instructions.TokenizedCacheError,
    match=r"loss_mask.bin holds 100 bytes, 1536 expected "
    r"\(4 records x 96 tokens\).*delete the directory",
  ):
    instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  assert os.path.getsize(path) == 100  # Reported, not replaced.
  os.remove(os.path.join(directory, "groups.npy"))
  with pytest.raises(instructions.TokenizedCacheError, match="cannot read its index"):
    instructions.open_tokenized(directory)


def test_a_record_without_the_layouts_fields_is_named_before_anything_is_written(tmp_path):
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  config = _data_config(
    write_dolly_jsonl(tmp_path / "dolly.jsonl", DOLLY + [{"instruction": "x", "category": "a"}]), tmp_path
  )
  with pytest.raises(ValueError, match="record 5: the dolly layout needs a text field 'response'"):
    instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  config = _data_config(write_dolly_jsonl(tmp_path / "empty.jsonl", []), tmp_path)
  with pytest.raises(ValueError, match="no records"):
    instructions.prepare_tokenized(config, tokenizer, log=lambda _: None)
  assert not os.listdir(tmp_path / "tokenized")  # No directory, partial or whole, is left.


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
  copytree = next(r for r in records if r["context"].startswith("shutil.copytree("))
  assert "copy_function=<function copy2>," in copytree["context"]  # No memory address in a default value.
  script = (
    "import json; from experiments.runner.data import stdlib_docs; print(json.dumps(stdlib_docs.instruction_records()))"
  )
  other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
  assert json.loads(other_process.stdout) == records  # The same in every process (and hash seed).
  assert sum(map(len, stdlib_docs.pretraining_text())) > 300_000


@pytest.mark.parametrize(
  "change, message",
  [
    ({"data.layout": "sharegpt"}, "data.layout: got 'sharegpt'; allowed: alpaca, dolly"),
    ({"data.name": "/no/such.jsonl"}, "data.name: no such file"),
    ({"data.name": "train.csv"}, "data.name: must be 'stdlib_docs' or a .jsonl / .json / .parquet file"),
    ({"data.test_fraction": 1.0}, "data.test_fraction: must be in"),
    ({"data.chat_template": True}, "data.chat_template: the embedded tokenizer has no chat template"),
    ({"model.gelu": "tanh"}, "model.gelu: not a field of the decoder"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads: 3 must divide model.num_heads=2"),
    ({"pretrain.checkpoint": os.path.join(FIXTURES, "hf_vit")}, "pretrain.checkpoint: a vit checkpoint"),
  ],
)
def test_a_text_config_names_the_field_it_cannot_take(change, message):
  assert_refused(instruction_tuning.get_config("smoke"), change, message)


def assert_refused(config, change: dict, message: str) -> None:
  """`config` with `change` ({"block.field": value}) fails validation with `message` (literal)."""
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
    assert methods.build_method(methods.method_settings(config)).name == method and config.task == "instruction_tuning"
