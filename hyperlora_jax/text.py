"""Instruction examples as fixed-shape token arrays with the loss on the response only.

    prompt, response = text.prompt_and_response(record, layout="dolly")   # Alpaca's template
    example = text.encode_instruction(tokenizer, prompt, response, max_len=256)
    batch = text.encode_instructions(tokenizer, records, max_len=256, layout="alpaca")

A record is a dict in one of the `LAYOUTS` (Alpaca: instruction / input / output; Dolly-15k:
instruction / context / response / category). `prompt_and_response` writes it with the Alpaca
template (`ALPACA`, the one FedIT / Shepherd and OpenFedLLM use for both datasets) or, with
`chat=True` in `encode_instructions`, the tokenizer's own chat template.

The prompt and the response are tokenized as one text, as Alpaca and OpenFedLLM train: a
tokenizer that marks a word start (SentencePiece's '▁', Llama 2 / TinyLlama) would otherwise
start every response with a token it never sees in the joined text. The loss starts at the
first token that covers response characters (`Tokenizer.encode_with_offsets`).

An encoded example is three int32 arrays of length `max_len` (T):
  input_ids       prompt tokens (begin-of-text first, as the tokenizer adds it), response
                  tokens, end-of-text, then padding (`tokenizer.pad_id`)
  attention_mask  1 on the real tokens
  loss_mask       1 on the tokens the loss predicts: the response and its end-of-text
Sequences longer than T are cut at T (the response's end goes first; an example whose prompt
fills T has no loss tokens: `encode_instructions` reports how many). Fixed shapes mean one
compile per run (`tasks.causal_lm` reads these arrays).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import string
from typing import Any
from collections.abc import Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A prompt with `{instruction}` (and `{input}` when the record has one); `follow_up`, the
  block a later turn of a conversation adds after the previous answer ("" for none)."""

  with_input: str
  without_input: str
  follow_up: str = ""

  def format(self, instruction: str, context: str = "") -> str:
    """The prompt of one record.

    Args:
      instruction: the record's instruction.
      context: its context ("" for none: the template without input).
    Returns:
      The prompt text.
    """
    if context:
      return self.with_input.format(instruction=instruction, input=context)
    return self.without_input.format(instruction=instruction)


ALPACA = PromptTemplate(
  with_input=(
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
  ),
  without_input=(
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
  ),
  follow_up="\n\n### Instruction:\n{instruction}\n\n### Response:\n",
)
# Field names per dataset layout: instruction, context (optional), response, and the field
# clients are usually partitioned by.
LAYOUTS: dict[str, dict[str, str | None]] = {
  "alpaca": {"instruction": "instruction", "input": "input", "response": "output", "group": None},
  "dolly": {"instruction": "instruction", "input": "context", "response": "response", "group": "category"},
}


def _fields(layout: str) -> dict:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; known: {sorted(LAYOUTS)}")
  return LAYOUTS[layout]


def check_record(record: Mapping[str, Any], layout: str, where: str = "record") -> None:
  """Raises ValueError naming the missing or non-text field of a record.

  Args:
    record: one instruction record.
    layout: "alpaca" or "dolly" (`LAYOUTS`).
    where: how the error names the record (file and line).
  """
  fields = _fields(layout)
  for role in ("instruction", "response"):
    name = fields[role]
    if name not in record:
      raise ValueError(
        f"{where}: the {layout} layout needs a text field {name!r} ({role}); got fields {sorted(record)}"
      )
    if not isinstance(record[name], str):
      raise ValueError(
        f"{where}: field {name!r} ({role}) is a {type(record[name]).__name__} ({str(record[name])[:40]!r}), not text"
      )
  context = fields["input"]
  if record.get(context) is not None and not isinstance(record[context], str):
    raise ValueError(f"{where}: field {context!r} (input) is a {type(record[context]).__name__}, not text")


def prompt_and_response(
  record: Mapping[str, Any], layout: str = "alpaca", template: PromptTemplate = ALPACA
) -> tuple[str, str]:
  """(prompt text, response text) of one record in `layout`, with `template`.

  Args:
    record: one instruction record.
    layout: "alpaca" or "dolly".
    template: the prompt template.
  Returns:
    (prompt, response) texts.
  """
  fields = _fields(layout)
  check_record(record, layout)
  context = record.get(fields["input"]) or ""
  return template.format(record[fields["instruction"]], context), record[fields["response"]]


def chat_prompt(tokenizer, record: Mapping[str, Any], layout: str = "alpaca") -> tuple[str, str]:
  """(prompt, response) of one record with the tokenizer's chat template: one user turn
  (instruction, then the context after a blank line) and the generation prompt.

  Args:
    tokenizer: a tokenizer with `apply_chat_template` (`models.hf.Tokenizer`).
    record: one instruction record; layout: its layout.
  Returns:
    (prompt with the template's special tokens, response).
  """
  fields = _fields(layout)
  check_record(record, layout)
  context = record.get(fields["input"]) or ""
  user = record[fields["instruction"]] + (f"\n\n{context}" if context else "")
  return _user_turn(tokenizer, user), record[fields["response"]]


def _user_turn(tokenizer, user: str) -> str:
  """The chat template's prompt of one user turn `user`, then the generation prompt."""
  return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)


def conversation_prompt(
  questions: list[str], answers: list[str], tokenizer=None, chat: bool = False, template: PromptTemplate = ALPACA
) -> str:
  """The prompt of a conversation's next answer (MT-Bench's second turn): user turns
  `questions` [n] and the model's earlier `answers` [n - 1], through the tokenizer's chat template
  (`chat`: user and assistant messages, then the generation prompt) or `template` (the first
  question's prompt, then each answer followed by `template.follow_up` of the next question).

  Args:
    questions: the user turns so far, the last one to answer.
    answers: the answers to all but the last.
    tokenizer: a tokenizer with `apply_chat_template` (with `chat`).
    chat: use the chat template.
    template: else this prompt template (its `follow_up` needed beyond one turn).
  Returns:
    The prompt text (with the chat template's special tokens where `chat`).
  Raises:
    ValueError: answers that do not match the questions; a template without `follow_up` for a
      later turn.
  """
  if len(answers) != len(questions) - 1 or not questions:
    raise ValueError(
      f"conversation_prompt: {len(questions)} questions need {len(questions) - 1} answers, got {len(answers)}"
    )
  if chat:
    messages = []
    for question, answer in zip(questions, [*answers, None]):
      messages.append({"role": "user", "content": question})
      if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  if len(questions) > 1 and not template.follow_up:
    raise ValueError("conversation_prompt: the prompt template has no follow_up block for a later turn")
  prompt = template.format(questions[0])
  for answer, question in zip(answers, questions[1:]):
    prompt += answer + template.follow_up.format(instruction=question)
  return prompt


RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # A judge's "[[rating]]" (MT-Bench's single-answer format).
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")  # "[rating]", as MT-Bench's own parser also accepts.


def judge_rating(judgment: str) -> float:
  """The rating a judge wrote as "[[7]]" (else "[7]"): the first such number, or -1 where the
  judgment has none (MT-Bench's convention for an unusable judgment).

  Args:
    judgment: the judge's text.
  Returns:
    The rating, or -1.0.
  """
  found = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
  return float(found.group(1)) if found else -1.0


def _cut(encoded: Mapping[str, np.ndarray], eos_id: int | None) -> np.ndarray:
  """bool [...]: the sequences of `encode_instruction`'s arrays [..., T] cut at T (the last slot
  holds a token other than end-of-text)."""
  return (encoded["attention_mask"][..., -1] == 1) & (encoded["input_ids"][..., -1] != eos_id)


def encode_instruction(
  tokenizer, prompt: str, response: str, max_len: int, prompt_has_special_tokens: bool = False
) -> dict[str, np.ndarray]:
  """One example as {"input_ids", "attention_mask", "loss_mask"} int32 [max_len] (module
  docstring): `prompt + response` tokenized whole, then end-of-text; the loss on the tokens from
  the first one that covers a response character. `tokenizer`: `models.hf.Tokenizer`; the text
  gets its special tokens (begin-of-text) unless the prompt already has them
  (`prompt_has_special_tokens`, a chat template's).

  Args:
    tokenizer: `models.hf.Tokenizer`.
    prompt, response: the texts.
    max_len: the sequence length (longer sequences are cut).
    prompt_has_special_tokens: a chat template's prompt.
  Returns:
    {"input_ids", "attention_mask", "loss_mask"}: int32 [max_len] each.
  """
  if tokenizer.eos_id is None:
    raise ValueError("the tokenizer names no eos_token (tokenizer_config.json), so a response cannot end")
  ids, offsets = tokenizer.encode_with_offsets(prompt + response, add_special_tokens=not prompt_has_special_tokens)
  prompt_tokens = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
  ids = (ids + [tokenizer.eos_id])[:max_len]
  real = len(ids)
  out = {
    "input_ids": np.full(max_len, tokenizer.pad_id, np.int32),
    "attention_mask": np.zeros(max_len, np.int32),
    "loss_mask": np.zeros(max_len, np.int32),
  }
  out["input_ids"][:real] = ids
  out["attention_mask"][:real] = 1
  out["loss_mask"][prompt_tokens:real] = 1
  return out


def encode_instructions(
  tokenizer,
  records: Iterable[Mapping[str, Any]],
  max_len: int,
  layout: str = "alpaca",
  chat: bool = False,
  template: PromptTemplate = ALPACA,
) -> dict[str, np.ndarray]:
  """Every record encoded: {"input_ids", "attention_mask", "loss_mask"} int32 [N, max_len];
  "mask" [N] float32, 1 for an example with loss tokens (`client.example_count` counts it);
  "truncated" [N] bool (the sequence was cut); "no_loss" [N] bool (its prompt filled max_len).

  Args:
    tokenizer: `models.hf.Tokenizer`.
    records: instruction records.
    max_len: the sequence length.
    layout: "alpaca" or "dolly"; chat: use the tokenizer's chat template; template: else this one.
  Returns:
    The arrays above, N = the number of records.
  """
  rows = []
  for record in records:
    prompt, response = chat_prompt(tokenizer, record, layout) if chat else prompt_and_response(record, layout, template)
    rows.append(encode_instruction(tokenizer, prompt, response, max_len, prompt_has_special_tokens=chat))
  if not rows:
    raise ValueError("no records to encode")
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  out["truncated"] = _cut(out, tokenizer.eos_id)
  out["no_loss"] = out["loss_mask"].sum(axis=1) == 0
  out["mask"] = (~out["no_loss"]).astype(np.float32)  # The round counts these examples.
  return out


# Preference pairs (DPO): a prompt with a chosen and a rejected response, each encoded as an
# instruction example, the loss mask on its response. Layouts:
#   "hh_rlhf"        Anthropic HH-RLHF: {"chosen": dialogue, "rejected": dialogue}, both
#                    "\n\nHuman: ... \n\nAssistant: <response>", sharing the dialogue up to the
#                    last "\n\nAssistant:", which is the prompt (used as it is, no template)
#   "ultrafeedback"  UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized): {"prompt":
#                    text, "chosen": [messages], "rejected": [messages]}, the response the last
#                    assistant message's content (plain strings are read too)
#   "pairs"          TRL's explicit-prompt layout: {"prompt", "chosen", "rejected"} texts
# The last two get the Alpaca template (or the tokenizer's chat template) around the prompt.
PREFERENCE_LAYOUTS = ("hh_rlhf", "ultrafeedback", "pairs")
HH_ASSISTANT = "\n\nAssistant:"


def _response_text(value: Any, field: str, where: str) -> str:
  """A response: a text, or the last assistant message's content of a message list."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
    replies = [m.get("content") for m in value if m.get("role") == "assistant"]
    if replies and isinstance(replies[-1], str):
      return replies[-1]
  raise ValueError(f"{where}: field {field!r} is neither a text nor messages ending with an assistant's content")


def preference_pair(record: Mapping[str, Any], layout: str, where: str = "record") -> tuple[str, str, str, bool]:
  """(prompt, chosen response, rejected response, whether the prompt is already formatted) of
  one preference record in `layout` (`PREFERENCE_LAYOUTS`).

  Args:
    record: one record.
    layout: "hh_rlhf", "ultrafeedback" or "pairs".
    where: how errors name the record (file and line).
  Returns:
    (prompt, chosen, rejected, formatted): `formatted` for HH-RLHF's dialogue prompt (no template).
  Raises:
    ValueError: a missing or non-text field, or HH-RLHF dialogues that do not share their prompt.
  """
  if layout not in PREFERENCE_LAYOUTS:
    raise ValueError(f"layout={layout!r}; preference layouts: {', '.join(PREFERENCE_LAYOUTS)}")
  needed = ("chosen", "rejected") if layout == "hh_rlhf" else ("prompt", "chosen", "rejected")
  missing = [f for f in needed if f not in record]
  if missing:
    raise ValueError(f"{where}: the {layout} layout needs fields {list(needed)}; missing {missing}")
  if layout == "hh_rlhf":
    chosen, rejected = (_response_text(record[f], f, where) for f in ("chosen", "rejected"))
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
      raise ValueError(f"{where}: 'chosen' has no {HH_ASSISTANT!r} turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
      raise ValueError(f"{where}: 'chosen' and 'rejected' do not share the dialogue before the last assistant turn")
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :], True
  if not isinstance(record["prompt"], str):
    raise ValueError(f"{where}: field 'prompt' is a {type(record['prompt']).__name__}, not text")
  chosen, rejected = (_response_text(record[f], f, where) for f in ("chosen", "rejected"))
  return record["prompt"], chosen, rejected, False


def encode_preference_pairs(
  tokenizer,
  records: Iterable[Mapping[str, Any]],
  max_len: int,
  layout: str = "pairs",
  chat: bool = False,
  template: PromptTemplate = ALPACA,
  source: str = "",
) -> dict[str, np.ndarray]:
  """Every preference record as two examples, chosen first: {"input_ids", "attention_mask",
  "loss_mask"} int32 [N, 2, T] (`encode_instruction`'s, the loss mask on each response and its
  end-of-text); "mask" [N] float32, 1 for a pair whose two responses keep loss tokens; "truncated"
  [N] bool (either sequence was cut).

  Args:
    tokenizer: `models.hf.Tokenizer`.
    records: preference records in `layout`.
    max_len: T.
    layout: "hh_rlhf", "ultrafeedback" or "pairs" (`preference_pair`).
    chat: the prompt in the tokenizer's chat template (HH-RLHF's dialogues keep their own turns);
      template: else this one.
    source: what errors name before "record N" (e.g. the file).
  Returns:
    The arrays above.
  Raises:
    ValueError: the first record that is not a pair of `layout` (`preference_pair`), named.
  """
  rows = []
  for number, record in enumerate(records, 1):
    prompt, chosen, rejected, formatted = preference_pair(record, layout, where=f"{source}record {number}")
    if chat and not formatted:
      prompt = _user_turn(tokenizer, prompt)
    elif not formatted:
      prompt = template.format(prompt)
    special = chat and not formatted  # A chat template's prompt holds its special tokens.
    pair = [
      encode_instruction(tokenizer, prompt, r, max_len, prompt_has_special_tokens=special) for r in (chosen, rejected)
    ]
    rows.append({k: np.stack([p[k] for p in pair]) for k in pair[0]})
  if not rows:
    raise ValueError("no records to encode")
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  out["truncated"] = np.any(_cut(out, tokenizer.eos_id), axis=1)
  out["mask"] = np.all(out["loss_mask"].sum(axis=-1) > 0, axis=1).astype(np.float32)
  return out


# Packing: several encoded examples in one row of T tokens, each its own segment (the model
# attends and counts positions within a segment: `models.llama.DecoderLM`), so that a batch of
# short examples is not mostly padding. Best-fit decreasing keeps every example whole.


def example_lengths(attention_mask: np.ndarray) -> np.ndarray:
  """The real tokens of each right-padded example: int64 [...] of attention_mask [..., T].

  Args:
    attention_mask: [..., T] {0, 1}, the real tokens first (`encode_instructions`).
  Returns:
    int64 [...].
  """
  return np.asarray(attention_mask).astype(bool).sum(axis=-1).astype(np.int64)


def packing_plan(lengths: Iterable[int], max_len: int) -> np.ndarray:
  """Which examples share a row: best-fit decreasing (the longest example first, each into the
  row it leaves least room in, a new row when none has room), rows of at most `max_len` tokens.

  Args:
    lengths: [N] each example's tokens (`example_lengths`), 1..max_len.
    max_len: T.
  Returns:
    int64 [R, K]: row r's example indices in packing order, -1 after its last; K = the most
    examples a row holds. R = 0 (shape [0, 1]) for no examples.
  Raises:
    ValueError: a length outside 1..max_len.
  """
  lengths = np.asarray(list(lengths), np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > max_len):
    raise ValueError(f"example lengths must lie in 1..max_len={max_len}; got {lengths.min()}..{lengths.max()}")
  free: list[tuple[int, int]] = []  # (room left, row), sorted.
  rows: list[list[int]] = []
  for i in np.argsort(-lengths, kind="stable"):
    need = int(lengths[i])
    at = bisect.bisect_left(free, (need, -1))
    if at == len(free):
      rows.append([int(i)])
      bisect.insort(free, (max_len - need, len(rows) - 1))
      continue
    room, row = free.pop(at)
    rows[row].append(int(i))
    bisect.insort(free, (room - need, row))
  plan = np.full((len(rows), max([len(r) for r in rows], default=1)), -1, np.int64)
  for r, members in enumerate(rows):
    plan[r, : len(members)] = members
  return plan


def pack_examples(tokens: Mapping[str, Any], plan: np.ndarray, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows of packed examples: each example's real tokens one after another, in plan order.

  Args:
    tokens: {"input_ids", "attention_mask", "loss_mask"} [N, T], right-padded
      (`encode_instructions`; any array indexable by an index array, e.g. memory-mapped rows).
    plan: int [..., K] example indices per row, -1 after a row's last (`packing_plan`, or rows
      of it); a row's examples fit in T.
    pad_id: the id of the slots after a row's last example.
  Returns:
    {"input_ids", "attention_mask", "loss_mask"}: int32 [..., T]; "attention_mask" holds segment
    ids: k for the row's k-th example (1-based), 0 for padding; "loss_mask" is each example's own.
  Raises:
    ValueError: a row's examples exceed T.
  """
  plan = np.asarray(plan, np.int64)
  flat = plan.reshape(-1, plan.shape[-1])  # [R, K]
  max_len = int(tokens["input_ids"].shape[-1])
  used = np.unique(flat[flat >= 0])
  read = {
    k: np.asarray(tokens[k][used]).astype(np.int32).reshape(-1, max_len)
    for k in ("input_ids", "attention_mask", "loss_mask")
  }
  local = np.searchsorted(used, np.maximum(flat, 0)).clip(0, max(len(used) - 1, 0))  # [R, K] rows of `read`.
  lengths = np.where(flat >= 0, example_lengths(read["attention_mask"])[local] if used.size else 0, 0)
  ends = np.cumsum(lengths, axis=1)  # [R, K]
  if ends.size and ends[:, -1].max() > max_len:
    raise ValueError(f"a row's examples hold {ends[:, -1].max()} tokens, more than T={max_len}")
  slots = np.arange(max_len)
  segment = (slots[None, None, :] >= ends[:, :, None]).sum(axis=1)  # [R, T]: the row's k-th example; K: none.
  real = segment < flat.shape[1]
  k = np.minimum(segment, flat.shape[1] - 1)
  rows = np.arange(len(flat))[:, None]
  position = np.where(real, slots[None, :] - (ends - lengths)[rows, k], 0)
  take = lambda key: read[key][local[rows, k], position] if used.size else np.zeros_like(segment)
  out = {
    "input_ids": np.where(real, take("input_ids"), pad_id),
    "attention_mask": np.where(real, segment + 1, 0),
    "loss_mask": np.where(real, take("loss_mask"), 0),
  }
  return {key: value.astype(np.int32).reshape(plan.shape[:-1] + (max_len,)) for key, value in out.items()}


def padding_fraction(attention_mask: np.ndarray) -> float:
  """The share of token slots that hold no token: padding / all slots of attention_mask [..., T]
  (0/1 or packed segment ids).

  Args:
    attention_mask: [..., T].
  Returns:
    A fraction in [0, 1].
  """
  mask = np.asarray(attention_mask)
  return float(np.mean(mask == 0)) if mask.size else 0.0


# Multiple choice (MMLU's layout and zero-shot prompt): each choice's answer letter is scored by
# its log-likelihood after the question; the prediction is the likeliest letter.
CHOICE_LETTERS = "ABCDEFGHIJ"


def multiple_choice_prompt(question: Mapping[str, Any]) -> str:
  """MMLU's zero-shot prompt (Hendrycks et al.; lm-evaluation-harness's `mmlu`): a header
  naming the subject, the question, the lettered choices, then "Answer:".

  Args:
    question: {"question": str, "choices": [str, ...], "subject": str (optional)}.
  Returns:
    The prompt; each choice is scored as the continuation " A", " B", ...
  """
  subject = str(question.get("subject") or "general knowledge").replace("_", " ")
  lines = [f"The following are multiple choice questions (with answers) about {subject}.", "", question["question"]]
  lines += [f"{CHOICE_LETTERS[i]}. {choice}" for i, choice in enumerate(question["choices"])]
  return "\n".join(lines + ["Answer:"])


def encode_multiple_choice(tokenizer, questions: Iterable[Mapping[str, Any]], max_len: int) -> dict[str, np.ndarray]:
  """Every question's choices as scored sequences: the prompt then " <letter>", the loss mask
  on the letter's tokens only (no end-of-text).

  Args:
    tokenizer: `models.hf.Tokenizer`.
    questions: {"question", "choices" (2..10 strings), "answer" (an index), "subject"}.
    max_len: T; a prompt is cut from its start (the header goes first) so the letter fits.
  Returns:
    {"input_ids", "attention_mask", "loss_mask": int32 [Q, K, T], "choice_mask": float32 [Q, K]
    (1 for a real choice; K = the most choices of a question), "answer": int32 [Q]}; and when
    the choices of every question differ in their last token only (the usual case: " A", " B"
    as one token each, or a shared space then the letter), "letter_ids" int32 [Q, K] (each
    choice's last token) and "letter_position" int32 [Q] (its slot), so that one forward pass of
    a question scores all its letters (`CausalLM.multiple_choice_scores`).
  Raises:
    ValueError: a question with fewer than 2 or more than 10 choices, or an answer out of range.
  """
  questions = list(questions)
  if not questions:
    raise ValueError("no questions to encode")
  width = max(len(q["choices"]) for q in questions)
  shape = (len(questions), width, max_len)
  out = {
    "input_ids": np.full(shape, tokenizer.pad_id, np.int32),
    "attention_mask": np.zeros(shape, np.int32),
    "loss_mask": np.zeros(shape, np.int32),
    "choice_mask": np.zeros(shape[:2], np.float32),
    "answer": np.zeros(len(questions), np.int32),
  }
  letter_ids, letter_position = np.zeros(shape[:2], np.int32), np.zeros(len(questions), np.int32)
  one_forward = True  # Every question's choices differ in their last token only.
  for q, question in enumerate(questions):
    count = len(question["choices"])
    if not 2 <= count <= len(CHOICE_LETTERS) or not 0 <= int(question["answer"]) < count:
      raise ValueError(
        f"question {q}: {count} choices and answer {question['answer']!r} (2..10 choices, answer an index)"
      )
    prompt, first_choice = multiple_choice_prompt(question), []
    for k in range(count):
      ids, offsets = tokenizer.encode_with_offsets(prompt + " " + CHOICE_LETTERS[k])
      start = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
      letter = len(ids) - start
      if letter == 0 or letter >= max_len:
        raise ValueError(f"question {q}: the answer letter has {letter} tokens (max_len={max_len})")
      ids = ids[-max_len:]  # A long prompt loses its start; the letter is kept.
      if k == 0:
        first_choice = ids[:-1]  # The others must differ from it in their last token only.
      one_forward &= ids[:-1] == first_choice
      letter_ids[q, k], letter_position[q] = ids[-1], len(ids) - 1
      out["input_ids"][q, k, : len(ids)] = ids
      out["attention_mask"][q, k, : len(ids)] = 1
      out["loss_mask"][q, k, len(ids) - letter : len(ids)] = 1
      out["choice_mask"][q, k] = 1.0
    out["answer"][q] = int(question["answer"])
  if one_forward:
    out["letter_ids"], out["letter_position"] = letter_ids, letter_position
  return out


def prompts_and_references(batch: Mapping[str, np.ndarray], eos_id: int | None) -> tuple[np.ndarray, np.ndarray, list]:
  """Encoded examples (`encode_instructions`' arrays) split for generation: each prompt (the
  tokens before the first loss token), left-padded, and its reference response's ids (the loss
  tokens but end-of-text).

  Args:
    batch: {"input_ids", "loss_mask": [n, T]}.
    eos_id: the end-of-text id (dropped from the references).
  Returns:
    (prompt_ids int32 [n, P] left-padded with 0, prompt_mask int32 [n, P], [n] reference id lists),
    P the longest prompt.
  """
  ids, loss = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"]).astype(bool)
  starts = [int(np.argmax(row)) if row.any() else len(row) for row in loss]
  width = max(max(starts), 1)
  prompt_ids, prompt_mask = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), np.int32)
  references = []
  for i, start in enumerate(starts):
    prompt_ids[i, width - start :] = ids[i, :start]
    prompt_mask[i, width - start :] = 1
    references.append([int(t) for t in ids[i][loss[i]] if t != eos_id])
  return prompt_ids, prompt_mask, references


PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")
NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
  """SQuAD's normalization: lowercase, punctuation and the articles a / an / the dropped,
  whitespace collapsed.

  Args:
    text: any text.
  Returns:
    The normalized text.
  """
  text = "".join(c for c in text.lower() if c not in PUNCTUATION)
  return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
  """1.0 if the normalized texts are equal (`normalize_answer`), else 0.0.

  Args:
    prediction, reference: the texts.
  Returns:
    1.0 or 0.0.
  """
  return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 (Lin 2004): the longest common subsequence of the two token lists, F1 of its
  precision and recall; tokens as Google's `rouge-score` makes them without stemming (lowercase,
  runs of [a-z0-9]). 0.0 when either is empty.

  Args:
    prediction, reference: the texts.
  Returns:
    F1 in [0, 1].
  """
  tokens = lambda t: NOT_ALPHANUMERIC.sub(" ", t.lower()).split()
  a, b = tokens(prediction), tokens(reference)
  if not a or not b:
    return 0.0
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  common = previous[-1]
  if common == 0:
    return 0.0
  precision, recall = common / len(a), common / len(b)
  return 2 * precision * recall / (precision + recall)
