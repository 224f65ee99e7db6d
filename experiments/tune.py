"""Fair tuning: the same grid budget for every method, picked on a validation split, then tested.

  python -m experiments.tune --runs_dir runs/tune --jobs 2 --methods fedit,flexlora,hyperlora,local_only

1. Validation. Each method runs its grid (`GRIDS`: 4 settings each, the client learning rate
   and the method's own key knob) on `--tune_seeds` with `data.validation_fraction` (0.2):
   every evaluation reads examples held out of the clients' training data, never the test split.
2. Pick. Per method, the setting with the best final `--metric` (mean personalized accuracy by
   default, the same criterion for every method), averaged over the tuning seeds.
3. Test. Each method with its pick on `--seeds`, on the test split.

Writes RUNS_DIR/tuning.md: per method, every setting's validation score, the pick, and the
pick's test accuracies (mean ± std over seeds). Rerunning resumes: finished runs are skipped
(`experiments.sweep`). `--set` and `--configs` apply to every run of both phases.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from experiments.report import emit

LEARNING_RATES = "client_optimizer.learning_rate=1e-3,3e-3,1e-2,3e-2"
# Four settings per method: the client learning rate, or two of its values × the method's knob.
GRIDS: dict[str, tuple[str, ...]] = {
    "fedit": (LEARNING_RATES,),
    "ffa_lora": (LEARNING_RATES,),
    "flexlora": (LEARNING_RATES,),
    "fedex_lora": (LEARNING_RATES,),
    "local_only": (LEARNING_RATES,),
    "lora_fair": ("client_optimizer.learning_rate=3e-3,1e-2", "lora_fair.lam=0.01,0.1"),
    "pfedhn": ("client_optimizer.learning_rate=3e-3,1e-2", "generator.optimizer.learning_rate=1e-3,1e-2"),
    "hyperlora": ("client_optimizer.learning_rate=3e-3,1e-2", "generator.optimizer.learning_rate=1e-3,1e-2"),
}
METRICS = ("personalized_accuracy_mean", "global_accuracy")


def grid_fields(grid: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(spec.split("=", 1)[0] for spec in grid)


def setting_of(entry: dict, fields: tuple[str, ...]) -> tuple[str, ...]:
  """The sweep index entry's overrides of the grid's fields, e.g. ('client_optimizer.learning_rate=1e-2',)."""
  return tuple(o for o in entry["overrides"] if o.split("=", 1)[0] in fields)


def validation_scores(entries: list[dict], method: str, metric: str) -> dict[tuple[str, ...], list[float]]:
  """{setting: [final `metric` of each finished tuning seed]} for `method`."""
  fields = grid_fields(GRIDS[method])
  scores: dict[tuple[str, ...], list[float]] = {}
  for entry in entries:
    final = entry.get("final") or {}
    if entry["method"] == method and entry.get("status") == "finished" and final.get(metric) is not None:
      scores.setdefault(setting_of(entry, fields), []).append(final[metric])
  return scores


def pick(scores: dict[tuple[str, ...], list[float]]) -> tuple[str, ...]:
  """The setting with the best mean score (the first of equals, in sorted order)."""
  if not scores:
    raise ValueError("no finished tuning run to pick from")
  return max(sorted(scores), key=lambda setting: np.mean(scores[setting]))


def _pct(values: list) -> str:
  values = [v for v in values if v is not None]
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}" if values else "–"


def tuning_table(validation: dict[str, dict], picks: dict[str, tuple[str, ...]], test_entries: list[dict],
                 metric: str) -> str:
  """Markdown: method | validation score of each setting | pick | test global | test personalized."""
  lines = [f"| method | validation {metric} % per setting (tuning seeds) | pick | test global % | "
           "test personalized % | test seeds |", "|---|---|---|---|---|---|"]
  for method, scores in validation.items():
    per_setting = "; ".join(f"{', '.join(setting) or 'default'}: {_pct(values)}"
                            for setting, values in sorted(scores.items()))
    tested = [e for e in test_entries if e["method"] == method and e.get("status") == "finished"]
    finals = [e.get("final") or {} for e in tested]
    lines.append(f"| {method} | {per_setting} | {', '.join(picks[method]) or 'default'} | "
                 f"{_pct([f.get('global_accuracy') for f in finals])} | "
                 f"{_pct([f.get('personalized_accuracy_mean') for f in finals])} | {len(tested)} |")
  return "\n".join(lines)


def _sweep(runs_dir: str, method: str, seeds: str, configs: list[str], sets: list[str], grids: tuple[str, ...],
           jobs: int) -> None:
  command = [sys.executable, "-m", "experiments.sweep", "--runs_dir", runs_dir, "--methods", method,
             "--seeds", seeds, "--jobs", str(jobs)]
  command += [f"--configs={c}" for c in configs] + [f"--set={s}" for s in sets] + [f"--grid={g}" for g in grids]
  subprocess.run(command, check=True)


def _entries(runs_dir: str) -> list[dict]:
  path = os.path.join(runs_dir, "index.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["runs"]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs_dir", default="runs/tune")
  parser.add_argument("--methods", default="fedit,flexlora,lora_fair,hyperlora,local_only")
  parser.add_argument("--configs", action="append", default=None, help="As experiments.sweep (repeatable).")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every run (repeatable).")
  parser.add_argument("--tune_seeds", default="0")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--validation_fraction", type=float, default=0.2)
  parser.add_argument("--metric", default=METRICS[0], choices=METRICS)
  parser.add_argument("--jobs", type=int, default=2)
  args = parser.parse_args(argv)
  configs = args.configs or ["configs/default.py"]
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in GRIDS]
  if unknown:
    parser.error(f"no tuning grid for {unknown}; grids exist for {sorted(GRIDS)}")
  validation_dir, test_dir = os.path.join(args.runs_dir, "validation"), os.path.join(args.runs_dir, "test")
  for method in methods:
    _sweep(validation_dir, method, args.tune_seeds, configs,
           args.set + [f"data.validation_fraction={args.validation_fraction}"], GRIDS[method], args.jobs)
  entries = _entries(validation_dir)
  validation = {m: validation_scores(entries, m, args.metric) for m in methods}
  picks = {m: pick(scores) for m, scores in validation.items()}
  for method in methods:
    _sweep(test_dir, method, args.seeds, configs, args.set + list(picks[method]), (), args.jobs)
  emit(tuning_table(validation, picks, _entries(test_dir), args.metric), os.path.join(args.runs_dir, "tuning.md"))


if __name__ == "__main__":
  main()
