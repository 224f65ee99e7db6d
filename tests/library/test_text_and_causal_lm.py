"""Instruction examples (`hyperlora_jax.text`) and the causal-LM task (`tasks.causal_lm`) on the
fixture Llama (tests/fixtures/hf_llama: transformers' weights and tokenizer)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperlora_jax import aggregators, federated, lora, local_update, text
from hyperlora_jax.models import hf
from hyperlora_jax.tasks import causal_lm
from hyperlora_jax.tasks.common import frozen_tree

from tests.repo_paths import FIXTURES

FIXTURE = os.path.join(FIXTURES, "hf_llama")
RECORDS = [
  {
    "instruction": "Give three tips for staying healthy.",
    "context": "",
    "response": "Eat well.",
    "category": "brainstorming",
  },
  {
    "instruction": "What is the capital of France?",
    "context": "France is in Europe.",
    "response": "Paris.",
    "category": "open_qa",
  },
  {
    "instruction": "Classify each animal.",
    "context": "cat, dog",
    "response": "cat: pet, dog: pet",
    "category": "classification",
  },
]


@pytest.fixture(scope="module")
def tokenizer():
  return hf.Tokenizer.from_directory(FIXTURE)


@pytest.fixture(scope="module")
def llama():
  return hf.load_causal_lm(FIXTURE)[:2]


def test_the_alpaca_template_is_the_published_one():
  """Stanford Alpaca's two prompts (train.py's PROMPT_DICT), which FedIT uses for Dolly too:
  Dolly's `context` is Alpaca's `input`."""
  prompt, response = text.prompt_and_response(RECORDS[1], layout="dolly")
  assert prompt == (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "What is the capital of France?\n\n### Input:\nFrance is in Europe.\n\n### Response:\n"
  )
  assert response == "Paris."
  prompt, _ = text.prompt_and_response({"instruction": "Say hi.", "input": "", "output": "Hi."}, layout="alpaca")
  assert prompt == (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
  )


def test_a_record_missing_its_fields_is_named():
  with pytest.raises(ValueError, match="dolly layout needs a text field 'response'"):
    text.prompt_and_response({"instruction": "x", "output": "y"}, layout="dolly")
  with pytest.raises(ValueError, match="layout='sharegpt'; known"):
    text.prompt_and_response(RECORDS[0], layout="sharegpt")


def test_the_loss_falls_on_the_response_and_its_end_of_text_only(tokenizer):
  """Hand count: prompt tokens (begin-of-text first), then the response's tokens and eos, with
  the loss mask 1 exactly on those; then padding."""
  prompt, response = text.prompt_and_response(RECORDS[0], layout="dolly")
  example = text.encode_instruction(tokenizer, prompt, response, max_len=96)
  p = tokenizer.encode(prompt)
  r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_id]
  assert p[0] == tokenizer.bos_id and tokenizer.bos_id not in r and len(p) + len(r) < 96
  np.testing.assert_array_equal(example["input_ids"][: len(p) + len(r)], p + r)
  assert (example["input_ids"][len(p) + len(r) :] == tokenizer.pad_id).all()
  np.testing.assert_array_equal(np.nonzero(example["loss_mask"])[0], np.arange(len(p), len(p) + len(r)))
  assert example["attention_mask"].sum() == len(p) + len(r)
  assert tokenizer.decode(example["input_ids"][example["loss_mask"] == 1]) == response


def test_long_examples_are_cut_and_flagged(tokenizer):
  prompt, response = text.prompt_and_response(RECORDS[2], layout="dolly")
  n_prompt = len(tokenizer.encode(prompt))
  batch = text.encode_instructions(tokenizer, RECORDS, max_len=n_prompt + 2, layout="dolly")
  assert batch["input_ids"].shape == (3, n_prompt + 2)
  assert batch["truncated"][2] and batch["loss_mask"][2].sum() == 2  # Two response tokens kept.
  short = text.encode_instructions(tokenizer, RECORDS, max_len=20, layout="dolly")  # Every prompt fills 20.
  assert short["no_loss"].all() and (short["mask"] == 0).all() and short["loss_mask"].sum() == 0


def test_the_chat_template_writes_its_own_begin_of_text(tokenizer):
  """With chat=True the prompt is the tokenizer's chat template (one user turn) and is not given
  a second begin-of-text."""
  batch = text.encode_instructions(tokenizer, RECORDS[1:2], max_len=96, layout="dolly", chat=True)
  ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
  assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id
  expected = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?\n\nFrance is in Europe."}], add_generation_prompt=True
  )
  assert tokenizer.decode(ids[batch["loss_mask"][0][: len(ids)] == 0], skip_special_tokens=False) == expected


def _batch(tokenizer, records=RECORDS, max_len=144):
  return {
    k: jnp.asarray(v)
    for k, v in text.encode_instructions(tokenizer, records, max_len, "dolly").items()
    if k in ("input_ids", "attention_mask", "loss_mask", "mask")
  }


def test_token_counts_follow_the_next_token_formula(tokenizer, llama):
  """Σ −log softmax(logits_t)[id_{t+1}] over t with loss_mask[t+1] = 1, in NumPy from the
  model's own logits: the shift and the mask's alignment (an off-by-one counts prompt tokens)."""
  model, variables = llama
  batch = _batch(tokenizer)
  task = causal_lm.CausalLM(model, scale=1.0)
  counts = task.token_counts(frozen_tree(variables), {"lora": {}}, batch)
  logits = np.asarray(model.apply(variables, batch["input_ids"], batch["attention_mask"]), np.float64)
  log_probs = (
    logits
    - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  ids, loss_mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
  nll = correct = tokens = 0.0
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1] - 1):
      if loss_mask[b, t + 1]:
        nll -= log_probs[b, t, ids[b, t + 1]]
        correct += float(np.argmax(logits[b, t]) == ids[b, t + 1])
        tokens += 1
  assert tokens == loss_mask.sum() - loss_mask[:, 0].sum() and tokens > 10
  np.testing.assert_allclose([counts.nll, counts.correct, counts.tokens], [nll, correct, tokens], rtol=1e-5)
  loss, _ = task.loss_fn({"lora": {}}, frozen_tree(variables), batch, jax.random.key(0))
  np.testing.assert_allclose(loss, nll / tokens, rtol=1e-5)
  np.testing.assert_allclose(causal_lm.perplexity(counts), np.exp(nll / tokens), rtol=1e-5)
  split = causal_lm.split_counts(task, frozen_tree(variables), {"lora": {}}, {k: batch[k] for k in batch}, 3)
  np.testing.assert_allclose(split.nll, nll, rtol=1e-5)


def test_the_nll_gradient_is_the_derivative_of_log_softmax():
  """`weighted_nll`'s hand-written gradient against autodiff of optax's log-softmax cross
  entropy, on [B=2, T=3, V=5] logits with weights 0 (prompt), 1 and 2: a wrong sign, a missing
  weight or a softmax over the wrong axis shows."""
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5)) * 3.0
  targets = jnp.asarray([[4, 0, 2], [1, 1, 3]])
  weights = jnp.asarray([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])
  reference = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights)
  ours = lambda x: causal_lm.weighted_nll(x, targets, weights)
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  got, want = jax.grad(ours)(logits), jax.grad(reference)(logits)
  assert not np.any(np.asarray(got)[0, 0]) and np.any(np.asarray(got)[0, 2])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_the_nll_gradient_is_the_same_by_scatter_and_by_select_and_accelerators_get_no_scatter():
  """The backward's one-hot part two ways, the CPU's scatter at the targets and the accelerators'
  select over the vocabulary: equal bit for bit on [B=3, T=7, V=11] with repeated targets and
  weights 0 / 1 / 2.5 (a select that missed or hit a second column, or a scale not subtracted,
  would differ); and the gradient lowered for TPU and CUDA (`jax.export`, no accelerator here)
  holds no scatter, where the CPU's does: the choice is made by platform."""
  values = jax.random.normal(jax.random.key(0), (3, 7, 11))
  targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 11).at[0, :3].set(10)
  scale = jnp.tile(jnp.asarray([0.0, 1.0, 2.5]), 7)[:21].reshape(3, 7)
  by_scatter = causal_lm._subtract_at_targets_by_scatter(values, scale, targets)
  by_select = causal_lm._subtract_at_targets_by_select(values, scale, targets)
  np.testing.assert_array_equal(by_scatter, by_select)
  changed = np.argwhere(np.asarray(by_select) != np.asarray(values))
  assert len(changed) == int(np.sum(np.asarray(scale) != 0))  # One entry per weighted row.
  assert all(int(targets[b, t]) == v for b, t, v in changed)

  grad = jax.jit(jax.grad(causal_lm.weighted_nll))
  lowered = {
    platform: jax.export.export(grad, platforms=[platform])(values, targets, scale).mlir_module()
    for platform in ("cpu", "tpu", "cuda")
  }
  assert "stablehlo.scatter" in lowered["cpu"]
  assert "stablehlo.scatter" not in lowered["tpu"] and "stablehlo.scatter" not in lowered["cuda"]


def test_the_sequence_log_probability_gathers_as_autodiff_would_and_accelerators_get_no_scatter():
  """`CausalLM.sequence_logprob`'s (DPO's loss) pick of each target's log-probability: value and
  gradient equal bit for bit to autodiff of `take_along_axis` on [B=3, T=7, V=11] with repeated
  targets and weights 0 / 1 / 2.5 (a cotangent put at the wrong column, with the wrong sign, or
  summed once for repeated rows would differ), under jit and vmap; the gradient lowered for TPU
  and CUDA holds no scatter (a v6e offloads one to a fusion its cost model cannot price), the
  CPU's keeps autodiff's."""
  logits = jax.random.normal(jax.random.key(0), (3, 7, 11))
  targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 11).at[0, :3].set(10)
  weights = jnp.tile(jnp.asarray([0.0, 1.0, 2.5]), 7)[:21].reshape(3, 7)

  def score(pick):
    return lambda x: jnp.sum(jnp.sin(pick(jax.nn.log_softmax(x, axis=-1), targets) * weights))

  autodiff = score(lambda values, t: jnp.take_along_axis(values, t[..., None], axis=-1)[..., 0])
  ours = score(causal_lm._values_at_targets)
  assert ours(logits) == autodiff(logits)
  for transform in (lambda f: f, jax.jit):
    np.testing.assert_array_equal(transform(jax.grad(ours))(logits), transform(jax.grad(autodiff))(logits))
  stacked = jnp.stack([logits, -logits])
  np.testing.assert_array_equal(jax.vmap(jax.grad(ours))(stacked), jax.vmap(jax.grad(autodiff))(stacked))

  lowered = {
    platform: jax.export.export(jax.jit(jax.grad(ours)), platforms=[platform])(logits).mlir_module()
    for platform in ("cpu", "tpu", "cuda")
  }
  assert "stablehlo.scatter" in lowered["cpu"]
  assert "stablehlo.scatter" not in lowered["tpu"] and "stablehlo.scatter" not in lowered["cuda"]


def test_one_jitted_round_trains_every_text_client_as_a_loop_of_single_clients_would(tokenizer, llama):
  """FedIT over 3 text clients, LoRA on query/value: the round (clients vmapped, one compile)
  gives the weighted mean of the adapters each client reaches alone with `local_update`."""
  model, variables = llama
  task = causal_lm.CausalLM(model, scale=2.0)
  frozen = frozen_tree(variables)
  batch = _batch(tokenizer)
  targets = lora.find_targets(model, variables, batch["input_ids"], batch["attention_mask"])
  assert sorted(targets) == ["block_0/attn/query", "block_0/attn/value", "block_1/attn/query", "block_1/attn/value"]
  adapter = lora.init_lora(jax.random.key(3), targets, rank=2)
  adapter = {
    "lora": {
      p: {"a": f["a"], "b": 0.01 * jax.random.normal(jax.random.key(i), f["b"].shape)}
      for i, (p, f) in enumerate(adapter.items())
    }
  }
  client_update = local_update(task.loss_fn, optax.adam(1e-2))
  # Client k's 2 steps of 1 example each: [C=3, S=2, B=1, T].
  order = np.array([[0, 1], [1, 2], [2, 0]])
  batches = jax.tree.map(lambda x: x[order][:, :, None], batch)
  fed = federated.FederatedRound(client_update, aggregators.fedit(), num_clients=3)
  weights = jnp.asarray([0.5, 0.3, 0.2])
  state = fed.init(jax.random.key(0), adapter)
  new, metrics = jax.jit(fed.step)(state, frozen, batches, jnp.arange(3), weights)
  alone = [
    client_update(adapter, frozen, jax.tree.map(lambda x: x[k], batches), jax.random.key(0))[0] for k in range(3)
  ]
  expected = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(np.asarray(weights), xs)), *alone)
  for got, want in zip(jax.tree.leaves(new.global_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert float(metrics["train_loss"]) > 0
  trained = causal_lm.CausalLM(model, 2.0).loss_fn(new.global_params, frozen, batch, None)[0]
  assert trained < task.loss_fn(adapter, frozen, batch, None)[0]  # The round lowered the loss.
