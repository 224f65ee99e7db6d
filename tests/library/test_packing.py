"""Packed sequences: several examples in one row, each its own segment (`text.packing_plan`,
`text.pack_examples`, the decoder's segment-aware attention and positions, `tasks.causal_lm`).
Against transformers through tests/fixtures/hf_packed_outputs.npz (packed_references.py wrote it:
transformers reads packed rows from restarting position_ids), and against the same examples
unpacked."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import lora, text
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import segment_positions
from hyperlora_jax.tasks import causal_lm
from hyperlora_jax.tasks.common import frozen_tree

from tests.repo_paths import FIXTURES

TOLERANCE = 1e-5


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(want)))


def test_best_fit_decreasing_packs_the_hand_worked_example():
  """Lengths 5 3 8 2 7 1 4 into rows of 10, longest first, each into the row it leaves least
  room in: 8 | 7 | 5; 4 -> the 5's row (room 5); 3 -> the 7's (room 3); 2 -> the 8's (room 2);
  1 -> the 5 + 4 row (room 1): three full rows, where one example a row takes seven."""
  plan = text.packing_plan([5, 3, 8, 2, 7, 1, 4], 10)
  np.testing.assert_array_equal(plan, [[2, 3, -1], [4, 1, -1], [0, 6, 5]])
  with pytest.raises(ValueError, match="1..max_len=10"):
    text.packing_plan([11], 10)
  assert text.packing_plan([], 10).shape == (0, 1)


def test_every_example_lands_once_in_rows_that_fit_and_few_rows_are_used():
  """On 500 random lengths: each index once, no row over T, and the rows within best-fit
  decreasing's bound 11/9 OPT + 1 of the lower bound ceil(Σ lengths / T) (one example a row,
  a bin never reused, or a first-fit that skips rows fails it)."""
  rng = np.random.default_rng(0)
  lengths = np.minimum(rng.lognormal(4.0, 0.8, size=500).astype(int) + 1, 256)
  plan = text.packing_plan(lengths, 256)
  members = plan[plan >= 0]
  np.testing.assert_array_equal(np.sort(members), np.arange(500))
  assert np.where(plan >= 0, lengths[np.maximum(plan, 0)], 0).sum(axis=1).max() <= 256
  lower = -(-lengths.sum() // 256)
  assert len(plan) <= 11 * lower / 9 + 1, (len(plan), lower)


def _tokens(lengths, max_len):
  """Right-padded examples whose ids name (example, position): id = 100 * i + t; loss on their
  second half."""
  n = len(lengths)
  tokens = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
  for i, length in enumerate(lengths):
    tokens["input_ids"][i, :length] = 100 * i + np.arange(length)
    tokens["attention_mask"][i, :length] = 1
    tokens["loss_mask"][i, length // 2 : length] = 1
  return tokens


def test_a_packed_row_holds_each_example_whole_in_plan_order():
  """Row [2, 3] of the hand example: example 2's 8 tokens then example 3's 2, segments 1 and 2,
  each example's own loss mask; the 5 + 4 + 1 row; rows may be indexed in any batch shape."""
  lengths = [5, 3, 8, 2, 7, 1, 4]
  tokens = _tokens(lengths, 10)
  plan = text.packing_plan(lengths, 10)
  packed = text.pack_examples(tokens, plan, pad_id=-1)
  np.testing.assert_array_equal(packed["input_ids"][0], [200, 201, 202, 203, 204, 205, 206, 207, 300, 301])
  np.testing.assert_array_equal(packed["attention_mask"][0], [1] * 8 + [2] * 2)
  np.testing.assert_array_equal(packed["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(packed["input_ids"][2], [0, 1, 2, 3, 4, 600, 601, 602, 603, 500])
  np.testing.assert_array_equal(packed["attention_mask"][2], [1] * 5 + [2] * 4 + [3])
  assert text.padding_fraction(tokens["attention_mask"]) == pytest.approx(40 / 70)
  assert text.padding_fraction(packed["attention_mask"]) == 0.0
  short = text.pack_examples(tokens, np.asarray([[[1, 3, -1]]]), pad_id=-1)  # [1, 1, K] -> [1, 1, T].
  np.testing.assert_array_equal(short["input_ids"][0, 0], [100, 101, 102, 300, 301, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(short["attention_mask"][0, 0], [1, 1, 1, 2, 2, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="more than T=10"):
    text.pack_examples(tokens, np.asarray([[2, 0]]))


def test_positions_restart_at_each_segment_and_are_unchanged_for_one_sequence_a_row():
  """By hand for packed rows; for {0, 1} masks (right or left padding, holes) the count of real
  tokens before each token, the formula of one sequence a row."""
  got = segment_positions(jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 2, 2, 0]]))
  np.testing.assert_array_equal(got, [[0, 1, 0, 1, 2, 0, 0, 0], [0, 0, 0, 1, 2, 0, 1, 1]])
  masks = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(16, 12)))
  np.testing.assert_array_equal(segment_positions(masks), jnp.maximum(jnp.cumsum(masks, axis=1) - 1, 0))


@pytest.fixture(scope="module")
def packed_outputs():
  with np.load(os.path.join(FIXTURES, "hf_packed_outputs.npz")) as f:
    return dict(f)


@pytest.mark.parametrize("name", ["hf_llama", "hf_mistral", "hf_gemma2", "hf_qwen3", "hf_phi3"])
def test_packed_rows_give_transformers_logits(name, packed_outputs):
  """Rows of 3 and 2 sequences (longer than the window of 4 where there is one): the project's
  logits with the segment ids as attention mask against transformers' with restarting
  position_ids. The same rows read as one sequence (mask 1) miss by far: the check sees a leak
  across segments. (Positions that do not restart would pass: rotary attention depends on
  position differences only, which are the same within a segment.)"""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, name))
  ids, segments = jnp.asarray(packed_outputs["input_ids"]), jnp.asarray(packed_outputs["segment_ids"])
  want = packed_outputs[f"{name}_output"]
  assert _relative_error(model.apply(variables, ids, segments), want) <= TOLERANCE
  assert _relative_error(model.apply(variables, ids, (segments > 0).astype(jnp.int32)), want) > 1e-3


RECORDS = [
  {"instruction": "Give three tips for staying healthy.", "context": "", "response": "Eat well, sleep, walk."},
  {"instruction": "What is the capital of France?", "context": "France is in Europe.", "response": "Paris."},
  {"instruction": "Classify each animal.", "context": "cat, dog", "response": "cat: pet, dog: pet"},
  {"instruction": "Name a colour.", "context": "", "response": "Blue."},
  {"instruction": "Add two and two.", "context": "", "response": "Four."},
]


def test_a_step_on_packed_rows_is_a_step_on_the_same_records_unpacked():
  """The loss (mean NLL over the batch's response tokens), its gradient for a LoRA adapter on
  q/v, and the token counts of 5 records packed into rows equal those of the 5 records one a
  row: what packing must not change. Also the first token of a segment is never a target of the
  previous one, even where a loss mask would count it."""
  directory = os.path.join(FIXTURES, "hf_llama")
  model, variables, _ = hf.load_causal_lm(directory)
  tokenizer = hf.Tokenizer.from_directory(directory)
  batch = text.encode_instructions(tokenizer, RECORDS, max_len=176, layout="dolly")  # Lengths 73..138.
  lengths = text.example_lengths(batch["attention_mask"])
  plan = text.packing_plan(lengths, 176)
  assert len(plan) < len(RECORDS)
  packed = {k: jnp.asarray(v) for k, v in text.pack_examples(batch, plan, tokenizer.pad_id).items()}
  unpacked = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
  task = causal_lm.CausalLM(model, scale=2.0)
  frozen = frozen_tree(variables)
  targets = lora.find_targets(model, variables, unpacked["input_ids"], unpacked["attention_mask"])
  adapter = lora.init_lora(jax.random.key(3), targets, rank=2)
  adapter = {"lora": {p: {"a": f["a"], "b": 0.05 * jnp.ones_like(f["b"])} for p, f in adapter.items()}}
  loss_and_grad = jax.jit(jax.value_and_grad(lambda t, b: task.loss_fn(t, frozen, b, None)[0]))
  (loss, grads), (want_loss, want_grads) = loss_and_grad(adapter, packed), loss_and_grad(adapter, unpacked)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  counts = [jax.jit(task.token_counts)(frozen, adapter, b) for b in (packed, unpacked)]
  np.testing.assert_allclose(counts[0].nll, counts[1].nll, rtol=1e-5)
  assert float(counts[0].tokens) == float(counts[1].tokens) and float(counts[0].correct) == float(counts[1].correct)
  leaky = dict(packed, loss_mask=jnp.ones_like(packed["loss_mask"]))
  _, weights = causal_lm.next_token_targets(leaky)
  boundary = (jnp.roll(packed["attention_mask"], -1, axis=1) != packed["attention_mask"])[:, :-1]
  assert int(boundary.sum()) >= 1 and not np.any(np.asarray(weights[:, :-1])[np.asarray(boundary)])
