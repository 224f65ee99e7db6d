"""A run's evaluation: global and personalized accuracy over the test blocks, and new clients."""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.runner.data import blocks
from experiments.runner.assembly import Experiment
from hyperlora_jax import distributed, primitives
from hyperlora_jax.tasks import image_classification as task_lib


def run_evaluator(exp: Experiment, with_extras: bool = False) -> Callable[..., Callable[[], tuple]]:
  """The run's evaluation: `evaluate(state, frozen, transform_images=None)` dispatches the
  evaluation of `state` and returns `collect()`, which waits for it and gives (global accuracy
  (NaN without a global model), [N] client accuracies). In between, the state may be donated
  to the next round: the evaluation was enqueued first and reads it first. It loops over the
  data's evaluation blocks, sharded over the clients mesh axis (examples of the global test
  blocks, clients of the client blocks): held on the devices once when the images are in
  memory, read again at each evaluation when they are streamed.

  `transform_images`: images [..., H, W, 3] uint8 -> the same shape and dtype, applied to
  every test block before it is evaluated (a test-time shift, `data.corruptions`); the blocks
  are then read again, and the compiled evaluation is reused.

  A text task (one with `accuracy_and_nll`) evaluates next-token accuracy and the response
  tokens' mean nll in the same pass; with `with_extras`, `collect()` gives a third item, a
  text task's perplexities {"global_perplexity", "personalized_perplexity_mean",
  "personalized_perplexity_worst" (the largest)} ({} for other tasks)."""
  text = hasattr(exp.task, "accuracy_and_nll")
  rates = _evaluator(exp, exp.task.accuracy_and_nll if text else None)
  has_test = exp.data.has_test_examples()

  def evaluate(state, frozen, transform_images=None):
    collect_rates = rates(state, frozen, transform_images)

    def collect():
      global_rates, client_rates = collect_rates()
      if not text:
        return (float(global_rates), client_rates) + (({},) if with_extras else ())
      (global_accuracy, global_nll), (accuracies, nll) = global_rates, client_rates.T
      perplexity = np.exp(nll[has_test])
      extras = {
        "global_perplexity": float(np.exp(global_nll)),
        "personalized_perplexity_mean": float(perplexity.mean()),
        "personalized_perplexity_worst": float(perplexity.max()),
      }
      return (float(global_accuracy), accuracies) + ((extras,) if with_extras else ())

    return collect

  return evaluate


def _evaluator(exp: Experiment, counts: Callable | None) -> Callable[..., Callable[[], tuple[np.ndarray, np.ndarray]]]:
  """`evaluate(state, frozen, transform_images)` -> `collect()` -> (global hits / count: a scalar,
  or [m] when `counts` gives m hits per count (NaN without a global model); [N] or [N, m] per
  client), `counts` as `make_evaluate`'s."""
  chunk = exp.fed_round.clients_per_chunk
  evaluation = task_lib.make_evaluate(
    exp.task, exp.fed_round, eval_batch=exp.settings.eval_batch, clients_per_chunk=chunk, counts=counts
  )
  global_counts, client_accuracy = jax.jit(evaluation.global_counts), jax.jit(evaluation.client_accuracy)
  data = exp.data
  sharded = primitives.clients_sharding(exp.mesh)
  multiple = math.lcm(chunk or 1, primitives.clients_axis_size(exp.mesh))

  def blocks_on_device(transform_images=None):
    def shifted(block):
      return block if transform_images is None else {**block, "image": transform_images(block["image"])}

    return (
      [jax.device_put(shifted(b), sharded) for b in data.global_test_blocks()],
      [jax.device_put((ids, shifted(b)), sharded) for ids, b in data.client_test_blocks(multiple=multiple)],
    )

  cached = None if exp.settings.stream else blocks_on_device()

  def evaluate(state, frozen, transform_images=None):
    shifted_or_streamed = transform_images is not None or cached is None
    global_blocks, client_blocks = blocks_on_device(transform_images) if shifted_or_streamed else cached
    counts = [global_counts(state, frozen, block) for block in global_blocks]
    per_client = [client_accuracy(state, frozen, ids, block) for ids, block in client_blocks]

    def collect():
      correct = count = np.float32(0.0)
      for c, n in counts:  # Integer counts: exact in float32, as on the device.
        correct, count = correct + np.asarray(c, np.float32), count + np.float32(n)
      rates = correct / max(count, np.float32(1.0))
      accuracies = np.concatenate([distributed.to_host(a) for a in per_client])[: data.num_clients]
      return (rates if exp.method.has_global_model else np.full_like(rates, np.nan)), accuracies

    return collect

  return evaluate


def evaluate_new_clients(exp: Experiment, state: Any, frozen: Any) -> dict[str, float]:
  """Mean accuracy of the held-out new clients from each start (`make_new_client_evaluate`),
  as record entries `new_client_<start>`; {} without held-out clients."""
  data, settings = exp.data, exp.settings
  if not data.new_train_parts:
    return {}
  ids = np.arange(len(data.new_train_parts))
  rng = np.random.default_rng([settings.seed, 2])
  pool, parts = data.step_source(new_clients=True)
  indices, mask = blocks.train_block_indices(parts, ids, settings.fed.new_client_steps, settings.fed.batch_size, rng)
  train_block = blocks.gather_block(pool, indices, mask)
  test_block = blocks.padded_eval_block(data.test_pool, data.new_test_parts)
  signatures = exp.new_signatures if exp.new_signatures is not None else np.zeros((len(ids), 0), np.float32)
  evaluate_new = jax.jit(task_lib.make_new_client_evaluate(exp.task, exp.fed_round, exp.client_update))
  inputs = jax.device_put((train_block, test_block, signatures), NamedSharding(exp.mesh, P()))
  accuracies = evaluate_new(state, frozen, *inputs)
  return {f"new_client_{name}": float(np.mean(distributed.to_host(acc))) for name, acc in accuracies.items()}


def multiple_choice_evaluator(exp: Experiment) -> Callable[[Any, Any], dict] | None:
  """A text run's `mc` evaluation (None without questions): `evaluate(state, frozen)` scores the
  questions for the global model and for every client's personalized model (the one it is
  evaluated on), waits, and gives the record entries mc_accuracy_global,
  mc_accuracy_personalized_mean / _worst (over the training clients) and
  mc_accuracy_global_by_subject {subject: accuracy}. Questions go `eval_batch` sequences at a
  time (a question is one sequence when its choices differ in their last token only,
  `text.encode_multiple_choice`'s letter_ids; else K)."""
  block = exp.multiple_choice
  if block is None:
    return None
  task, fed_round = exp.task, exp.fed_round
  arrays = {k: v for k, v in block.items() if k != "subject"}
  questions, choices = arrays["answer"].shape[0], arrays["choice_mask"].shape[1]
  sequences = 1 if "letter_ids" in arrays else choices  # Forward passes a question takes.
  per_chunk = max(1, exp.settings.eval_batch // sequences)
  padded = -(-questions // per_chunk) * per_chunk
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - questions, axis=0)]) if padded > questions else x
  chunks = jax.tree.map(lambda x: pad(x).reshape((padded // per_chunk, per_chunk) + x.shape[1:]), arrays)
  chunks = jax.device_put(chunks, NamedSharding(exp.mesh, P()))

  def correct(frozen, trainable):
    """[Q'] 1.0 where right, over the padded questions."""
    return jax.lax.map(lambda chunk: task.multiple_choice_correct(frozen, trainable, chunk), chunks).reshape(-1)

  @jax.jit
  def global_correct(state, frozen):
    frozen = task_lib.apply_base_delta(frozen, state.base_delta)
    return correct(frozen, fed_round.global_params(state))

  @jax.jit
  def client_correct(state, frozen, client):
    frozen = task_lib.apply_base_delta(frozen, state.base_delta)
    return correct(frozen, jax.tree.map(lambda x: x[0], fed_round.client_params(state, client[None])))

  subjects = block["subject"]

  def evaluate(state, frozen) -> dict:
    hits = np.asarray(distributed.to_host(global_correct(state, frozen)))[:questions]
    personal = np.array(
      [
        np.asarray(distributed.to_host(client_correct(state, frozen, jnp.int32(c))))[:questions].mean()
        for c in range(exp.data.num_clients)
      ]
    )
    return {
      "mc_accuracy_global": float(hits.mean()),
      "mc_accuracy_personalized_mean": float(personal.mean()),
      "mc_accuracy_personalized_worst": float(personal.min()),
      "mc_accuracy_global_by_subject": {str(s): float(hits[subjects == s].mean()) for s in sorted(set(subjects))},
    }

  return evaluate


def model_functions(fed_round: Any) -> tuple[Callable, Callable]:
  """(global_model(state) -> the trainable tree evaluated as global, client_model(state, client)
  -> client `client`'s (an int32 []) personalized tree), each jitted once. One client at a
  time: its floats do not depend on which other clients are asked for (a vmap of another size
  rounds differently)."""
  global_model = jax.jit(fed_round.global_params)
  client_model = jax.jit(
    lambda state, client: jax.tree.map(lambda x: x[0], fed_round.client_params(state, client[None]))
  )
  return global_model, client_model


def greedy_responses(task: Any, tokenizer: Any, max_new_tokens: int) -> Callable[..., list[str]]:
  """`responses(frozen, trainable, prompt_ids, prompt_mask)` -> the decoded greedy continuations
  (`models.llama.generate`, stopping at end-of-text; padding dropped) of left-padded prompts
  [n, P] by the text task's model with adapter `trainable` and `frozen["base_delta"]`; the
  generation jitted once per prompt shape."""
  from hyperlora_jax import lora
  from hyperlora_jax.models.llama import generate

  @jax.jit
  def tokens(frozen, trainable, ids, mask):
    apply = lambda *a: lora.apply(
      task.model,
      frozen["variables"],
      trainable["lora"],
      *a[:2],
      cache=a[2],
      scale=task.scale,
      base_delta=frozen["base_delta"],
    )
    return generate(apply, task.model, ids, mask, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)

  def responses(frozen, trainable, ids, mask) -> list[str]:
    rows = np.asarray(distributed.to_host(tokens(frozen, trainable, ids, mask)))
    return [tokenizer.decode([t for t in row if t != tokenizer.pad_id]) for row in rows]

  return responses


def complete_prompts(
  exp: Experiment,
  state: Any,
  trainable: Any,
  prompts: list[str],
  max_new_tokens: int,
  batch: int = 16,
  add_special_tokens: bool = True,
) -> list[str]:
  """Greedy continuations of `prompts` by the run's model with adapter `trainable` and the
  state's merged residuals (`greedy_responses`), `batch` at a time, left-padded to the longest
  prompt (one compiled shape per call); `add_special_tokens=False` for prompts a chat template
  rendered (they hold their own begin-of-text)."""
  from hyperlora_jax.tasks.common import apply_base_delta

  tokenizer = exp.tokenizer
  frozen = apply_base_delta(exp.frozen(), state.base_delta)  # FedEx-LoRA's merged residuals.
  responses = greedy_responses(exp.task, tokenizer, max_new_tokens)
  encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
  return in_left_padded_batches(encoded, batch, lambda ids, mask: responses(frozen, trainable, ids, mask))


def in_left_padded_batches(
  encoded: list[list[int]], batch: int, respond: Callable[[np.ndarray, np.ndarray], list[str]]
) -> list[str]:
  """`respond(ids, mask)` on `encoded` token lists, `batch` at a time, each left-padded to the
  longest of them (int32 [batch, width]; the last batch filled with copies of its last row: one
  compiled shape); the texts of the real rows, in order."""
  width = max(len(e) for e in encoded)
  texts = []
  for start in range(0, len(encoded), batch):
    rows = encoded[start : start + batch]
    rows = rows + [rows[-1]] * (batch - len(rows))
    ids, mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    for i, e in enumerate(rows):
      ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
    texts += respond(ids, mask)
  return texts[: len(encoded)]


def generation_evaluator(exp: Experiment) -> Callable[[Any, Any], dict] | None:
  """A text run's `gen` scoring (None without it): `evaluate(state, frozen)` generates greedy
  responses (`models.llama.generate`, `gen.max_new_tokens`, stopping at end-of-text) to each
  client's first `gen.examples_per_client` test prompts (of those whose response was not cut
  away by `data.max_len`), with the global model and with the
  client's personalized model, waits, and gives gen_exact_match_global, gen_rouge_l_global
  (over every client's prompts), gen_exact_match_personalized_mean, gen_rouge_l_personalized_mean
  and gen_rouge_l_personalized_worst (over the clients with test prompts)."""
  from hyperlora_jax import text

  settings = exp.settings.generation
  if settings is None or not settings.examples_per_client or exp.tokenizer is None:
    return None
  task, fed_round, tokenizer = exp.task, exp.fed_round, exp.tokenizer
  pool = exp.data.test_pool
  scored = lambda part: [i for i in part if np.asarray(pool.tokens["loss_mask"][i]).any()]  # A response to score.
  clients = [(c, scored(part)[: settings.examples_per_client]) for c, part in enumerate(exp.data.test_parts)]
  clients = [(c, part) for c, part in clients if part]
  if not clients:
    return None
  rows = [{k: np.asarray(pool.tokens[k][np.asarray(part)]) for k in ("input_ids", "loss_mask")} for _, part in clients]
  prompt_ids, prompt_mask, references = text.prompts_and_references(
    {k: np.concatenate([r[k] for r in rows]) for k in ("input_ids", "loss_mask")}, tokenizer.eos_id
  )
  sizes = np.cumsum([0] + [len(part) for _, part in clients])
  reference_texts = [tokenizer.decode(ids) for ids in references]
  responses = greedy_responses(task, tokenizer, settings.max_new_tokens)

  def scores(frozen, trainable, lo, hi) -> tuple[list[float], list[float]]:
    predictions = responses(frozen, trainable, prompt_ids[lo:hi], prompt_mask[lo:hi])
    pairs = list(zip(predictions, reference_texts[lo:hi]))
    return [text.exact_match(p, r) for p, r in pairs], [text.rouge_l(p, r) for p, r in pairs]

  global_params, client_params = model_functions(fed_round)

  def evaluate(state, frozen) -> dict:
    frozen = task_lib.apply_base_delta(frozen, state.base_delta)
    global_model = global_params(state)
    global_em, global_rouge, personal_em, personal_rouge = [], [], [], []
    for i, (client, _) in enumerate(clients):
      lo, hi = int(sizes[i]), int(sizes[i + 1])
      em, rouge = scores(frozen, global_model, lo, hi)
      global_em += em
      global_rouge += rouge
      em, rouge = scores(frozen, client_params(state, jnp.int32(client)), lo, hi)
      personal_em.append(np.mean(em))
      personal_rouge.append(np.mean(rouge))
    return {
      "gen_exact_match_global": float(np.mean(global_em)),
      "gen_rouge_l_global": float(np.mean(global_rouge)),
      "gen_exact_match_personalized_mean": float(np.mean(personal_em)),
      "gen_rouge_l_personalized_mean": float(np.mean(personal_rouge)),
      "gen_rouge_l_personalized_worst": float(np.min(personal_rouge)),
    }

  return evaluate
