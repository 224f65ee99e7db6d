"""Preference pairs for a DPO run (configs/preference_tuning.py): local files or the embedded set.

`data.name` is `stdlib_docs` (the embedded pairs, below) or a .jsonl / .json / .parquet file
(`instructions.iter_records`) in a layout of `hyperlora_jax.text.PREFERENCE_LAYOUTS`: TRL's
prompt / chosen / rejected texts ("pairs"), Anthropic HH-RLHF's chosen / rejected dialogues
("hh_rlhf"), or UltraFeedback binarized's prompt and message lists ("ultrafeedback"). Records are
grouped by `data.group_field` (none: one group), split into train and test per group as
instruction records are (`instructions.split_train_test`), and encoded in memory
(`text.encode_preference_pairs`: [N, 2, T], chosen first) into `instructions.TextDataset`s, which
the runner partitions and gathers as it does instruction records.

**The embedded pairs** (no download): each standard-library docstring record
(`stdlib_docs.instruction_records`, "What does `math.gcd` do?" with its signature) is a prompt;
the chosen response is its own docstring summary, the rejected one a docstring summary of the
next category's module (the categories in order, cyclically; the records of each sorted by name,
the one at the same rank): an answer in the style of the right one about the wrong module. 526
pairs in 13 categories, one client each by default. Why it is a fair small test of federated
preference tuning: the preference is objective and the two responses have the same style and
similar lengths, so a model must relate the answer to the function asked about; it generalizes
to held-out pairs (an unseen function of a module against an answer from elsewhere), which a
rejected answer from the same module would not (a model that learns the training docstrings
then prefers them as the wrong answers to held-out questions: FedIT scored 24.8% held-out on
that variant, 20 rounds at learning rate 1e-3);
each client's pairs are of one module, so clients are non-IID. It is not a test of helpfulness
or harmlessness (what HH-RLHF and UltraFeedback measure).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from configs import blocks as config_blocks
from experiments.runner.data import instructions, stdlib_docs
from hyperlora_jax import text

EMBEDDED = instructions.EMBEDDED_TEXT


def embedded_pairs() -> list[dict[str, str]]:
  """The embedded preference records (module docstring): {"prompt", "chosen", "rejected",
  "category"}, in the instruction records' order."""
  records = stdlib_docs.instruction_records()
  by_category: dict[str, list[int]] = defaultdict(list)
  for i, record in enumerate(records):
    by_category[record["category"]].append(i)
  ranked = {c: sorted(members, key=lambda i: records[i]["instruction"]) for c, members in by_category.items()}
  categories = sorted(ranked)
  neighbour = {}
  for c, category in enumerate(categories):
    other = ranked[categories[(c + 1) % len(categories)]]
    for k, i in enumerate(ranked[category]):
      neighbour[i] = other[k % len(other)]
  return [
    {
      "prompt": f"{record['instruction']}\n{record['context']}" if record["context"] else record["instruction"],
      "chosen": record["response"],
      "rejected": records[neighbour[i]]["response"],
      "category": record["category"],
    }
    for i, record in enumerate(records)
  ]


def read_pairs(name: str) -> list[dict[str, Any]]:
  """The records of `data.name`: the embedded pairs, or a file's (`instructions.iter_records`)."""
  return embedded_pairs() if name == EMBEDDED else list(instructions.iter_records(name))


def load_preference_datasets(
  data_config: config_blocks.TextData,
  tokenizer: Any,
  seed: int,
  vocab_size: int | None = None,
) -> tuple[instructions.TextDataset, instructions.TextDataset]:
  """(train, test) `TextDataset`s of preference pairs ([n, 2, T] tokens, chosen first) of
  `data.name` in `data.layout`, grouped by `data.group_field`, split per group
  (`data.test_fraction`, seeded).

  Raises:
    ValueError: a record that is not a pair of the layout, or without its group (named by
      file and record); ids outside `vocab_size` (a tokenizer of another model).
  """
  records = read_pairs(data_config.name)
  encoded = text.encode_preference_pairs(
    tokenizer,
    records,
    data_config.max_len,
    data_config.layout,
    chat=data_config.chat_template,
    source=f"data.name={data_config.name!r}: ",
  )
  groups, names = instructions.group_ids_of(
    [instructions.group_value(r, data_config.group_field, n) for n, r in enumerate(records, 1)]
  )
  vocab = tokenizer.vocab_size if vocab_size is None else vocab_size
  if encoded["input_ids"].max() >= vocab:
    raise ValueError(
      f"data.name={data_config.name!r}: token ids up to {encoded['input_ids'].max()}, outside the {vocab} "
      f"the model embeds"
    )
  train, test = instructions.split_train_test(groups, data_config.test_fraction, seed)

  def split(indices: np.ndarray) -> instructions.TextDataset:
    tokens = {k: encoded[k][indices] for k in instructions.TOKEN_KEYS}
    lost_here = int(np.sum(encoded["mask"][indices] == 0))
    truncated = int(encoded["truncated"][indices].sum())
    return instructions.TextDataset(
      tokens, groups[indices], groups[indices], len(names), names, names, truncated, lost_here
    )

  return split(train), split(test)
