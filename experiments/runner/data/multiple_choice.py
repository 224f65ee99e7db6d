"""Multiple-choice questions for a text run's evaluation (`mc.path`): a local file in MMLU's
layouts, or the embedded set.

  read_questions(path)   a file or directory:
                           *.csv      MMLU's own files (hendrycks/test data/test/<subject>_test.csv):
                                      no header; question, the choices, the answer letter; the
                                      subject from the file name (a directory: every such file)
                           *.jsonl / *.json / *.parquet   records {"question", "choices": [...],
                                      "answer": an index or a letter, "subject" (optional)}
                                      (the Hugging Face `cais/mmlu` layout), or records of the
                                      domain sets FlowerTune's leaderboard evaluates, told apart
                                      by their fields (`DOMAIN_LAYOUTS`):
                             MedQA       {"question", "options": {"A": ..., ...}, "answer_idx"}
                                         (bigbio / GBaker/MedQA-USMLE-4-options)
                             MedMCQA     {"question", "opa", "opb", "opc", "opd", "cop": 0-3,
                                         "subject_name"} (openlifescienceai/medmcqa)
                             PubMedQA    {"question", "context": {"contexts": [...]},
                                         "final_decision": yes / no / maybe} (pqa_labeled): the
                                         abstract then the question; choices yes, no, maybe
                             FPB         {"sentence", "label": 0 negative, 1 neutral, 2 positive}
                                         (financial_phrasebank)
                             TFNS        {"text", "label": 0 bearish, 1 bullish, 2 neutral}
                                         (zeroshot/twitter-financial-news-sentiment)
                             FiQA-SA     {"sentence", "sentiment_score": -1 ... 1, "format":
                                         "post" / "headline"} (FiQA 2018 task 1, as FinGPT's
                                         benchmark reads it: below -0.1 negative, below 0.1
                                         neutral, else positive; a post is a tweet)
                                      The sentiment sets ask FlowerTune's question ("What is the
                                      sentiment of this news?", FiQA's posts "... of this tweet?")
                                      with the labels as choices.
  embedded_questions()   the default set: no download (below)

Each question is {"question": str, "choices": [str, ...], "answer": int, "subject": str}.

The embedded set (`mc.path='embedded'`) asks the inverse of what the embedded records teach:
the records ask "What does `math.gcd` do?" and answer with its docstring's first paragraph; each
question here gives that paragraph and asks which of four functions of the same category
(`stdlib_docs.CATEGORIES`, the subject) it describes. Distractors come from the same category, so
the module name alone does not answer it; the right letter cycles through A-D (no position to
learn); chance is 25%. It is a fair probe of what federated tuning taught: the base decoder was
pretrained on the Language Reference, never on docstrings, and each client trains on its own
categories only, so a personalized model should gain most on its own subjects. It is not a test
of held-out generalization: the pairs are the training records' (turned around).
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any

from experiments.runner.data import instructions, stdlib_docs
from hyperlora_jax.text import CHOICE_LETTERS

EMBEDDED = "embedded"
NAME = re.compile(r"`([^`]+)`|function (\S+) does|what is (\S+) for")


def embedded_questions(choices: int = 4) -> list[dict[str, Any]]:
  """The embedded set: one question per embedded record whose category has `choices` distinct
  names, in the records' order (so a Python version gives the same set every time)."""
  records = stdlib_docs.instruction_records()
  names = [_name(r["instruction"]) for r in records]
  by_category: dict[str, list[str]] = {}
  for record, name in zip(records, names):
    by_category.setdefault(record["category"], []).append(name)
  questions = []
  for record, name in zip(records, names):
    pool = [n for n in dict.fromkeys(by_category[record["category"]]) if n != name]
    if len(pool) < choices - 1:
      continue
    index = len(questions)
    answer = index % choices
    start = (index * 7) % len(pool)  # Distractors spread over the category, deterministically.
    others = [pool[(start + j) % len(pool)] for j in range(choices - 1)]
    options = others[:answer] + [name] + others[answer:]
    questions.append(
      {
        "question": f"Which Python function is described as follows? {record['response']}",
        "choices": [f"`{o}`" for o in options],
        "answer": answer,
        "subject": record["category"],
      }
    )
  return questions


def _name(instruction: str) -> str:
  match = NAME.search(instruction)
  if match is None:
    raise ValueError(f"no function name in the embedded record {instruction!r}")
  return next(g for g in match.groups() if g)


def read_questions(path: str, max_questions: int = 0) -> list[dict[str, Any]]:
  """The questions of `path` (module docstring's layouts), or the embedded set for 'embedded';
  the first `max_questions` (0: all).

  Raises:
    FileNotFoundError: no such file or directory.
    ValueError: a record that is not a question, naming the file and the record or row.
  """
  if path == EMBEDDED:
    questions = embedded_questions()
  elif os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith((".csv", ".jsonl", ".json", ".parquet")))
    if not names:
      raise ValueError(f"mc.path: {path} holds no .csv, .jsonl, .json or .parquet files")
    questions = [q for name in names for q in _read_file(os.path.join(path, name))]
  elif os.path.isfile(path):
    questions = _read_file(path)
  else:
    raise FileNotFoundError(f"mc.path: {path} does not exist")
  return questions[:max_questions] if max_questions else questions


def _read_file(path: str) -> list[dict[str, Any]]:
  """A file's questions: MMLU's CSV, or records read as instruction files are
  (`instructions.iter_records`: bad JSON named by line and column)."""
  if path.endswith(".csv"):
    return _read_csv(path)
  return [_question(row, f"{path} record {number}") for number, row in enumerate(instructions.iter_records(path), 1)]


def _read_csv(path: str) -> list[dict[str, Any]]:
  """MMLU's CSV: question, choices..., answer letter; no header; subject = the file's name
  without `_test` / `_dev` / `_val`."""
  subject = re.sub(r"_(test|dev|val)$", "", os.path.splitext(os.path.basename(path))[0])
  questions = []
  with open(path, encoding="utf-8", newline="") as f:
    for number, row in enumerate(csv.reader(f), 1):
      if len(row) < 4:
        raise ValueError(
          f"{path} row {number}: question, 2+ choices and the answer letter expected, got {len(row)} fields"
        )
      question = {"question": row[0], "choices": row[1:-1], "answer": row[-1].strip(), "subject": subject}
      questions.append(_question(question, f"{path} row {number}"))
  return questions


SENTIMENT_QUESTION = "What is the sentiment of this news?"
# Field sets that tell a domain set's records apart, and the reader that turns one into MMLU's layout.
DOMAIN_LAYOUTS = {  # The first whose fields a record has (FiQA's before FPB's: both have "sentence").
  "medqa": ("options", "answer_idx"),
  "medmcqa": ("opa", "opb", "opc", "opd", "cop"),
  "pubmedqa": ("question", "final_decision"),
  "fiqa": ("sentence", "sentiment_score"),
  "fpb": ("sentence", "label"),
  "tfns": ("text", "label"),
}


def domain_layout(row: dict) -> str | None:
  """The domain set a record is in (`DOMAIN_LAYOUTS`, by its fields), or None (MMLU's layout).

  Args:
    row: one record.
  Returns:
    "medqa", "medmcqa", "pubmedqa", "fiqa", "fpb", "tfns" or None.
  """
  if "choices" in row:
    return None
  return next((name for name, fields in DOMAIN_LAYOUTS.items() if all(f in row for f in fields)), None)


def _from_domain_layout(row: dict, layout: str, where: str) -> dict[str, Any]:
  """A domain set's record in MMLU's layout ({"question", "choices", "answer", "subject"})."""
  if layout == "medqa":
    options = row["options"]
    if isinstance(options, list):  # bigbio's [{"key": "A", "value": ...}, ...]
      options = {o.get("key"): o.get("value") for o in options if isinstance(o, dict)}
    if not isinstance(options, dict) or not options:
      raise ValueError(f"{where}: 'options' must map letters to answers")
    letters = sorted(options)
    answer = row["answer_idx"]
    return {
      "question": row["question"],
      "choices": [options[k] for k in letters],
      "answer": letters.index(answer) if answer in letters else answer,
      "subject": row.get("meta_info") or "medqa",
    }
  if layout == "medmcqa":
    return {
      "question": row["question"],
      "choices": [row[k] for k in ("opa", "opb", "opc", "opd")],
      "answer": row["cop"],
      "subject": row.get("subject_name") or "medmcqa",
    }
  if layout == "pubmedqa":
    context = row.get("context") or {}
    contexts = context.get("contexts", []) if isinstance(context, dict) else [str(context)]
    decisions = ["yes", "no", "maybe"]
    decision = str(row["final_decision"]).strip().lower()
    return {
      "question": "\n".join([*map(str, contexts), row["question"]]),
      "choices": decisions,
      "answer": decisions.index(decision) if decision in decisions else row["final_decision"],
      "subject": "pubmedqa",
    }
  if layout == "fiqa":
    score = float(row["sentiment_score"])
    tweet = str(row.get("format", "")).lower() == "post"
    return {
      "question": f"What is the sentiment of this {'tweet' if tweet else 'news'}? {row['sentence']}",
      "choices": ["negative", "neutral", "positive"],
      "answer": 0 if score < -0.1 else 1 if score < 0.1 else 2,  # FinGPT's thresholds.
      "subject": "fiqa",
    }
  labels = ["negative", "neutral", "positive"] if layout == "fpb" else ["bearish", "bullish", "neutral"]
  return {
    "question": f"{SENTIMENT_QUESTION} {row['sentence' if layout == 'fpb' else 'text']}",
    "choices": labels,
    "answer": row["label"],
    "subject": layout,
  }


def _question(row: Any, where: str) -> dict[str, Any]:
  """A checked question from a record ({"question", "choices", "answer": index or letter,
  "subject"}, or a domain set's record: `DOMAIN_LAYOUTS`)."""
  layout = domain_layout(row) if isinstance(row, dict) else None
  if layout is not None:
    where = f"{where} ({layout})"
    row = _from_domain_layout(row, layout, where)
  if not isinstance(row, dict) or not isinstance(row.get("question"), str):
    raise ValueError(f"{where}: a record with a 'question' string expected")
  choices = row.get("choices")
  if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
    raise ValueError(f"{where}: 'choices' must list 2 to {len(CHOICE_LETTERS)} answers")
  answer = row.get("answer")
  if isinstance(answer, str) and len(answer) == 1 and answer.upper() in CHOICE_LETTERS:
    answer = CHOICE_LETTERS.index(answer.upper())
  if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
    raise ValueError(f"{where}: 'answer' must be a choice's index or letter, got {row.get('answer')!r}")
  return {
    "question": row["question"],
    "choices": [str(c) for c in choices],
    "answer": answer,
    "subject": str(row.get("subject") or "general"),
  }
