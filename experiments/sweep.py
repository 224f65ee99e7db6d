"""Runs methods x seeds (x overrides), each in its own workdir; resumable.

  python -m experiments.sweep --methods fedit,flexlora --seeds 0,1,2 --runs_dir runs/compare \
      --set fed.num_rounds=15

Finished runs are skipped, interrupted ones resume from their last checkpoint. Runs go one
after another in this process (the backbone is pretrained once and cached).
"""
from __future__ import annotations

import ast
import os

from absl import app, flags, logging

from configs import default
from hyperlora_jax import reporting
from hyperlora_jax.train import train_and_evaluate

_METHODS = flags.DEFINE_list("methods", ["fedit"], "Methods to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/sweep", "Parent of the runs' workdirs.")
_VARIANT = flags.DEFINE_string("variant", "", "Extra configs/default.py variant, e.g. 'smoke'.")
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (repeatable).")


def parse_override(text: str) -> tuple[str, object]:
  """'fed.num_rounds=15' -> ('fed.num_rounds', 15); non-literals stay strings."""
  field, _, value = text.partition("=")
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


def make_config(method: str, seed: int, overrides: list[str], variant: str = ""):
  config = default.get_config(",".join(filter(None, [f"method={method},seed={seed}", variant])))
  for field, value in map(parse_override, overrides):
    set_field(config, field, value)
  return config


def set_field(config, field: str, value) -> None:
  """config['a']['b'] = value for field 'a.b'; raises ValueError for a field that does not exist."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--set {field}: no such config field")
  node[leaf] = value


def is_finished(workdir: str, num_rounds: int) -> bool:
  records = reporting.read_metrics(workdir)
  return bool(records) and records[-1]["round"] >= num_rounds


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for method in _METHODS.value:
    for seed in map(int, _SEEDS.value):
      config = make_config(method, seed, _SET.value, _VARIANT.value)
      workdir = os.path.join(_RUNS_DIR.value, method, f"seed{seed}")
      if is_finished(workdir, config.fed.num_rounds):
        print(f"[skip] {workdir} is finished")
        continue
      result = train_and_evaluate(config, workdir, progress=False, log=lambda _: None)
      print(f"[done] {workdir} in {result['seconds']:.0f}s\n{result['summary']}", flush=True)


if __name__ == "__main__":
  app.run(main)
