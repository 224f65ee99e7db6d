"""MT-Bench-style evaluation of a text run (`python -m experiments.mt_bench`): two-turn answers in
FastChat's model-answer layout, and single-answer grading by a judge model.

MT-Bench (Zheng et al., 2023; FastChat's `llm_judge`) asks each model 80 two-turn questions in 8
categories and has a strong judge (GPT-4) rate each answer 1-10. Nothing here is downloaded: the
user gives FastChat's own files, `question.jsonl` ({"question_id", "category", "turns": [first,
second], "reference": [...]} for math / reasoning / coding) and, to grade here,
`judge_prompts.jsonl` ({"name", "type", "system_prompt", "prompt_template", "output_format"}:
"single-v1", "single-math-v1" and their "-multi-turn" versions) with a local judge checkpoint.

  answers: `OUT/model_answer/<model_id>.jsonl`, one line per question, FastChat's layout
           ({"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}],
           "tstamp"}), so FastChat's `gen_judgment.py` grades them with GPT-4 as published
           numbers were graded.
  judgments: `OUT/model_judgment/<judge_id>_single.jsonl` ({"question_id", "model", "judge":
           [judge_id, prompt name], "user_prompt", "judgment", "score", "turn", "tstamp"}): the
           judge's greedy text and the rating read from it ("[[7]]", else "[7]"; -1 where none).
  summary: per model, the mean rating of each turn, of both, and per category, over ratings
           other than -1 (as FastChat's `show_result.py` averages), and the count of -1s.

A judge smaller than GPT-4 rates differently: label such scores by their judge.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from experiments.runner.data.instructions import iter_records
from hyperlora_jax import text

NEEDS_REFERENCE = ("math", "reasoning", "coding")  # Graded against the question's reference answers.
JUDGE_PROMPTS = ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")


def read_questions(path: str, max_questions: int = 0) -> list[dict[str, Any]]:
  """MT-Bench questions from `path` (JSONL / JSON / parquet): [{"question_id", "category",
  "turns": [1 or 2 texts], "reference": [texts] or None}], the first `max_questions` (0: all).

  Raises:
    ValueError: a record without question_id or turns, naming the file and record.
  """
  questions = []
  for number, record in enumerate(iter_records(path), start=1):
    turns = record.get("turns")
    if "question_id" not in record or not isinstance(turns, list) or not 1 <= len(turns) <= 2:
      raise ValueError(f"{path} record {number}: not an MT-Bench question (question_id, turns: 1 or 2 texts)")
    if not all(isinstance(t, str) for t in turns):
      raise ValueError(f"{path} record {number}: turns must be texts")
    reference = record.get("reference")
    questions.append(
      {
        "question_id": record["question_id"],
        "category": str(record.get("category", "")),
        "turns": list(turns),
        "reference": list(reference) if reference else None,
      }
    )
    if max_questions and len(questions) == max_questions:
      break
  if not questions:
    raise ValueError(f"{path}: no questions")
  return questions


def read_judge_prompts(path: str) -> dict[str, dict[str, str]]:
  """FastChat's judge_prompts.jsonl: {name: {"system_prompt", "prompt_template"}} of the four
  single-answer prompts (`JUDGE_PROMPTS`).

  Raises:
    ValueError: one of them missing, naming it and the file.
  """
  prompts = {r.get("name"): r for r in iter_records(path)}
  missing = [name for name in JUDGE_PROMPTS if name not in prompts]
  if missing:
    raise ValueError(f"{path}: no judge prompt named {', '.join(missing)} (FastChat's judge_prompts.jsonl has them)")
  return {name: {k: str(prompts[name][k]) for k in ("system_prompt", "prompt_template")} for name in JUDGE_PROMPTS}


def answer_questions(
  complete: Callable[[list[str]], list[str]], questions: Sequence[dict], prompt_of: Callable[[list, list], str]
) -> list[list[str]]:
  """Each question's answers, turn by turn: every first turn at once, then every second turn
  with the conversation so far.

  Args:
    complete: prompts -> greedy continuations.
    questions: `read_questions`'s.
    prompt_of: (questions so far, answers so far) -> the prompt (`text.conversation_prompt`).
  Returns:
    [len(questions)] lists of 1 or 2 answers.
  """
  answers: list[list[str]] = [[] for _ in questions]
  for turn in range(max(len(q["turns"]) for q in questions)):
    asked = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
    prompts = [prompt_of(questions[i]["turns"][: turn + 1], answers[i]) for i in asked]
    for i, answer in zip(asked, complete(prompts)):
      answers[i].append(answer.strip())
  return answers


def judge_request(
  prompts: dict[str, dict[str, str]], question: dict, answers: list[str], turn: int
) -> tuple[str, str, str]:
  """(prompt name, system prompt, user prompt) grading turn `turn` (1 or 2) of `answers`: the
  reference-guided prompt for a question of `NEEDS_REFERENCE` with a reference, the multi-turn
  one for turn 2, FastChat's placeholders filled."""
  referenced = question["category"] in NEEDS_REFERENCE and question["reference"]
  name = ("single-math-v1" if referenced else "single-v1") + ("-multi-turn" if turn == 2 else "")
  reference = question["reference"] or []
  fields = {
    "question": question["turns"][0],
    "answer": answers[0],
    "question_1": question["turns"][0],
    "answer_1": answers[0],
    "question_2": question["turns"][-1],
    "answer_2": answers[-1],
    "ref_answer_1": reference[0] if reference else "",
    "ref_answer_2": reference[-1] if reference else "",
  }
  return name, prompts[name]["system_prompt"], prompts[name]["prompt_template"].format(**fields)


def summarize(judgments: Sequence[dict], categories: dict[Any, str]) -> dict[str, dict[str, Any]]:
  """Per model: the mean rating of turn 1, of turn 2, of both ("overall") and per category, over
  the ratings other than -1, and the count of -1s ("unrated"). None where a mean has no rating.

  Args:
    judgments: {"model", "question_id", "turn", "score"} records.
    categories: question_id -> category.
  """
  by_model: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  unrated: dict[str, int] = defaultdict(int)
  for j in judgments:
    if j["score"] == -1:
      unrated[j["model"]] += 1
      continue
    for key in (f"turn_{j['turn']}", "overall", f"category:{categories[j['question_id']]}"):
      by_model[j["model"]][key].append(float(j["score"]))
  summary = {}
  for model in sorted({j["model"] for j in judgments}):
    scores = by_model[model]
    summary[model] = {
      "turn_1": _mean(scores.get("turn_1")),
      "turn_2": _mean(scores.get("turn_2")),
      "overall": _mean(scores.get("overall")),
      "by_category": {k.split(":", 1)[1]: _mean(v) for k, v in sorted(scores.items()) if k.startswith("category:")},
      "unrated": unrated[model],
    }
  return summary


def _mean(values: list[float] | None) -> float | None:
  return float(np.mean(values)) if values else None


def answer_record(question: dict, model_id: str, answers: list[str], tstamp: float) -> dict:
  """One line of FastChat's model_answer file (its answer_id: a hash of model, question, answers)."""
  digest = hashlib.sha1(f"{model_id}\0{question['question_id']}\0{answers}".encode()).hexdigest()[:22]
  return {
    "question_id": question["question_id"],
    "answer_id": digest,
    "model_id": model_id,
    "choices": [{"index": 0, "turns": answers}],
    "tstamp": tstamp,
  }


def judgments_of(
  judge: Callable[[list[tuple[str, str]]], list[str]],
  judge_id: str,
  prompts: dict[str, dict[str, str]],
  questions: Sequence[dict],
  answers_by_model: dict[str, list[list[str]]],
  tstamp: float,
) -> list[dict]:
  """Every answer of every model graded, each turn apart (FastChat's single-answer grading).

  Args:
    judge: [(system, user)] -> the judge's texts.
    judge_id: the judge's name in the records.
    prompts: `read_judge_prompts`'s.
    questions: `read_questions`'s.
    answers_by_model: model id -> `answer_questions`'s answers.
  Returns:
    The judgment records (module docstring), models in order, then questions, then turns.
  """
  requests, keys = [], []
  for model, answers in answers_by_model.items():
    for question, given in zip(questions, answers):
      for turn in range(1, len(given) + 1):
        name, system, user = judge_request(prompts, question, given, turn)
        requests.append((system, user))
        keys.append((model, question["question_id"], turn, name, user))
  return [
    {
      "question_id": question_id,
      "model": model,
      "judge": [judge_id, name],
      "user_prompt": user,
      "judgment": judgment,
      "score": text.judge_rating(judgment),
      "turn": turn,
      "tstamp": tstamp,
    }
    for (model, question_id, turn, name, user), judgment in zip(keys, judge(requests))
  ]


def judge_from_checkpoint(
  directory: str, max_new_tokens: int, batch: int = 8
) -> Callable[[list[tuple[str, str]]], list[str]]:
  """A judge: a local Hugging Face chat model (`hf.load_causal_lm`) answering each (system,
  user) request greedily through its chat template (the system prompt folded into the user turn
  where the template refuses a system role, as Gemma's does), `batch` requests at a time.

  Raises:
    ValueError: a checkpoint without a chat template.
  """
  import jax
  import jinja2

  from experiments.runner.evaluation import in_left_padded_batches
  from hyperlora_jax.models import hf
  from hyperlora_jax.models.llama import generate

  checkpoint = hf.open_checkpoint(directory)
  model, variables, _ = hf.load_causal_lm(checkpoint)
  tokenizer = checkpoint.require_tokenizer()
  if tokenizer.chat_template is None:
    raise ValueError(f"--judge {directory}: its tokenizer has no chat template; a judge is a chat model")

  @jax.jit
  def tokens(ids, mask):
    apply = lambda *a: model.apply(variables, *a[:2], cache=a[2])
    return generate(apply, model, ids, mask, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)

  def rendered(system: str, user: str) -> str:
    try:
      messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
      return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:
      return tokenizer.apply_chat_template([{"role": "user", "content": f"{system}\n\n{user}"}], True)

  def decoded(ids, mask) -> list[str]:
    return [tokenizer.decode([t for t in row if t != tokenizer.pad_id]) for row in np.asarray(tokens(ids, mask))]

  def judge(requests: list[tuple[str, str]]) -> list[str]:
    encoded = [tokenizer.encode(rendered(*r), add_special_tokens=False) for r in requests]
    return in_left_padded_batches(encoded, batch, decoded)

  return judge
