"""Code-generation problems scored by running their tests (pass@1), as FlowerTune's coding
leaderboard and bigcode-evaluation-harness score HumanEval and MBPP.

  read_problems(path)   a local .jsonl / .json / .parquet file (`instructions.iter_records`) in
                        HumanEval's layout {"task_id", "prompt", "test", "entry_point"}
                        (openai/openai_humaneval) or MBPP's {"task_id", "text", "test_list",
                        "test_setup_code" (optional)} (google-research-datasets/mbpp), told apart
                        by their fields
  completion_of(text)   a generated text cut where the function ends (bigcode's stop sequences)
  passes(problem, completion, timeout)   whether the completed program passes the problem's tests

HumanEval's prompt is the function's signature and docstring, completed as code; MBPP's is
bigcode's: the task's text and its first test in a docstring, then the completion. **Running the
tests runs model-written code on this machine** (as human-eval's `execution.py` does, in a
separate Python process with a time limit and an empty working directory, nothing more): run
it in a container or a VM you can throw away.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

from experiments.runner.data import instructions

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif __name__", "\nprint(", "\nassert")


def _problem(record: Any, where: str) -> dict[str, Any]:
  """A problem {"task_id", "prompt", "program": (completion -> the program to run), "kind"}."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: a record expected")
  if all(k in record for k in ("prompt", "test", "entry_point")):
    prompt, test, entry = record["prompt"], record["test"], record["entry_point"]
    return {
      "task_id": str(record.get("task_id", where)),
      "kind": "humaneval",
      "prompt": prompt,
      "tests": f"{test}\ncheck({entry})\n",
    }
  if all(k in record for k in ("text", "test_list")):
    tests = list(record["test_list"])
    if not tests:
      raise ValueError(f"{where}: MBPP's 'test_list' is empty")
    setup = record.get("test_setup_code") or ""
    return {
      "task_id": str(record.get("task_id", where)),
      "kind": "mbpp",
      "prompt": f'"""\n{record["text"]}\n{tests[0]}\n"""\n',
      "tests": "\n".join([setup, *tests]) + "\n",
    }
  raise ValueError(
    f"{where}: neither HumanEval's fields (prompt, test, entry_point) nor MBPP's (text, test_list); "
    f"got {sorted(record)}"
  )


def read_problems(path: str, max_problems: int = 0) -> list[dict[str, Any]]:
  """The problems of a HumanEval or MBPP file (module docstring), the first `max_problems` (0: all).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a record of neither layout, named by file and number.
  """
  problems = [_problem(r, f"{path} record {n}") for n, r in enumerate(instructions.iter_records(path), 1)]
  if not problems:
    raise ValueError(f"{path}: no problems")
  return problems[:max_problems] if max_problems else problems


def completion_of(generated: str) -> str:
  """The generated text up to the first stop sequence (the function's end, as bigcode cuts it)."""
  cut = min((i for i in (generated.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(generated))
  return generated[:cut]


def program_of(problem: dict[str, Any], completion: str) -> str:
  """The program run for `problem`: HumanEval's prompt + completion + tests; MBPP's completion
  (the prompt is a docstring) + tests."""
  body = problem["prompt"] + completion if problem["kind"] == "humaneval" else completion
  return f"{body}\n\n{problem['tests']}"


def passes(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
  """Whether `problem`'s tests pass on `completion`: the program run by this Python in a fresh
  process, in an empty temporary directory, killed after `timeout` seconds (a failure).

  Args:
    problem: from `read_problems`.
    completion: the model's completion (`completion_of`).
    timeout: seconds.
  Returns:
    True when the program exits with status 0.
  """
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "program.py")
    with open(path, "w") as f:
      f.write(program_of(problem, completion))
    try:
      result = subprocess.run(
        [sys.executable, path], cwd=directory, capture_output=True, timeout=timeout, env={"PATH": os.defpath}
      )
    except subprocess.TimeoutExpired:
      return False
  return result.returncode == 0
