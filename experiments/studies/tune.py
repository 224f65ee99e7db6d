"""Fair tuning: the same grid budget for every method, picked on a validation split, then tested.

  python -m experiments.studies.tune --runs_dir runs/tune --jobs 2 --methods fedit,flexlora,hyperlora,local_only

1. Validation. Each method runs its grid (`GRIDS`: 4 settings each, the client learning rate
   and the method's own key knob) on `--tune_seeds` with `data.validation_fraction` (0.2):
   every evaluation reads examples held out of the clients' training data, never the test split.
2. Pick. Per method, the setting with the best final `--metric` (mean personalized accuracy by
   default, the same criterion for every method), averaged over the tuning seeds.
3. Test. Each method with its pick on `--seeds`, on the test split.

Writes RUNS_DIR/tuning.md: per method, every setting's validation score, the pick, and the
pick's test accuracies (mean ± std over seeds). Rerunning resumes: finished runs are skipped
(`experiments.sweep`). `--set` and `--configs` apply to every run of both phases.

`--grid METHOD:FIELD=V1,V2` (repeatable) replaces METHOD's grid in `GRIDS` by the given axes,
e.g. to tune the client lr at a knob fixed by earlier tuning:

  python -m experiments.studies.tune --methods fedit,hyperlora \
      --grid fedit:client_optimizer.learning_rate=1e-3,3e-3,1e-2 \
      --grid hyperlora:client_optimizer.learning_rate=1e-3,3e-3,1e-2 \
      --grid hyperlora:generator.optimizer.learning_rate=1e-4

`--reuse DIR` (repeatable): a test run whose config equals that of a run already finished under
DIR (for a pick that is a method's default, say) is linked to it instead of run again.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from absl import logging

from experiments import sweep
from experiments.reports.report import emit, find_runs
from experiments.runner import reporting
from experiments.runner.workdir import config_differences

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


def validation_scores(
  entries: list[dict], method: str, metric: str, grid: tuple[str, ...] | None = None
) -> dict[tuple[str, ...], list[float]]:
  """{setting: [final `metric` of each finished tuning seed]} for `method`, whose grid is `grid`
  (default: `GRIDS[method]`)."""
  fields = grid_fields(GRIDS[method] if grid is None else grid)
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


def tuning_table(
  validation: dict[str, dict], picks: dict[str, tuple[str, ...]], test_entries: list[dict], metric: str
) -> str:
  """Markdown: method | validation score of each setting | pick | test global | test personalized."""
  lines = [
    f"| method | validation {metric} % per setting (tuning seeds) | pick | test global % | "
    "test personalized % | test seeds |",
    "|---|---|---|---|---|---|",
  ]
  for method, scores in validation.items():
    per_setting = "; ".join(
      f"{', '.join(setting) or 'default'}: {_pct(values)}" for setting, values in sorted(scores.items())
    )
    tested = [e for e in test_entries if e["method"] == method and e.get("status") == "finished"]
    finals = [e.get("final") or {} for e in tested]
    lines.append(
      f"| {method} | {per_setting} | {', '.join(picks[method]) or 'default'} | "
      f"{_pct([f.get('global_accuracy') for f in finals])} | "
      f"{_pct([f.get('personalized_accuracy_mean') for f in finals])} | {len(tested)} |"
    )
  return "\n".join(lines)


def grids_with_overrides(specs: list[str]) -> dict[str, tuple[str, ...]]:
  """`GRIDS` with each method named in `specs` ('METHOD:FIELD=V1,V2,...') given exactly the
  axes named for it, in order."""
  replaced: dict[str, list[str]] = {}
  for spec in specs:
    method, sep, axis = spec.partition(":")
    if not sep or "=" not in axis or not axis.split("=", 1)[1]:
      raise ValueError(f"--grid {spec}: expected METHOD:FIELD=V1,V2,...")
    replaced.setdefault(method, []).append(axis)
  return {**GRIDS, **{method: tuple(axes) for method, axes in replaced.items()}}


def link_finished_twins(specs: list, runs_dir: str, reuse_dirs: list[str], log=print) -> int:
  """For each sweep `RunSpec` whose workdir under `runs_dir` does not exist yet, links it to a
  finished run under one of `reuse_dirs` with the same config (`workdir.config_differences` finds
  none, and it has reached the spec's `fed.num_rounds`). Returns how many were linked."""
  rounds_done = {}  # Each candidate's metrics are read once, not once per spec.
  for workdir in (w for d in reuse_dirs for w in find_runs(d)):
    records = reporting.read_metrics(workdir)
    rounds_done[workdir] = records[-1]["round"] if records else 0
  linked = 0
  for spec in specs:
    config = sweep.make_config(spec)
    workdir = sweep.workdir_of(runs_dir, config.benchmark, spec)
    if os.path.lexists(workdir):
      continue
    twin = next(
      (c for c, done in rounds_done.items() if done >= config.fed.num_rounds and not config_differences(c, config)),
      None,
    )
    if twin is not None:
      os.makedirs(os.path.dirname(workdir), exist_ok=True)
      os.symlink(os.path.abspath(twin), workdir)
      log(f"tune: {workdir} -> {twin} (same config, finished)")
      linked += 1
  return linked


def _sweep(runs_dir: str, specs: list, jobs: int) -> None:
  """Every method's runs in one sweep, so `jobs` stay busy until the last run (one sweep per
  method would leave workers idle at each method's end)."""
  sweep.raise_if_failed(sweep.run_sweep(specs, runs_dir, jobs), runs_dir)


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
  parser.add_argument(
    "--grid",
    action="append",
    default=[],
    help="METHOD:FIELD=V1,V2,... replaces METHOD's grid by these axes (repeatable).",
  )
  parser.add_argument(
    "--reuse",
    action="append",
    default=[],
    help="A runs dir whose finished runs stand in for test runs of the same config (repeatable).",
  )
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # As experiments.sweep: the runs' own logs stay quiet.
  configs = args.configs or ["configs/default.py"]
  methods = [m for m in args.methods.split(",") if m]
  try:
    grids = grids_with_overrides(args.grid)
  except ValueError as error:
    parser.error(str(error))
  unknown = [m for m in methods if m not in grids]
  if unknown:
    parser.error(f"no tuning grid for {unknown}; grids exist for {sorted(grids)}")
  validation_dir, test_dir = os.path.join(args.runs_dir, "validation"), os.path.join(args.runs_dir, "test")
  tune_seeds, seeds = ([int(s) for s in text.split(",")] for text in (args.tune_seeds, args.seeds))
  holdout = args.set + [f"data.validation_fraction={args.validation_fraction}"]
  _sweep(
    validation_dir,
    [spec for m in methods for spec in sweep.expand(configs, [m], tune_seeds, holdout, list(grids[m]))],
    args.jobs,
  )
  entries = _entries(validation_dir)
  validation = {m: validation_scores(entries, m, args.metric, grids[m]) for m in methods}
  picks = {m: pick(scores) for m, scores in validation.items()}
  test_specs = [spec for m in methods for spec in sweep.expand(configs, [m], seeds, args.set + list(picks[m]), [])]
  if args.reuse:
    link_finished_twins(test_specs, test_dir, args.reuse)
  _sweep(test_dir, test_specs, args.jobs)
  emit(tuning_table(validation, picks, _entries(test_dir), args.metric), os.path.join(args.runs_dir, "tuning.md"))


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
