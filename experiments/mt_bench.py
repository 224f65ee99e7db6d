"""MT-Bench-style evaluation of a text run from its workdir (`experiments/runner/mt_bench.py`):
two-turn greedy answers of the global model (and, with --clients, personalized models) to
FastChat's question.jsonl, written in FastChat's model-answer layout; with --judge and
--judge_prompts, each answer graded 1-10 by a local judge checkpoint with FastChat's
single-answer prompts.

  python -m experiments.mt_bench --workdir runs/dolly_fedit --questions mt_bench/question.jsonl
      [--round R] [--clients 0,3|all] [--max_questions N] [--max_new_tokens 256]
      [--judge /ckpt/judge-model --judge_prompts judge_prompts.jsonl] [--out DIR]

Writes DIR/model_answer/<run>-<model>.jsonl (grade them with FastChat's `gen_judgment.py` and
GPT-4, as published MT-Bench scores are), and with a judge DIR/model_judgment/<judge>_single.jsonl
and DIR/summary.json (mean rating per turn, overall and per category; the unrated count);
DIR defaults to WORKDIR/mt_bench/round-<R>. The prompts are the run's own: its chat template
where the run used one (`data.chat_template`), else the Alpaca template, a second turn following the
first answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments import cli


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="A text run's directory (config.json, checkpoints/).")
  parser.add_argument("--questions", required=True, help="MT-Bench's question.jsonl (or .json / .parquet).")
  parser.add_argument("--round", type=int, default=None, help="The checkpointed round (default: the latest).")
  parser.add_argument("--clients", default="", help="Personalized models too: 'all' or ids '0,3' (default none).")
  parser.add_argument("--max_questions", type=int, default=0, help="The first N questions (0: all).")
  parser.add_argument("--max_new_tokens", type=int, default=256, help="Tokens generated per answer.")
  parser.add_argument("--batch", type=int, default=16, help="Prompts generated at once.")
  parser.add_argument("--judge", default="", help="A local chat checkpoint to grade the answers (default: none).")
  parser.add_argument("--judge_prompts", default="", help="FastChat's judge_prompts.jsonl (with --judge).")
  parser.add_argument("--judge_max_new_tokens", type=int, default=512, help="Tokens the judge writes per grade.")
  parser.add_argument("--out", default="", help="Directory to write (default WORKDIR/mt_bench/round-<R>).")
  parser.add_argument("--verbose", action="store_true", help="Tracebacks on errors.")
  args = parser.parse_args(argv)
  cli.run_reporting_errors(lambda: mt_bench(args), argv)


def mt_bench(args: argparse.Namespace) -> dict:
  """The evaluation `main` runs (module docstring); the summary (empty without a judge)."""
  from experiments.runner import export as export_lib
  from experiments.runner import mt_bench as bench
  from experiments.runner import workdir as workdir_lib
  from experiments.runner.train import restore_checkpointed
  from experiments.runner.config_facts import is_text
  from experiments.runner.evaluation import complete_prompts, model_functions
  from hyperlora_jax import text

  if bool(args.judge) != bool(args.judge_prompts):
    raise ValueError("--judge and --judge_prompts go together (a judge checkpoint and FastChat's judge_prompts.jsonl)")
  config = workdir_lib.recorded_config(args.workdir)
  if not is_text(config):
    raise ValueError(f"{args.workdir}: an image run; MT-Bench is for text runs")
  questions = bench.read_questions(args.questions, args.max_questions)
  prompts = bench.read_judge_prompts(args.judge_prompts) if args.judge_prompts else None
  exp, state, done, clients = restore_checkpointed(config, args.workdir, args.round, args.clients)
  chat = bool(config.data.get("chat_template", False))
  prompt_of = lambda asked, answered: text.conversation_prompt(asked, answered, exp.tokenizer, chat=chat)
  models = export_lib.models_of(model_functions(exp.fed_round), state, clients)
  out = args.out or os.path.join(args.workdir, "mt_bench", f"round-{done}")
  os.makedirs(os.path.join(out, "model_answer"), exist_ok=True)
  run_name = os.path.basename(os.path.abspath(args.workdir))
  answers_by_model = {}
  for name, trainable in models.items():
    complete = lambda texts, trainable=trainable: complete_prompts(
      exp, state, trainable, texts, args.max_new_tokens, args.batch, add_special_tokens=not chat
    )
    model_id = f"{run_name}-{name}"
    answers_by_model[model_id] = bench.answer_questions(complete, questions, prompt_of)
    with open(os.path.join(out, "model_answer", f"{model_id}.jsonl"), "w") as f:
      for question, answers in zip(questions, answers_by_model[model_id]):
        f.write(json.dumps(bench.answer_record(question, model_id, answers, time.time())) + "\n")
    print(f"{model_id}: {len(questions)} answers -> {out}/model_answer/{model_id}.jsonl")
  if not prompts:
    return {}
  judge_id = os.path.basename(os.path.abspath(args.judge))
  judge = bench.judge_from_checkpoint(args.judge, args.judge_max_new_tokens, args.batch)
  judgments = bench.judgments_of(judge, judge_id, prompts, questions, answers_by_model, time.time())
  os.makedirs(os.path.join(out, "model_judgment"), exist_ok=True)
  with open(os.path.join(out, "model_judgment", f"{judge_id}_single.jsonl"), "w") as f:
    f.writelines(json.dumps(j) + "\n" for j in judgments)
  summary = bench.summarize(judgments, {q["question_id"]: q["category"] for q in questions})
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"round": done, "judge": judge_id, "models": summary}, f, indent=2)
  for model_id, scores in summary.items():
    shown = lambda v: "none" if v is None else f"{v:.2f}"
    print(f"{model_id} (judge {judge_id}): turn 1 {shown(scores['turn_1'])}, turn 2 {shown(scores['turn_2'])}, "
          f"overall {shown(scores['overall'])}; unrated {scores['unrated']}")  # fmt: skip
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
