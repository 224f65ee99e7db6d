"""MT-Bench-style evaluation (`experiments/runner/mt_bench.py`, `python -m experiments.mt_bench`):
two-turn answers in FastChat's layout, single-answer grading by a judge, the summary."""

import json
import os

import pytest

from experiments.runner import mt_bench
from hyperlora_jax import text
from hyperlora_jax.models import hf

from tests.repo_paths import FIXTURES

QUESTIONS = [
  {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
  {
    "question_id": 111,
    "category": "math",
    "turns": ["What is 12 + 30?", "And 42 * 2?"],
    "reference": ["42", "84"],
  },
  {"question_id": 130, "category": "coding", "turns": ["Name a sorting algorithm."]},  # One turn, no reference.
]
# The four single-answer prompts in FastChat's layout and placeholders (wording of this test).
JUDGE_PROMPTS = [
  {"name": "single-v1", "type": "single", "system_prompt": "Rate it.", "prompt_template": "Q: {question}\nA: {answer}"},
  {
    "name": "single-math-v1",
    "type": "single",
    "system_prompt": "Rate it against the reference.",
    "prompt_template": "Q: {question}\nREF: {ref_answer_1}\nA: {answer}",
  },
  {
    "name": "single-v1-multi-turn",
    "type": "single",
    "system_prompt": "Rate the second answer.",
    "prompt_template": "Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nA2: {answer_2}",
  },
  {
    "name": "single-math-v1-multi-turn",
    "type": "single",
    "system_prompt": "Rate the second answer against the references.",
    "prompt_template": "Q1: {question_1}\nR1: {ref_answer_1}\nQ2: {question_2}\nR2: {ref_answer_2}\nA2: {answer_2}",
  },
]


def _files(tmp_path):
  questions, prompts = tmp_path / "question.jsonl", tmp_path / "judge_prompts.jsonl"
  questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
  prompts.write_text("".join(json.dumps(p) + "\n" for p in JUDGE_PROMPTS))
  return str(questions), str(prompts)


def test_a_later_turn_follows_the_earlier_answer_in_either_prompt_format():
  """Alpaca: the first prompt, the answer, then the template's follow-up block, by hand; chat:
  the template's user / assistant / user messages and the generation prompt (the fixture Llama's
  template writes each as <|role|>\\ncontent<eos>)."""
  alpaca = text.conversation_prompt(["Q1", "Q2"], ["A1"])
  assert alpaca == text.ALPACA.format("Q1") + "A1" + "\n\n### Instruction:\nQ2\n\n### Response:\n"
  assert text.conversation_prompt(["Q1"], []) == text.ALPACA.format("Q1")
  tokenizer = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_llama"))
  chat = text.conversation_prompt(["Q1", "Q2"], ["A1"], tokenizer, chat=True)
  assert (
    chat
    == "<|begin_of_text|><|user|>\nQ1<|end_of_text|>\n<|assistant|>\nA1<|end_of_text|>\n<|user|>\nQ2<|end_of_text|>\n<|assistant|>\n"
  )
  with pytest.raises(ValueError, match="2 questions need 1 answers, got 0"):
    text.conversation_prompt(["Q1", "Q2"], [])
  with pytest.raises(ValueError, match="no follow_up"):
    text.conversation_prompt(["Q1", "Q2"], ["A1"], template=text.PromptTemplate("{instruction}", "{instruction}"))


def test_ratings_are_read_as_mt_bench_reads_them():
  assert text.judge_rating("Good answer. Rating: [[7]]") == 7.0
  assert text.judge_rating("[[8.5]] then [[2]]") == 8.5  # The first.
  assert text.judge_rating("Rating: [6]") == 6.0  # The single-bracket fallback.
  assert text.judge_rating("no rating here") == -1.0


def test_questions_and_judge_prompts_are_read_and_checked(tmp_path):
  questions, prompts = _files(tmp_path)
  read = mt_bench.read_questions(questions)
  assert [q["question_id"] for q in read] == [81, 111, 130] and read[1]["reference"] == ["42", "84"]
  assert read[2]["reference"] is None and len(mt_bench.read_questions(questions, max_questions=2)) == 2
  assert set(mt_bench.read_judge_prompts(prompts)) == set(mt_bench.JUDGE_PROMPTS)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question_id": 1, "turns": "text"}) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl record 2: not an MT-Bench question"):
    mt_bench.read_questions(str(bad))
  bad.write_text(json.dumps(JUDGE_PROMPTS[0]) + "\n")
  with pytest.raises(
    ValueError, match="no judge prompt named single-v1-multi-turn, single-math-v1, single-math-v1-multi-turn"
  ):
    mt_bench.read_judge_prompts(str(bad))


def test_answers_go_turn_by_turn_and_each_turn_is_graded_with_its_prompt(tmp_path):
  """A fake model answers "answer to <question>", a fake judge rates by the prompt it is given
  (8 the writing's first turn, "[5]" its second, none the math question's, 3 the coding one):
  second-turn prompts hold the first answers; math gets the reference-guided prompts with its
  references; the summary's means and unrated count are the hand count."""
  questions = mt_bench.read_questions(_files(tmp_path)[0])
  prompts = mt_bench.read_judge_prompts(_files(tmp_path)[1])
  asked = []

  def complete(batch):
    asked.append(batch)
    return [f" answer to {p.rsplit('### Instruction:', 1)[1].split()[0]} " for p in batch]

  answers = mt_bench.answer_questions(complete, questions, lambda q, a: text.conversation_prompt(q, a))
  assert [len(b) for b in asked] == [3, 2]  # Every first turn at once, then the two second turns.
  assert answers[0] == ["answer to Write", "answer to Now"] and "answer to Write" in asked[1][0]

  def judge(requests):
    rated = {"Rate it.": "Rating: [[8]]", "Rate the second answer.": "Rating: [5]"}
    return ["[[3]]" if "sorting" in user else rated.get(system, "no rating") for system, user in requests]

  judgments = mt_bench.judgments_of(judge, "fake", prompts, questions, {"m": answers}, 0.0)
  assert [(j["question_id"], j["turn"], j["judge"][1]) for j in judgments] == [
    (81, 1, "single-v1"),
    (81, 2, "single-v1-multi-turn"),
    (111, 1, "single-math-v1"),
    (111, 2, "single-math-v1-multi-turn"),
    (130, 1, "single-v1"),  # Coding without a reference: the general prompt.
  ]
  assert "REF: 42" in judgments[2]["user_prompt"] and "R2: 84" in judgments[3]["user_prompt"]
  assert "A1: answer to Write" in judgments[1]["user_prompt"] and "A2: answer to Now" in judgments[1]["user_prompt"]
  summary = mt_bench.summarize(judgments, {q["question_id"]: q["category"] for q in questions})["m"]
  # Turn 1: 8 (writing), 3 (coding); turn 2: 5; math unrated twice.
  assert summary == {
    "turn_1": 5.5,
    "turn_2": 5.0,
    "overall": pytest.approx(16 / 3),
    "by_category": {"coding": 3.0, "writing": 6.5},
    "unrated": 2,
  }


def test_the_cli_answers_and_grades_a_runs_models_with_a_local_judge(tmp_path, cache_dirs):
  """One FedIT round on the fixture Llama, then MT-Bench with the fixture Llama (its chat
  template) as judge: FastChat-layout answer files for the global model and client 0, a
  judgment per model, question and turn whose prompt holds that model's answers, and a summary
  whose unrated count is the judgments without a rating (the random judge writes few)."""
  from experiments import mt_bench as cli
  from experiments.runner.train import train_and_evaluate
  from tests.end_to_end.test_text_runs import _config

  config = _config(tmp_path, cache_dirs, rounds=1)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir, progress=False)
  questions, prompts = _files(tmp_path)
  out = tmp_path / "bench"
  args = ["--workdir", workdir, "--questions", questions, "--clients", "0", "--max_new_tokens", "6", "--out", str(out)]
  args += ["--judge", os.path.join(FIXTURES, "hf_llama"), "--judge_prompts", prompts, "--judge_max_new_tokens", "8"]
  cli.main(args)
  answers = {}
  for model in ("run-global", "run-client-0"):
    lines = [json.loads(line) for line in (out / "model_answer" / f"{model}.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [81, 111, 130] and all(r["model_id"] == model for r in lines)
    assert [len(r["choices"][0]["turns"]) for r in lines] == [2, 2, 1]
    answers[model] = {r["question_id"]: r["choices"][0]["turns"] for r in lines}
  judgments = [json.loads(line) for line in (out / "model_judgment" / "hf_llama_single.jsonl").read_text().splitlines()]
  assert len(judgments) == 2 * 5
  for j in judgments:
    assert answers[j["model"]][j["question_id"]][j["turn"] - 1] in j["user_prompt"]
    assert j["score"] == text.judge_rating(j["judgment"])
  summary = json.loads((out / "summary.json").read_text())["models"]
  for model in answers:
    assert summary[model]["unrated"] == sum(j["score"] == -1 for j in judgments if j["model"] == model)
  with pytest.raises(SystemExit):
    cli.main(["--workdir", workdir, "--questions", questions, "--judge", os.path.join(FIXTURES, "hf_llama")])
