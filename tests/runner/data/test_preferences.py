"""Preference pairs for DPO runs: the embedded set, files in each layout, and the config's checks."""

import json
import os

import numpy as np
import pytest

from configs import preference_tuning
from experiments.runner import methods
from experiments.runner.config_validation import validate_config
from experiments.runner.data import preferences, stdlib_docs
from hyperlora_jax import text
from hyperlora_jax.models import hf

from tests.repo_paths import FIXTURES
from tests.runner.data.test_instructions import assert_refused


def test_the_embedded_pairs_prefer_each_functions_own_docstring_to_another_modules():
  """526 pairs, one per docstring record: chosen its own response, rejected a response of the
  next category's records (every category's pairs reject one other category's answers)."""
  records, pairs = stdlib_docs.instruction_records(), preferences.embedded_pairs()
  assert len(pairs) == len(records) == 526 and len({p["category"] for p in pairs}) == 13
  responses = {}
  for record in records:
    responses.setdefault(record["response"], set()).add(record["category"])
  for record, pair in zip(records, pairs):
    assert pair["prompt"].startswith(record["instruction"]) and pair["chosen"] == record["response"]
    assert pair["rejected"] != pair["chosen"] and pair["category"] not in responses[pair["rejected"]]
  categories = sorted({p["category"] for p in pairs})
  for c, category in enumerate(categories):
    rejected_from = {next(iter(responses[p["rejected"]])) for p in pairs if p["category"] == category}
    assert rejected_from == {categories[(c + 1) % len(categories)]}


HH = [
  {
    "chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Answer {i}.",
    "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: No idea.",
  }
  for i in range(6)
]


def _ultrafeedback(i):
  conversation = lambda answer: [
    {"role": "user", "content": f"Question {i}?"},
    {"role": "assistant", "content": answer},
  ]
  return {
    "prompt": f"Question {i}?",
    "chosen": conversation(f"Answer {i}."),
    "rejected": conversation("No idea."),
    "source": "evol" if i % 2 else "sharegpt",
  }


def test_files_in_each_layout_load_as_pairs_split_by_group(tmp_path):
  """HH-RLHF as JSONL (one group) and UltraFeedback binarized as parquet (grouped by `source`):
  the tokens are `encode_preference_pairs`' of the same records, each group split into train and
  test."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from configs import blocks as config_blocks

  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  hh_path = tmp_path / "hh.jsonl"
  hh_path.write_text("".join(json.dumps(r) + "\n" for r in HH))
  data = config_blocks.TextData(name=str(hh_path), layout="hh_rlhf", group_field="", max_len=128, test_fraction=0.5)
  train, test = preferences.load_preference_datasets(data, tokenizer, seed=0)
  assert (len(train), len(test), train.class_names) == (3, 3, ("all",))
  every = text.encode_preference_pairs(tokenizer, HH, 128, "hh_rlhf")
  together = np.concatenate([train.tokens["input_ids"], test.tokens["input_ids"]])
  assert sorted(map(bytes, together)) == sorted(map(bytes, every["input_ids"]))
  records = [_ultrafeedback(i) for i in range(6)]
  uf_path = str(tmp_path / "uf.parquet")
  pq.write_table(pa.Table.from_pylist(records), uf_path)
  data = config_blocks.TextData(name=uf_path, layout="ultrafeedback", group_field="source", max_len=128)
  train, test = preferences.load_preference_datasets(data, tokenizer, seed=0)
  assert train.class_names == ("evol", "sharegpt") and len(train) + len(test) == 6 and len(test) == 2
  assert train.tokens["input_ids"].shape[1:] == (2, 128)
  with pytest.raises(ValueError, match="record 2: the pairs layout needs"):
    hh_path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"x": 1}))
    preferences.load_preference_datasets(
      config_blocks.TextData(name=str(hh_path), layout="pairs", group_field=""), tokenizer, seed=0
    )


@pytest.mark.parametrize(
  "change, message",
  [
    ({"data.layout": "dolly"}, "data.layout: got 'dolly'; allowed: hh_rlhf, ultrafeedback, pairs"),
    ({"data.packing": True}, "data.packing: packs instruction records"),
    ({"data.stream": True}, "data.stream: a preference run holds its pairs in memory"),
    ({"gen.examples_per_client": 2}, "gen.examples_per_client: generation scoring reads instruction records"),
    ({"dpo.beta": 0.0}, "dpo.beta: must be a positive number"),
    ({"dpo.loss_type": "kto"}, "dpo.loss_type: got 'kto'"),
    ({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1}, "dpo.label_smoothing: must be at least 0 and below 0.5"),
    ({"data.layout": "hh_rlhf", "data.chat_template": True}, "data.chat_template: HH-RLHF's dialogues carry"),
  ],
)
def test_a_preference_config_names_the_field_it_cannot_take(change, message):
  assert_refused(preference_tuning.get_config("smoke"), change, message)


def test_the_preference_config_is_valid_for_every_method():
  for method in methods.METHODS:
    config = preference_tuning.get_config(f"smoke,method={method}")
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
    assert config.task == "preference_tuning" and config.dpo.beta == 0.1
