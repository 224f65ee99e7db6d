"""Multiple-choice evaluation: MMLU's prompt and letter scoring (`text.encode_multiple_choice`,
`CausalLM.multiple_choice_correct`), the question files (`experiments/runner/data/multiple_choice.py`)
and a text run that reports it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.runner.data import multiple_choice, stdlib_docs
from hyperlora_jax import text
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import DecoderLM
from hyperlora_jax.tasks import causal_lm
from hyperlora_jax.tasks.common import frozen_tree

from tests.repo_paths import FIXTURES

QUESTIONS = [
  {
    "question": "Which is a color?",
    "choices": ["Blue", "Seven", "Paris", "Run"],
    "answer": 0,
    "subject": "high_school_art",
  },
  {"question": "2 + 3 = ?", "choices": ["4", "5", "6"], "answer": 1, "subject": "math"},
]


@pytest.fixture(scope="module")
def tokenizer():
  return hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))


def test_the_prompt_is_mmlus_and_only_the_letter_is_scored(tokenizer):
  """The zero-shot MMLU prompt, word for word; per choice, the scored tokens decode to its
  letter; a 3-choice question beside a 4-choice one has its fourth choice masked."""
  assert text.multiple_choice_prompt(QUESTIONS[0]) == (
    "The following are multiple choice questions (with answers) about high school art.\n\n"
    "Which is a color?\nA. Blue\nB. Seven\nC. Paris\nD. Run\nAnswer:"
  )
  block = text.encode_multiple_choice(tokenizer, QUESTIONS, max_len=64)
  assert block["input_ids"].shape == (2, 4, 64) and block["answer"].tolist() == [0, 1]
  np.testing.assert_array_equal(block["choice_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
  for q, question in enumerate(QUESTIONS):
    for k in range(len(question["choices"])):
      ids, scored = block["input_ids"][q, k], block["loss_mask"][q, k].astype(bool)
      assert tokenizer.decode(ids[scored]).strip() == "ABCD"[k]
      real = block["attention_mask"][q, k].astype(bool)
      assert tokenizer.decode(ids[real]).endswith(f"Answer: {'ABCD'[k]}")
  short = text.encode_multiple_choice(tokenizer, QUESTIONS[:1], max_len=8)  # The prompt's start is cut.
  assert short["loss_mask"][0, 2, -1] == 1 and tokenizer.decode(short["input_ids"][0, 2]).endswith("Answer: C")
  with pytest.raises(ValueError, match="question 0: 1 choices"):
    text.encode_multiple_choice(tokenizer, [{"question": "?", "choices": ["x"], "answer": 0}], 32)


@pytest.mark.parametrize("tokenizer_dir", ["hf_llama", "hf_llama2_tokenizer"])
def test_the_prediction_is_the_likeliest_letter_by_an_independent_count(tokenizer_dir):
  """On a random decoder: each choice's score recomputed from the plain logits (log-softmax at
  the position before each scored token); the predicted choice is their argmax, so the answer
  set to it scores 1 and any other 0. hf_llama's tokenizer writes " A" as a space then the
  letter (the choices differ in their last token: one forward pass a question, `letter_ids`);
  the SentencePiece one tokenizes the prompt's end differently per letter (K passes)."""
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, tokenizer_dir))
  model = DecoderLM(vocab_size=tokenizer.vocab_size, width=16, depth=1, num_heads=2, mlp_dim=24)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  task = causal_lm.CausalLM(model, scale=1.0)
  block = text.encode_multiple_choice(tokenizer, QUESTIONS, max_len=64)
  apply = jax.jit(model.apply)  # The plain logits, one compile for the 8 sequences.
  scores = np.full((2, 4), -np.inf)
  for q in range(2):
    for k in range(len(QUESTIONS[q]["choices"])):
      ids = block["input_ids"][q, k]
      logits = np.asarray(apply(variables, ids[None], block["attention_mask"][q, k][None]))[0]
      logprobs = (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
        - logits.max(-1, keepdims=True)
      )
      scores[q, k] = sum(logprobs[t - 1, ids[t]] for t in np.flatnonzero(block["loss_mask"][q, k]))
  predicted = scores.argmax(axis=1)
  frozen, trainable = frozen_tree(variables), {"lora": {}}
  got = jax.jit(task.sequence_logprob)(
    frozen, trainable, {k: block[k].reshape(8, 64) for k in ("input_ids", "attention_mask", "loss_mask")}
  )
  np.testing.assert_allclose(
    np.asarray(got).reshape(2, 4)[block["choice_mask"] > 0], scores[block["choice_mask"] > 0], rtol=1e-4
  )
  assert ("letter_ids" in block) == (tokenizer_dir == "hf_llama")
  real = block["choice_mask"] > 0
  np.testing.assert_allclose(
    np.asarray(jax.jit(task.multiple_choice_scores)(frozen, trainable, block))[real], scores[real], rtol=1e-4
  )
  right = {**block, "answer": predicted.astype(np.int32)}
  wrong = {**block, "answer": ((predicted + 1) % 3).astype(np.int32)}
  correct = jax.jit(task.multiple_choice_correct)
  np.testing.assert_array_equal(correct(frozen, trainable, right), [1.0, 1.0])
  np.testing.assert_array_equal(correct(frozen, trainable, wrong), [0.0, 0.0])


def test_mmlu_files_are_read_in_each_layout(tmp_path):
  """MMLU's CSVs (no header, the answer a letter, the subject from the file name; a directory of
  them), `cais/mmlu`-style JSONL (index answers) and parquet; bad records named by file and number."""
  directory = tmp_path / "test"
  directory.mkdir()
  (directory / "astronomy_test.csv").write_text('"What is the Sun?","A star","A planet","A moon","A comet",A\n')
  (directory / "virology_test.csv").write_text("Virus?,yes,no,maybe,never,B\nSecond?,a,b,c,d,D\n")
  questions = multiple_choice.read_questions(str(directory))
  assert [(q["subject"], q["answer"]) for q in questions] == [("astronomy", 0), ("virology", 1), ("virology", 3)]
  assert questions[0]["choices"] == ["A star", "A planet", "A moon", "A comet"]
  jsonl = tmp_path / "mmlu.jsonl"
  jsonl.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
  assert multiple_choice.read_questions(str(jsonl)) == QUESTIONS
  assert multiple_choice.read_questions(str(jsonl), max_questions=1) == QUESTIONS[:1]
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(
    pa.Table.from_pylist([{**q, "answer": "ABCD"[q["answer"]]} for q in QUESTIONS]), tmp_path / "m.parquet"
  )
  assert multiple_choice.read_questions(str(tmp_path / "m.parquet")) == QUESTIONS
  jsonl.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({**QUESTIONS[1], "answer": 5}) + "\n")
  with pytest.raises(ValueError, match="mmlu.jsonl record 2: 'answer' must be a choice's index or letter, got 5"):
    multiple_choice.read_questions(str(jsonl))
  with pytest.raises(FileNotFoundError, match="mc.path"):
    multiple_choice.read_questions(str(tmp_path / "missing.jsonl"))


def test_the_domain_sets_flowertune_evaluates_are_read_as_multiple_choice(tmp_path):
  """One record each of MedQA, MedMCQA, PubMedQA, Financial PhraseBank, TFNS and FiQA-SA (three:
  a score at each of FinGPT's thresholds, -0.1 and 0.1, and a post) in their Hugging Face layouts,
  in one JSONL: each as MMLU's {question, choices, answer, subject}, by hand. A decision outside
  yes / no / maybe is named."""
  records = [
    {"question": "Drug?", "options": {"B": "Aspirin", "A": "Ibuprofen", "C": "None"}, "answer_idx": "B"},
    {
      "question": "Bone?",
      "opa": "Femur",
      "opb": "Ulna",
      "opc": "Rib",
      "opd": "Skull",
      "cop": 2,
      "subject_name": "Anatomy",
    },
    {"question": "Does it work?", "context": {"contexts": ["Background.", "Results."]}, "final_decision": "maybe"},
    {"sentence": "Profit fell.", "label": 0},
    {"text": "$XYZ to the moon", "label": 1},
    {"sentence": "Shares slip", "sentiment_score": -0.1, "format": "headline", "label": 0},
    {"sentence": "Flat day", "sentiment_score": 0.0999, "format": "headline"},
    {"sentence": "$ABC rallies", "sentiment_score": 0.1, "format": "post"},
  ]
  path = tmp_path / "domains.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  got = multiple_choice.read_questions(str(path))
  assert got == [
    {"question": "Drug?", "choices": ["Ibuprofen", "Aspirin", "None"], "answer": 1, "subject": "medqa"},
    {"question": "Bone?", "choices": ["Femur", "Ulna", "Rib", "Skull"], "answer": 2, "subject": "Anatomy"},
    {
      "question": "Background.\nResults.\nDoes it work?",
      "choices": ["yes", "no", "maybe"],
      "answer": 2,
      "subject": "pubmedqa",
    },
    {
      "question": "What is the sentiment of this news? Profit fell.",
      "choices": ["negative", "neutral", "positive"],
      "answer": 0,
      "subject": "fpb",
    },
    {
      "question": "What is the sentiment of this news? $XYZ to the moon",
      "choices": ["bearish", "bullish", "neutral"],
      "answer": 1,
      "subject": "tfns",
    },
    {
      "question": "What is the sentiment of this news? Shares slip",
      "choices": ["negative", "neutral", "positive"],
      "answer": 1,  # -0.1 is not below -0.1: neutral (its "label" field is not FiQA's score).
      "subject": "fiqa",
    },
    {
      "question": "What is the sentiment of this news? Flat day",
      "choices": ["negative", "neutral", "positive"],
      "answer": 1,
      "subject": "fiqa",
    },
    {
      "question": "What is the sentiment of this tweet? $ABC rallies",
      "choices": ["negative", "neutral", "positive"],
      "answer": 2,
      "subject": "fiqa",
    },
  ]
  path.write_text(json.dumps({"question": "Q?", "context": {"contexts": []}, "final_decision": "perhaps"}) + "\n")
  with pytest.raises(ValueError, match=r"domains.jsonl record 1 \(pubmedqa\): 'answer' must be"):
    multiple_choice.read_questions(str(path))


def test_the_embedded_set_is_balanced_and_asks_the_records_backwards():
  """One question per record with 3+ other names in its category: four distinct choices, the
  right one the record's function (its docstring is the question), answers spread evenly over
  A-D, subjects the 13 categories."""
  questions = multiple_choice.embedded_questions()
  records = {r["response"]: r for r in stdlib_docs.instruction_records()}
  assert len(questions) > 400 and {q["subject"] for q in questions} == set(stdlib_docs.CATEGORIES)
  counts = np.bincount([q["answer"] for q in questions], minlength=4)
  assert counts.max() - counts.min() <= 1
  for q in questions:
    assert len(set(q["choices"])) == 4
    record = records[q["question"].split("? ", 1)[1]]
    assert q["choices"][q["answer"]].strip("`") in record["instruction"] and record["category"] == q["subject"]


def test_a_text_run_reports_multiple_choice_accuracy_at_its_rounds(tmp_path, cache_dirs):
  """`mc=embedded` (24 questions) at the last round on the fixture Llama with FedSA-LoRA (clients
  keep their B: personalized models differ): the record has the global and personalized
  accuracies and the global one per subject, recounted from the restored state with the task's
  own scoring, question by question; the round before has none (`mc.every=0`)."""
  from configs import instruction_tuning
  from experiments.runner import workdir as workdir_lib
  from experiments.runner.train import train_and_evaluate
  from hyperlora_jax.tasks.common import apply_base_delta

  checkpoint = os.path.join(FIXTURES, "hf_llama")
  config = instruction_tuning.get_config(f"smoke,method=fedsa_lora,rounds=2,checkpoint={checkpoint},mc=embedded")
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  config.mc.max_questions = 24
  workdir = str(tmp_path / "run")
  records = train_and_evaluate(config, workdir, progress=False, log=lambda _: None)["records"]
  assert "mc_accuracy_global" not in records[0]
  record = records[-1]
  assert 0.0 <= record["mc_accuracy_personalized_worst"] <= record["mc_accuracy_personalized_mean"] <= 1.0
  assert set(record["mc_accuracy_global_by_subject"]) <= set(stdlib_docs.CATEGORIES)
  exp, state, _ = workdir_lib.restore_run(workdir_lib.recorded_config(workdir), workdir)
  block = {k: v for k, v in exp.multiple_choice.items() if k != "subject"}
  assert block["answer"].shape == (24,)
  frozen = apply_base_delta(exp.frozen(), state.base_delta)
  global_model = exp.fed_round.global_params(state)
  hits = [
    float(exp.task.multiple_choice_correct(frozen, global_model, jax.tree.map(lambda x: x[i : i + 1], block))[0])
    for i in range(24)
  ]
  assert records[-1]["mc_accuracy_global"] == pytest.approx(np.mean(hits), abs=1e-6)


def test_rouge_l_and_exact_match_by_hand_counts():
  """ROUGE-L F1 from the longest common subsequence: "the cat sat on the mat" against "the cat
  lay on a mat": LCS "the cat on mat" (4 of 6 tokens each): P = R = F = 2/3; exact match after
  SQuAD's normalization (case, punctuation, articles)."""
  assert text.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
  assert text.rouge_l("A B C", "c b a") == pytest.approx(1 / 3)  # One token in order.
  assert text.rouge_l("", "x") == 0.0 and text.rouge_l("x y", "z") == 0.0
  assert text.exact_match("The Blue.", "blue") == 1.0 and text.exact_match("blue sky", "blue") == 0.0


def test_prompts_and_references_split_encoded_examples(tokenizer):
  """The prompt is everything before the first loss token (left-padded), the reference the loss
  tokens without end-of-text: decoded, the record's texts."""
  records = [
    {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "a"},
    {"instruction": "Sum 2 and 3, please, now.", "context": "", "response": "5", "category": "b"},
  ]
  batch = text.encode_instructions(tokenizer, records, max_len=192, layout="dolly")
  ids, mask, references = text.prompts_and_references(batch, tokenizer.eos_id)
  assert ids.shape == mask.shape and mask.sum(axis=1).min() < mask.shape[1] and mask[:, -1].tolist() == [1, 1]
  assert [tokenizer.decode(r).strip() for r in references] == ["Blue.", "5"]
  for row, record in zip(range(2), records):
    prompt = text.prompt_and_response(record, "dolly")[0]
    assert tokenizer.decode(ids[row][mask[row] > 0]).strip() == prompt.strip()


def test_a_text_run_scores_generated_responses_for_the_global_and_personal_models(tmp_path, cache_dirs):
  """`gen=2` on the fixture Llama: exact match and ROUGE-L in [0, 1] at the last round, the
  global one recounted here from the restored state with `generate` and the same scoring."""
  from configs import instruction_tuning
  from experiments.runner import workdir as workdir_lib
  from experiments.runner.train import train_and_evaluate
  from hyperlora_jax import lora
  from hyperlora_jax.models.llama import generate

  checkpoint = os.path.join(FIXTURES, "hf_llama")
  config = instruction_tuning.get_config(f"smoke,method=fedit,rounds=1,checkpoint={checkpoint},gen=2")
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  config.gen.max_new_tokens = 6
  workdir = str(tmp_path / "run")
  record = train_and_evaluate(config, workdir, progress=False, log=lambda _: None)["records"][-1]
  for key in ("gen_exact_match_global", "gen_rouge_l_global", "gen_rouge_l_personalized_worst"):
    assert 0.0 <= record[key] <= 1.0
  exp, state, _ = workdir_lib.restore_run(workdir_lib.recorded_config(workdir), workdir)
  tokenizer, pool = exp.tokenizer, exp.data.test_pool
  parts = [[i for i in p if pool.tokens["loss_mask"][i].any()][:2] for p in exp.data.test_parts]
  parts = [p for p in parts if p]
  rouge = []
  variables, adapter = exp.frozen()["variables"], exp.fed_round.global_params(state)["lora"]
  model = exp.task.model
  greedy = jax.jit(
    lambda ids, mask: generate(
      lambda *a: lora.apply(model, variables, adapter, *a[:2], cache=a[2], scale=exp.task.scale),
      model,
      ids,
      mask,
      6,
      tokenizer.eos_id,
      tokenizer.pad_id,
    )
  )
  for part in parts:
    batch = {k: pool.tokens[k][np.asarray(part)] for k in ("input_ids", "loss_mask")}
    ids, mask, references = text.prompts_and_references(batch, tokenizer.eos_id)
    tokens = greedy(jnp.asarray(ids), jnp.asarray(mask))
    for row, reference in zip(np.asarray(tokens), references):
      prediction = tokenizer.decode([t for t in row if t != tokenizer.pad_id])
      rouge.append(text.rouge_l(prediction, tokenizer.decode(reference)))
  assert record["gen_rouge_l_global"] == pytest.approx(np.mean(rouge), abs=1e-9)
