"""Code problems scored by their tests (`experiments/runner/code_problems.py`) and the pass@1 CLI
(`python -m experiments.code_eval`) on a text run's workdir."""

import json

import pytest

from experiments.runner import code_problems

HUMANEVAL = {
  "task_id": "HumanEval/0",
  "prompt": 'def add(a, b):\n    """The sum of a and b."""\n',
  "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
  "entry_point": "add",
}
MBPP = {"task_id": 2, "text": "Write a function to multiply two numbers.", "test_list": ["assert mul(2, 3) == 6"]}


def test_a_completion_passes_only_when_the_tests_do():
  """HumanEval: the right body passes, a wrong one and one that never returns do not (the
  latter killed at the time limit); MBPP: the prompt is a docstring of the task and its first
  test, and the completion is the whole function."""
  problem, mbpp = code_problems._problem(HUMANEVAL, "he"), code_problems._problem(MBPP, "mbpp")
  assert code_problems.passes(problem, "    return a + b\n")
  assert not code_problems.passes(problem, "    return a - b\n")
  assert not code_problems.passes(problem, "    while True:\n        pass\n", timeout=1.0)
  assert mbpp["prompt"] == '"""\nWrite a function to multiply two numbers.\nassert mul(2, 3) == 6\n"""\n'
  assert code_problems.passes(mbpp, "def mul(a, b):\n    return a * b\n")
  assert not code_problems.passes(mbpp, "def mul(a, b):\n    return a + b\n")


def test_a_generation_is_cut_where_the_function_ends():
  assert code_problems.completion_of("    return a + b\n\ndef other():\n    pass") == "    return a + b\n"
  assert code_problems.completion_of("    return a + b\n# done") == "    return a + b"
  assert code_problems.completion_of("    return 1") == "    return 1"


def test_problem_files_are_read_in_either_layout(tmp_path):
  path = tmp_path / "problems.jsonl"
  path.write_text(json.dumps(HUMANEVAL) + "\n" + json.dumps(MBPP) + "\n")
  problems = code_problems.read_problems(str(path))
  assert [(p["task_id"], p["kind"]) for p in problems] == [("HumanEval/0", "humaneval"), ("2", "mbpp")]
  assert len(code_problems.read_problems(str(path), max_problems=1)) == 1
  path.write_text(json.dumps(HUMANEVAL) + "\n" + json.dumps({"question": "?"}) + "\n")
  with pytest.raises(ValueError, match=r"problems.jsonl record 2: neither HumanEval's fields"):
    code_problems.read_problems(str(path))


def test_the_cli_scores_a_runs_global_and_personalized_models(tmp_path, cache_dirs):
  """One FedIT round on the fixture Llama, then pass@1 of the global model and client 0's on two
  problems: the JSON names every model, with rates in [0, 1] and passed ids among the problems'."""
  from experiments import code_eval
  from experiments.runner.train import train_and_evaluate
  from tests.end_to_end.test_text_runs import _config

  config = _config(tmp_path, cache_dirs, rounds=1)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir, progress=False)
  problems = tmp_path / "problems.jsonl"
  problems.write_text(json.dumps(HUMANEVAL) + "\n" + json.dumps(MBPP) + "\n")
  out = tmp_path / "code.json"
  code_eval.main(
    ["--workdir", workdir, "--problems", str(problems), "--clients", "0", "--max_new_tokens", "6", "--out", str(out)]
  )
  record = json.load(open(out))
  assert record["round"] == 1 and set(record["models"]) == {"global", "client-0"}
  for result in record["models"].values():
    assert 0.0 <= result["pass_at_1"] <= 1.0 and set(result["passed"]) <= {"HumanEval/0", "2"}
