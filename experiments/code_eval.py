"""pass@1 of a text run's models on HumanEval or MBPP, from its workdir: greedy completions of each
problem by the global model (and, with --clients, personalized models), each completed program
run against the problem's tests (`experiments/runner/code_problems.py`: model-written code runs
on this machine, in a separate process with a time limit; use a disposable container).

  python -m experiments.code_eval --workdir runs/code_fedit --problems HumanEval.jsonl [--round R]
      [--clients 0,3|all] [--max_problems N] [--max_new_tokens 256] [--timeout 10] [--out results.json]

Prints pass@1 per model and writes {"round", "problems", "models": {name: {"pass_at_1",
"passed": [task ids]}}} as JSON (default WORKDIR/code_eval/round-<R>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments import cli


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="A text run's directory (config.json, checkpoints/).")
  parser.add_argument("--problems", required=True, help="A HumanEval or MBPP .jsonl / .json / .parquet file.")
  parser.add_argument("--round", type=int, default=None, help="The checkpointed round (default: the latest).")
  parser.add_argument("--clients", default="", help="Personalized models too: 'all' or ids '0,3' (default none).")
  parser.add_argument("--max_problems", type=int, default=0, help="The first N problems (0: all).")
  parser.add_argument("--max_new_tokens", type=int, default=256, help="Tokens generated per problem.")
  parser.add_argument("--batch", type=int, default=16, help="Problems generated at once.")
  parser.add_argument("--timeout", type=float, default=10.0, help="Seconds a program may run.")
  parser.add_argument("--out", default="", help="JSON file to write (default WORKDIR/code_eval/round-<R>.json).")
  parser.add_argument("--verbose", action="store_true", help="Tracebacks on errors.")
  args = parser.parse_args(argv)
  cli.run_reporting_errors(lambda: code_eval(args), argv)


def code_eval(args: argparse.Namespace) -> dict:
  """The evaluation `main` runs (module docstring); its results."""
  from experiments.runner import code_problems
  from experiments.runner import export as export_lib
  from experiments.runner import workdir as workdir_lib
  from experiments.runner.train import restore_checkpointed
  from experiments.runner.config_facts import is_text
  from experiments.runner.evaluation import complete_prompts, model_functions

  config = workdir_lib.recorded_config(args.workdir)
  if not is_text(config):
    raise ValueError(f"{args.workdir}: an image run; code problems are for text runs")
  problems = code_problems.read_problems(args.problems, args.max_problems)
  exp, state, done, clients = restore_checkpointed(config, args.workdir, args.round, args.clients)
  models = export_lib.models_of(model_functions(exp.fed_round), state, clients)
  results = {}
  for name, trainable in models.items():
    prompts = [p["prompt"] for p in problems]
    texts = complete_prompts(exp, state, trainable, prompts, args.max_new_tokens, args.batch)
    passed = [
      p["task_id"]
      for p, t in zip(problems, texts)
      if code_problems.passes(p, code_problems.completion_of(t), args.timeout)
    ]
    results[name] = {"pass_at_1": len(passed) / len(problems), "passed": passed}
    print(f"{name}: pass@1 {results[name]['pass_at_1']:.1%} ({len(passed)} of {len(problems)})")
  out = args.out or os.path.join(args.workdir, "code_eval", f"round-{done}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = {"round": done, "problems": args.problems, "max_new_tokens": args.max_new_tokens, "models": results}
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
