"""Instruction datasets from local files (JSONL, JSON, parquet) or the embedded one, tokenized.

`data.name` is `stdlib_docs` (the embedded records, `stdlib_docs.py`) or a path:
  *.jsonl    one JSON object per line (databricks-dolly-15k.jsonl)
  *.json     a JSON list of objects (Stanford Alpaca's alpaca_data.json)
  *.parquet  a table with one row per record (the Hugging Face hub's conversions)
in the Dolly layout (instruction / context / response / category) or the Alpaca layout
(instruction / input / output), `data.layout`. Records are split into train and test per group
(`data.test_fraction`, seeded) and tokenized once into fixed-shape arrays
(`hyperlora_jax.text`); a `TextDataset` then plays the part an image pool plays: clients are
index arrays into it, partitioned by its `labels` = the group of each record (the value of
`data.group_field`, e.g. Dolly's category, as FedIT does), and `gather` builds the round's
blocks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from experiments.runner.data import stdlib_docs
from hyperlora_jax import text

EMBEDDED_TEXT = "stdlib_docs"
TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")
FORMATS = (".jsonl", ".json", ".parquet")


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a .jsonl, .json (a list) or .parquet file.

  Raises:
    ValueError: another extension, or a line / file that is not JSON objects (named by line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path!r}")
  extension = os.path.splitext(path)[1]
  if extension == ".jsonl":
    records = []
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
  elif extension == ".json":
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
    if not isinstance(records, list):
      raise ValueError(f"{path}: a .json file must hold a list of records (Alpaca's layout), got {type(records).__name__}")
  elif extension == ".parquet":
    import pyarrow.parquet as pq
    records = pq.read_table(path).to_pylist()
  else:
    raise ValueError(f"{path}: unknown format {extension!r}; supported: {', '.join(FORMATS)}")
  for number, record in enumerate(records, 1):
    if not isinstance(record, dict):
      raise ValueError(f"{path}: record {number} is a {type(record).__name__}, not an object")
  return records


def load_records(name: str) -> list[dict[str, Any]]:
  """The embedded records (`name` = 'stdlib_docs') or a file's."""
  return stdlib_docs.instruction_records() if name == EMBEDDED_TEXT else read_records(name)


def group_ids(records: list[dict], field: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
  """([N] int32 group of each record, the sorted group names); one group 'all' without a field."""
  if not field:
    return np.zeros(len(records), np.int32), ("all",)
  missing = [i for i, r in enumerate(records) if field not in r]
  if missing:
    raise ValueError(f"data.group_field={field!r}: record {missing[0] + 1} has no such field "
                     f"(fields: {sorted(records[missing[0]])})")
  names = tuple(sorted({str(r[field]) for r in records}))
  index = {name: i for i, name in enumerate(names)}
  return np.array([index[str(r[field])] for r in records], np.int32), names


def split_train_test(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, test indices), each group's records shuffled (seeded) and the first
  round(test_fraction x size) of them (at least 1 of a group of 2+) held out for test."""
  rng = np.random.default_rng([seed, 7])
  train, test = [], []
  for g in np.unique(groups):
    members = rng.permutation(np.flatnonzero(groups == g))
    n_test = int(round(test_fraction * len(members)))
    if test_fraction > 0 and len(members) > 1:
      n_test = min(max(n_test, 1), len(members) - 1)
    test.append(members[:n_test])
    train.append(members[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A split's tokenized records (the text counterpart of `loader.ImageDataset`).

  Attributes:
    tokens: {"input_ids", "attention_mask", "loss_mask"} int32 [N, T] (`text.encode_instructions`).
    labels: [N] int32 group of each record (partitions read it as a class).
    domains: [N] int32, the same groups (so `one_domain_per_client` gives a client per group).
    num_classes: the number of groups; class_names, domain_names: their names.
    truncated: how many records were cut to T; no_loss: how many kept no response token.
  """
  tokens: dict[str, np.ndarray]
  labels: np.ndarray
  domains: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  domain_names: tuple[str, ...]
  truncated: int = 0
  no_loss: int = 0

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def max_len(self) -> int:
    return self.tokens["input_ids"].shape[1]

  def gather(self, indices: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """A block for indices [...] and mask [...]: the token arrays [..., T], "label" [...] (the
    group), "mask" [...] float32; padding entries (mask 0) get loss_mask 0, so they count nothing."""
    block = {k: self.tokens[k][indices] for k in TOKEN_KEYS}
    block["loss_mask"] = block["loss_mask"] * (mask[..., None] > 0)
    return {**block, "label": self.labels[indices], "mask": np.asarray(mask, np.float32)}


def tokenized_dataset(records: list[dict], indices: np.ndarray, groups: np.ndarray, names: tuple[str, ...],
                      tokenizer, max_len: int, layout: str, chat: bool) -> TextDataset:
  """The records at `indices` as a `TextDataset`."""
  for i in indices[:1000]:  # The layout's fields, named, before anything is tokenized.
    text.check_record(records[i], layout, where=f"record {i + 1}")
  encoded = text.encode_instructions(tokenizer, [records[i] for i in indices], max_len, layout, chat=chat)
  return TextDataset({k: encoded[k] for k in TOKEN_KEYS}, groups[indices], groups[indices], len(names), names, names,
                     int(encoded["truncated"].sum()), int(encoded["no_loss"].sum()))


def load_text_datasets(data_config, tokenizer, seed: int) -> tuple[TextDataset, TextDataset]:
  """(train, test) `TextDataset`s of `data.name` per the config's `data` block (layout,
  group_field, test_fraction, max_len, chat_template)."""
  records = load_records(data_config.name)
  if not records:
    raise ValueError(f"data.name={data_config.name!r}: no records")
  groups, names = group_ids(records, data_config.group_field)
  train, test = split_train_test(groups, data_config.test_fraction, seed)
  build = lambda idx: tokenized_dataset(records, idx, groups, names, tokenizer, data_config.max_len,
                                        data_config.layout, data_config.chat_template)
  return build(train), build(test)
