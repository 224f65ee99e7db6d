"""Preference pairs (`text.encode_preference_pairs`) and DPO (`tasks.preference`) on the fixture
Llama: the loss against its formula by hand, the reference as the frozen decoder alone, and a
few steps that learn a preference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperlora_jax import lora, text
from hyperlora_jax.models import hf
from hyperlora_jax.tasks import causal_lm, preference
from hyperlora_jax.tasks.common import frozen_tree

from tests.repo_paths import FIXTURES

FIXTURE = os.path.join(FIXTURES, "hf_llama")


def test_the_dpo_loss_is_its_formula_and_its_gradient_the_papers():
  """-log σ(β[(π_w - ρ_w) - (π_l - ρ_l)]) by hand for two pairs, the masked pair left out; the
  gradient with respect to log π_w is -β σ(-margin) / n and to log π_l its negative (DPO's eq. 7),
  none to the reference."""
  policy = jnp.asarray([[-3.0, -5.0], [-2.0, -1.0], [-9.0, -9.0]])
  reference = jnp.asarray([[-4.0, -4.0], [-2.5, -1.5], [0.0, 0.0]])
  beta, mask = 0.5, jnp.asarray([1.0, 1.0, 0.0])
  loss, margins = preference.dpo_loss(policy, reference, beta, mask)
  want_margins = beta * np.asarray([(-3 + 4) - (-5 + 4), (-2 + 2.5) - (-1 + 1.5), 0.0])
  np.testing.assert_allclose(margins, want_margins, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-want_margins[:2]))), rtol=1e-6)
  grad_policy, grad_reference = jax.grad(lambda p, r: preference.dpo_loss(p, r, beta, mask)[0], argnums=(0, 1))(
    policy, reference
  )
  sigma = 1 / (1 + np.exp(want_margins[:2]))
  np.testing.assert_allclose(grad_policy[:2, 0], -beta * sigma / 2, rtol=1e-5)
  np.testing.assert_allclose(grad_policy[:2, 1], beta * sigma / 2, rtol=1e-5)
  assert not np.any(np.asarray(grad_policy[2])) and not np.any(np.asarray(grad_reference))


def test_ipo_and_conservative_dpo_are_their_formulas():
  """TRL's other loss types by hand: IPO's (h - 1/(2β))² with h the unscaled lead, and
  conservative DPO's -(1-ε) log σ(m) - ε log σ(-m); an unknown type is named."""
  policy, reference = jnp.asarray([[-3.0, -5.0], [-2.0, -1.0]]), jnp.asarray([[-4.0, -4.0], [-2.5, -1.5]])
  lead = np.asarray([2.0, 0.0])
  ipo, _ = preference.dpo_loss(policy, reference, 0.25, loss_type="ipo")
  np.testing.assert_allclose(ipo, np.mean((lead - 1 / (2 * 0.25)) ** 2), rtol=1e-6)
  smooth, margins = preference.dpo_loss(policy, reference, 0.5, label_smoothing=0.1)
  m = 0.5 * lead
  want = -0.9 * np.log(1 / (1 + np.exp(-m))) - 0.1 * np.log(1 / (1 + np.exp(m)))
  np.testing.assert_allclose(smooth, np.mean(want), rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type='kto'"):
    preference.dpo_loss(policy, reference, 0.5, loss_type="kto")


def test_pairs_are_read_from_each_layout():
  """HH-RLHF: the prompt is the shared dialogue through the last "Assistant:"; UltraFeedback
  binarized: the last assistant message; TRL's pairs: the texts. Refused by name: dialogues
  that part before the last turn, a missing field."""
  hh = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a color.\n\nAssistant: Blue.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a color.\n\nAssistant: No.",
  }
  prompt, chosen, rejected, formatted = text.preference_pair(hh, "hh_rlhf")
  assert prompt.endswith("Name a color.\n\nAssistant:") and (chosen, rejected, formatted) == (" Blue.", " No.", True)
  messages = lambda answer: [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": answer}]
  uf = {"prompt": "Name a color.", "chosen": messages("Blue."), "rejected": messages("No."), "score_chosen": 8.0}
  assert text.preference_pair(uf, "ultrafeedback") == ("Name a color.", "Blue.", "No.", False)
  assert text.preference_pair({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs") == ("p", "a", "b", False)
  with pytest.raises(ValueError, match="do not share the dialogue"):
    text.preference_pair({**hh, "rejected": "\n\nHuman: Bye\n\nAssistant: No."}, "hh_rlhf", where="f.jsonl:3")
  with pytest.raises(ValueError, match=r"f.jsonl:2: the pairs layout needs .* missing \['rejected'\]"):
    text.preference_pair({"prompt": "p", "chosen": "a"}, "pairs", where="f.jsonl:2")


@pytest.fixture(scope="module")
def fixture():
  model, variables, _ = hf.load_causal_lm(FIXTURE)
  return model, variables, hf.Tokenizer.from_directory(FIXTURE)


PAIRS = [
  {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
  {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
  {"prompt": "Add two and two.", "chosen": "Four.", "rejected": "Five."},
  {"prompt": "Name an animal.", "chosen": "A cat.", "rejected": "A chair."},
]


def test_each_pair_is_two_instruction_examples_with_the_loss_on_each_response(fixture):
  _, _, tokenizer = fixture
  pairs = text.encode_preference_pairs(tokenizer, PAIRS, max_len=128)
  assert pairs["input_ids"].shape == (4, 2, 128) and pairs["mask"].tolist() == [1.0] * 4
  for i, record in enumerate(PAIRS):
    for j, field in enumerate(("chosen", "rejected")):
      one = text.encode_instruction(tokenizer, text.ALPACA.format(record["prompt"]), record[field], 128)
      for key in ("input_ids", "attention_mask", "loss_mask"):
        np.testing.assert_array_equal(pairs[key][i, j], one[key])


def test_the_reference_is_the_frozen_decoder_and_a_few_steps_learn_the_preference(fixture):
  """At the start (b = 0) the policy is the reference: every margin 0, the loss log 2, accuracy
  0 (ties count as wrong). The reference ignores the adapter and a merged residual (FedEx-LoRA's
  base_delta), which move the policy. Twenty Adam steps on the 4 pairs: loss below 0.3, every
  chosen response ahead."""
  model, variables, tokenizer = fixture
  batch = {k: jnp.asarray(v) for k, v in text.encode_preference_pairs(tokenizer, PAIRS, max_len=128).items()}
  task = preference.PreferenceLM(causal_lm.CausalLM(model, scale=2.0), beta=0.5)
  frozen = frozen_tree(variables)
  flat = {k: batch[k][:, 0] for k in ("input_ids", "attention_mask", "loss_mask")}
  targets = lora.find_targets(model, variables, flat["input_ids"], flat["attention_mask"])
  start = {"lora": lora.init_lora(jax.random.key(0), targets, rank=4)}
  loss, aux = jax.jit(task.loss_fn)(start, frozen, batch, None)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert float(aux["reward_accuracy"]) == 0.0
  plain = jax.jit(causal_lm.CausalLM(model, 2.0).sequence_logprob)(frozen, {"lora": {}}, flat)
  shifted = {**frozen, "base_delta": {path: 0.1 * jnp.ones(shape) for path, shape in targets.items()}}
  np.testing.assert_allclose(jax.jit(task.reference_logprobs)(shifted, batch)[:, 0], plain, rtol=1e-6)
  assert np.max(np.abs(jax.jit(task.pair_logprobs)(shifted, start, batch)[:, 0] - plain)) > 1e-2
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, state):
    (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, frozen, batch, None)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, state = start, optimizer.init(start)
  for _ in range(20):
    params, state, loss = step(params, state)
  assert float(loss) < 0.3
  correct, count = jax.jit(task.accuracy)(frozen, params, batch)
  assert (float(correct), float(count)) == (4.0, 4.0)
