"""Instruction datasets from local files (JSONL, JSON, parquet) or the embedded one, tokenized once
and kept on disk, read into memory or streamed.

`data.name` is `stdlib_docs` (the embedded records, `stdlib_docs.py`) or a path:
  *.jsonl    one JSON object per line (databricks-dolly-15k.jsonl)
  *.json     a JSON list of objects (Stanford Alpaca's alpaca_data.json)
  *.parquet  a table with one row per record (the Hugging Face hub's conversions)
in the Dolly layout (instruction / context / response / category) or the Alpaca layout
(instruction / input / output), `data.layout`.

As an image dataset is prepared once into array_record files, a records source is tokenized
once (`prepare_tokenized`: one pass, `CHUNK_RECORDS` records at a time, so host memory does not
grow with the file) into fixed-shape int32 arrays on disk (`hyperlora_jax.text`'s
input_ids / attention_mask / loss_mask, [N, T] each), under `data.data_dir` (default
`DEFAULT_DATA_DIR`) in a directory keyed by the source file (path, size, modification time),
the tokenizer, `data.max_len`, the layout, the chat template and `data.group_field`; a second run
reuses it. Records are split into train and test per group (`data.test_fraction`, seeded); a
`TextDataset` then plays the part an image pool plays: clients are index arrays into it,
partitioned by its `labels` = the group of each record (the value of `data.group_field`, e.g.
Dolly's category, as FedIT does), and `gather` builds the round's blocks. In memory
(`data.stream=False`) a split's tokens are arrays; streamed (`data.stream=True`) they are
`TokenRows`, read from the memory-mapped files row by row when a block needs them, so host
memory holds the groups (the index) and the blocks being built, not the dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from configs import blocks as config_blocks
from experiments.runner.data import stdlib_docs
from hyperlora_jax import files, text

EMBEDDED_TEXT = "stdlib_docs"
TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")
FORMATS = (".jsonl", ".json", ".parquet")
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hyperlora_jax", "tokenized")
CHUNK_RECORDS = 1024  # Records tokenized (and held) at a time while a source is prepared.
# Bumped when the files a prepared directory hold change (2: prompt and response tokenized
# whole, and a manifest of every file's sha256 written last).
TOKENIZED_FORMAT = 2
TOKEN_DTYPE = np.dtype(np.int32)


class TokenizedCacheError(ValueError):
  """A prepared directory that cannot be read as written (reported; never replaced)."""


def iter_records(path: str) -> Iterator[dict[str, Any]]:
  """The records of a .jsonl, .json (a list) or .parquet file, one at a time: a .jsonl line by
  line and a .parquet batch by batch (pyarrow), so neither is held whole; a .json list is one
  JSON value and is parsed whole.

  Raises:
    ValueError: another extension, or a line / file that is not JSON objects (named by line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path!r}")
  extension = os.path.splitext(path)[1]
  if extension == ".jsonl":
    records = _jsonl_records(path)
  elif extension == ".json":
    records = _json_records(path)
  elif extension == ".parquet":
    records = _parquet_records(path)
  else:
    raise ValueError(f"{path}: unknown format {extension!r}; supported: {', '.join(FORMATS)}")
  for number, record in enumerate(records, 1):
    if not isinstance(record, dict):
      raise ValueError(f"{path}: record {number} is a {type(record).__name__}, not an object")
    yield record


def _jsonl_records(path: str) -> Iterator[Any]:
  """A .jsonl file's values, line by line; a line that is not UTF-8 or not JSON is named by
  line and column, with its start."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line is "
          f"{raw[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
          f"{path}:{number}:{e.colno}: not a JSON value ({e.msg}); the line starts {line.strip()[:60]!r}"
        ) from None


def _json_records(path: str) -> list:
  """A .json file's list of records (parsed whole); not UTF-8, not JSON (named by line and
  column: a trailing comma, say) or not a list is refused."""
  try:
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{path}: not UTF-8 text (byte {e.start + 1} is {e.object[e.start : e.start + 1]!r}); save the file as UTF-8"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
  if not isinstance(records, list):
    raise ValueError(
      f"{path}: a .json file must hold a list of records (Alpaca's layout), got {type(records).__name__}"
    )
  return records


def _parquet_records(path: str) -> Iterator[dict]:
  """A .parquet file's rows, a batch at a time; a file that is not parquet is named."""
  import pyarrow
  import pyarrow.parquet as pq

  try:
    table = pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a parquet file ({type(e).__name__}: {e})") from None
  return (record for batch in table.iter_batches(batch_size=CHUNK_RECORDS) for record in batch.to_pylist())


def load_records(name: str) -> Iterable[dict[str, Any]]:
  """The embedded records (`name` = 'stdlib_docs', a list) or a file's (`iter_records`)."""
  return stdlib_docs.instruction_records() if name == EMBEDDED_TEXT else iter_records(name)


def group_value(record: dict, field: str | None, number: int) -> str:
  """The group of record `number` (1-based, for the message): its `field`'s value as text;
  'all' without a field.

  Raises:
    ValueError: the record has no such field (named, with the fields it has), or its value is
      null or empty."""
  if not field:
    return "all"
  if field not in record:
    raise ValueError(f"data.group_field={field!r}: record {number} has no such field (fields: {sorted(record)})")
  value = record[field]
  if value is None or (isinstance(value, str) and not value.strip()):
    raise ValueError(
      f"data.group_field={field!r}: record {number}'s {field} is {value!r}, not a group name; give it "
      f"one or drop the record"
    )
  return str(value)


def group_ids_of(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
  """([N] int32 index of each value among the sorted distinct values, those values)."""
  names = tuple(sorted(set(values)))
  index = {name: i for i, name in enumerate(names)}
  return np.array([index[v] for v in values], np.int32), names


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


class TokenRows:
  """Rows `rows` of a token array kept on disk ([N, T] int32, memory-mapped), read on demand
  (array-like): `x[indices]` for an int array of any shape (or a slice) gives
  [*indices.shape, T] int32, reading just those rows. The streamed counterpart of a split's
  in-memory token array (`loader.RecordImages` is the images')."""

  def __init__(self, array: np.ndarray, rows: np.ndarray):
    self._array = array
    self._rows = np.asarray(rows)
    self.rows_read = 0  # Rows read so far (for tests).

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self._rows), self._array.shape[1])

  dtype = TOKEN_DTYPE
  ndim = 2

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, indices) -> np.ndarray:
    if isinstance(indices, slice):
      indices = np.arange(len(self))[indices]
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"token row index out of range [0, {len(self)})")
    self.rows_read += indices.size
    return np.asarray(self._array[self._rows[indices]])


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A split's tokenized records (the text counterpart of `loader.ImageDataset`).

  Attributes:
    tokens: {"input_ids", "attention_mask", "loss_mask"} int32 [N, T] (`text.encode_instructions`):
      arrays in memory, or `TokenRows` read from disk (streamed); a preference run's [N, 2, T]
      pairs (`text.encode_preference_pairs`, in memory).
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
    return self.tokens["input_ids"].shape[-1]

  def gather(self, indices: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """A block for indices [...] and mask [...]: the token arrays [..., T] (a preference run's
    [..., 2, T] pairs), "label" [...] (the group), "mask" [...] float32; padding entries (mask 0)
    get loss_mask 0, so they count nothing."""
    block = {k: self.tokens[k][indices] for k in TOKEN_KEYS}
    entry = np.asarray(mask).reshape(np.shape(mask) + (1,) * (block["loss_mask"].ndim - np.ndim(mask)))
    block["loss_mask"] = block["loss_mask"] * (entry > 0)
    return {**block, "label": self.labels[indices], "mask": np.asarray(mask, np.float32)}


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Training records packed into rows of T tokens (`data.packing`): the pool a text run's local
  steps read instead of the records. A row is built when a block needs it
  (`text.pack_examples`), from the records' tokens in memory or streamed.

  Attributes:
    records: the records' `TextDataset`.
    plan: int64 [R, K] the records (indices into `records`) of each row, -1 after its last.
    labels: [R] int32 the group of each row's first record.
    row_tokens: [R] int64 the tokens each row holds (the rest of its T slots are padding).
    pad_id: the id of a row's padding slots.
  """

  records: TextDataset
  plan: np.ndarray
  labels: np.ndarray
  row_tokens: np.ndarray
  pad_id: int

  def __len__(self) -> int:
    return len(self.plan)

  def gather(self, indices: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """A block for row indices [...] and mask [...], as `TextDataset.gather`'s: the packed token
    arrays [..., T] ("attention_mask" the rows' segment ids), "label", "mask"."""
    block = text.pack_examples(self.records.tokens, self.plan[indices], self.pad_id)
    block["loss_mask"] = block["loss_mask"] * (mask[..., None] > 0)
    return {**block, "label": self.labels[indices], "mask": np.asarray(mask, np.float32)}


def pack_clients(records: TextDataset, parts: list[np.ndarray], pad_id: int) -> tuple[PackedRows, list[np.ndarray]]:
  """Each client's records packed into rows of their own (`text.packing_plan`: best-fit
  decreasing); a record with no response token left is dropped (it would only take room).

  Args:
    records: the training records.
    parts: per-client index arrays into `records`.
    pad_id: the tokenizer's padding id.
  Returns:
    (the `PackedRows`, per-client index arrays into its rows).
  """
  plans, row_tokens, row_parts, start = [], [], [], 0
  for part in parts:
    part = np.asarray(part, np.int64)
    kept = part[np.asarray(records.tokens["loss_mask"][part]).sum(axis=-1) > 0] if len(part) else part
    lengths = text.example_lengths(records.tokens["attention_mask"][kept]) if len(kept) else kept
    plan = text.packing_plan(lengths, records.max_len)
    plans.append(np.where(plan >= 0, kept[np.maximum(plan, 0)], -1) if len(kept) else plan)
    row_tokens.append(np.where(plan >= 0, lengths[np.maximum(plan, 0)], 0).sum(axis=1) if len(kept) else plan[:, 0])
    row_parts.append(np.arange(start, start + len(plan), dtype=np.int64))
    start += len(plan)
  width = max(p.shape[1] for p in plans)
  plan = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1) for p in plans])
  labels = records.labels[np.maximum(plan[:, 0], 0)] if len(plan) else np.zeros(0, np.int32)
  return PackedRows(records, plan, labels, np.concatenate(row_tokens).astype(np.int64), pad_id), row_parts


@dataclasses.dataclass(frozen=True)
class TokenizedRecords:
  """A records source tokenized once, on disk (`prepare_tokenized`).

  Attributes:
    directory: where its files are.
    tokens: {"input_ids", "attention_mask", "loss_mask"} [N, T] int32, memory-mapped read-only,
      in the order of the source's records.
    groups: [N] int32 group of each record; group_names: the sorted group names.
    truncated, no_loss: [N] bool, the record was cut to T / kept no response token.
  """

  directory: str
  tokens: dict[str, np.ndarray]
  groups: np.ndarray
  group_names: tuple[str, ...]
  truncated: np.ndarray
  no_loss: np.ndarray

  def split(self, indices: np.ndarray, stream: bool) -> TextDataset:
    """The records `indices` [n] as a `TextDataset`: their tokens read into memory, or
    `TokenRows` of the files (`stream`)."""
    tokens = {
      k: TokenRows(self.tokens[k], indices) if stream else np.asarray(self.tokens[k][indices]) for k in TOKEN_KEYS
    }
    groups = self.groups[indices]
    return TextDataset(
      tokens,
      groups,
      groups,
      len(self.group_names),
      self.group_names,
      self.group_names,
      int(self.truncated[indices].sum()),
      int(self.no_loss[indices].sum()),
    )


def source_fingerprint(name: str) -> dict[str, Any]:
  """What identifies a records source: the embedded records' content hash, or a file's absolute
  path, size and modification time (a changed file is tokenized again)."""
  if name == EMBEDDED_TEXT:
    content = json.dumps(stdlib_docs.instruction_records(), sort_keys=True).encode()
    return {"embedded": EMBEDDED_TEXT, "sha1": hashlib.sha1(content).hexdigest()}
  stat = os.stat(name)
  return {"path": os.path.abspath(name), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenized_directory(data_config: config_blocks.TextData, tokenizer: Any) -> tuple[str, dict[str, Any]]:
  """(the directory `data.name` tokenized by `tokenizer` is kept in, the fields its name hashes)."""
  fields = {
    "format": TOKENIZED_FORMAT,
    "source": source_fingerprint(data_config.name),
    "tokenizer": tokenizer.fingerprint(),
    "max_len": int(data_config.max_len),
    "layout": data_config.layout,
    "chat_template": bool(data_config.chat_template),
    "group_field": data_config.group_field or "",
  }
  digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(data_config.name))[0]
  return os.path.join(data_config.data_dir or DEFAULT_DATA_DIR, f"{stem}-{digest}"), fields


def prepare_tokenized(
  data_config: config_blocks.TextData, tokenizer: Any, log: Callable[[str], None] = print, vocab_size: int | None = None
) -> TokenizedRecords:
  """`data.name` tokenized (`data.max_len`, `data.layout`, `data.chat_template`) with its groups
  (`data.group_field`): read from its prepared directory, or prepared there first, one pass
  over the records `CHUNK_RECORDS` at a time. Safe to call from several processes at once
  (each writes its own partial directory; the first to finish is kept).

  Raises:
    ValueError: a record lacks a field of the layout or the group field (named), or there are
      no records.
    TokenizedCacheError: the prepared directory is not what was written, or holds ids outside
      `vocab_size` (default: the tokenizer's; a model's embedding rows may be fewer) (nothing
      is replaced).
  """
  directory, fields = tokenized_directory(data_config, tokenizer)
  if not os.path.isdir(directory):
    count = _write_tokenized(load_records(data_config.name), directory, fields, tokenizer, data_config)
    log(f"data: tokenized {count} records of {data_config.name!r} into {directory}")
  return open_tokenized(directory, tokenizer.vocab_size if vocab_size is None else vocab_size)


def _write_tokenized(
  records: Iterable[dict], directory: str, fields: dict, tokenizer: Any, data_config: config_blocks.TextData
) -> int:
  """Tokenizes `records` into `directory`, whole or not at all (`files.build_directory`; another
  process's directory, if it finished first, is kept); their count."""
  count, _ = files.build_directory(
    directory, lambda partial: _write_files(records, partial, fields, tokenizer, data_config)
  )
  return count


def _write_files(
  records: Iterable[dict], partial: str, fields: dict, tokenizer: Any, data_config: config_blocks.TextData
) -> int:
  """The token files (`CHUNK_RECORDS` records encoded at a time), groups, flags and index of
  `records` in `partial`; their count."""
  group_values, truncated, no_loss, chunk = [], [], [], []
  with contextlib.ExitStack() as stack:
    outputs = {k: stack.enter_context(open(os.path.join(partial, f"{k}.bin"), "wb")) for k in TOKEN_KEYS}

    def flush():
      encoded = text.encode_instructions(
        tokenizer, chunk, data_config.max_len, data_config.layout, chat=data_config.chat_template
      )
      for k in TOKEN_KEYS:
        outputs[k].write(np.ascontiguousarray(encoded[k], TOKEN_DTYPE).tobytes())
      truncated.append(encoded["truncated"])
      no_loss.append(encoded["no_loss"])
      chunk.clear()

    for number, record in enumerate(records, 1):
      text.check_record(record, data_config.layout, where=f"data.name={data_config.name!r}: record {number}")
      group_values.append(group_value(record, data_config.group_field, number))
      chunk.append(record)
      if len(chunk) == CHUNK_RECORDS:
        flush()
    if chunk:
      flush()
  if not group_values:
    raise ValueError(f"data.name={data_config.name!r}: no records")
  groups, names = group_ids_of(group_values)
  np.save(os.path.join(partial, "groups.npy"), groups)
  np.save(os.path.join(partial, "truncated.npy"), np.concatenate(truncated))
  np.save(os.path.join(partial, "no_loss.npy"), np.concatenate(no_loss))
  with open(os.path.join(partial, "tokenized.json"), "w") as f:
    json.dump(
      {
        "num_records": len(groups),
        "max_len": int(data_config.max_len),
        "dtype": TOKEN_DTYPE.name,
        "group_names": names,
        **fields,
      },
      f,
      indent=2,
    )
  return len(groups)


def open_tokenized(directory: str, vocab_size: int | None = None) -> TokenizedRecords:
  """The `TokenizedRecords` of a prepared directory, its token files memory-mapped read-only,
  after checking every file against the manifest written last (`files.verify_manifest`) and,
  with `vocab_size`, that every id is below it and every mask 0 or 1.

  Raises:
    TokenizedCacheError: a file is missing, of another size than its record count says, or not
      the bytes written, or the ids do not fit (named; delete the directory to tokenize again).
  """

  def corrupt(what: str) -> TokenizedCacheError:
    return TokenizedCacheError(
      f"{directory}: {what}; it is not what was written (delete the directory to tokenize the records again)"
    )

  try:
    with open(os.path.join(directory, "tokenized.json")) as f:
      meta = json.load(f)
    n, t = int(meta["num_records"]), int(meta["max_len"])
    groups, truncated, no_loss = (
      np.load(os.path.join(directory, f"{k}.npy")) for k in ("groups", "truncated", "no_loss")
    )
  except (OSError, ValueError, KeyError) as e:
    raise corrupt(f"cannot read its index ({type(e).__name__}: {e})") from None
  if not len(groups) == len(truncated) == len(no_loss) == n:
    raise corrupt(f"its index holds {len(groups)} groups for {n} records")
  tokens = {}
  for k in TOKEN_KEYS:
    path = os.path.join(directory, f"{k}.bin")
    expected = n * t * TOKEN_DTYPE.itemsize
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != expected:
      raise corrupt(f"{k}.bin holds {size} bytes, {expected} expected ({n} records x {t} tokens)")
    tokens[k] = np.memmap(path, TOKEN_DTYPE, mode="r", shape=(n, t))
  try:
    files.verify_manifest(directory)
  except files.IntegrityError as e:
    raise corrupt(str(e)) from None
  if vocab_size is not None:
    problem = _token_range_problem(tokens, vocab_size)
    if problem:
      raise TokenizedCacheError(f"{directory}: {problem}")
  return TokenizedRecords(directory, tokens, groups, tuple(meta["group_names"]), truncated, no_loss)


def _token_range_problem(tokens: dict[str, np.ndarray], vocab_size: int) -> str | None:
  """What is out of range in the token files (ids outside [0, vocab_size), masks not 0/1), or None."""
  rows = tokens["input_ids"].shape[0]
  for start in range(0, rows, CHUNK_RECORDS):
    ids = np.asarray(tokens["input_ids"][start : start + CHUNK_RECORDS])
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      return (
        f"input_ids.bin holds ids in [{ids.min()}, {ids.max()}] (records {start}..), outside the "
        f"{vocab_size} ids the model embeds (the tokenizer's vocabulary, or the model's embedding rows if "
        f"fewer): a tokenizer of another model?"
      )
    for k in ("attention_mask", "loss_mask"):
      values = np.asarray(tokens[k][start : start + CHUNK_RECORDS])
      if values.size and (values.min() < 0 or values.max() > 1):
        return f"{k}.bin holds values other than 0 and 1 (records {start}..)"
  return None


def load_text_datasets(
  data_config: config_blocks.TextData,
  tokenizer: Any,
  seed: int,
  log: Callable[[str], None] = print,
  vocab_size: int | None = None,
) -> tuple[TextDataset, TextDataset]:
  """(train, test) `TextDataset`s of `data.name` per the config's `data` block (layout,
  group_field, test_fraction, max_len, chat_template, data_dir, stream): tokenized once
  (`prepare_tokenized`), split per group, in memory or streamed."""
  return split_records(prepare_tokenized(data_config, tokenizer, log, vocab_size), data_config, seed)


def split_records(
  records: TokenizedRecords, data_config: config_blocks.TextData, seed: int
) -> tuple[TextDataset, TextDataset]:
  """(train, test) `TextDataset`s of prepared `records`: split per group
  (`data.test_fraction`, seeded), in memory or streamed (`data.stream`)."""
  train, test = split_train_test(records.groups, data_config.test_fraction, seed)
  return records.split(train, data_config.stream), records.split(test, data_config.stream)
