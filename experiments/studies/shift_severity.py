"""Robustness to test-time feature shift, by severity: finished runs on corrupted test images.

  python -m experiments.studies.shift_severity runs/claims_slowgen --benchmark default \\
      --methods fedit,hyperlora,local_only --out runs/shift_severity_default.md

Every finished run under RUNS_DIR (links followed; its config rebuilt from its `config.json`)
is restored at its last checkpoint, with no training, and evaluated as the run evaluates
(`evaluation.run_evaluator`): its global model on the union of the clients' test splits, and each
client's personalized model on its own split. The test images are first corrupted by each of
`--kinds` (`experiments.runner.data.corruptions`: Gaussian noise, contrast) at severity 0 to 5; the
same corrupted images for every model. Severity 0 is the run's own last evaluation: its
difference from `metrics.jsonl`'s last record is printed, and is 0 on the machine that ran it.

Prints per (benchmark, kind) a table of accuracy % by severity (mean ± std over seeds), with
the drop from severity 0 to 5 and what is kept (the accuracy at 5 as a share of the clean one,
which does not penalize a model for starting higher), then the claim lines of
`experiments.reports.claims.shift_claim` ("--method is more robust than --reference": confirmed when
the reference's drop exceeds the method's by more than their pooled std), for the global model
and for the personalized models' mean. With `--out F.md`, each run's accuracies are kept in
F.json as they are measured, and a later call evaluates only the runs not in it yet.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import jax
import ml_collections
import numpy as np

from experiments.reports.claims import shift_claim
from experiments.reports.report import emit, final_metrics, find_runs
from experiments.runner import workdir as workdir_lib
from experiments.runner.evaluation import run_evaluator
from experiments.runner.data import corruptions


def severity_accuracies(
  config: ml_collections.ConfigDict, workdir: str, kinds: tuple[str, ...], seed: int = 0
) -> dict[tuple[str, int], tuple[float, float]]:
  """{(kind, severity): (global accuracy (NaN without a global model), personalized mean
  accuracy over the clients with test examples)} of `workdir`'s last checkpoint, severities
  0..`corruptions.SEVERITY_LEVELS` of each kind (severity 0 is evaluated once, under every kind)."""
  exp, state, _ = workdir_lib.restore_run(config, workdir)
  frozen = exp.frozen()
  evaluate = run_evaluator(exp)
  has_test = exp.data.has_test_examples()

  def accuracies(transform):
    global_accuracy, per_client = evaluate(state, frozen, transform)()
    return global_accuracy, float(per_client[has_test].mean())

  clean = accuracies(None)
  out = {}
  for kind in kinds:
    out[(kind, 0)] = clean
    for severity in range(1, corruptions.SEVERITY_LEVELS + 1):
      out[(kind, severity)] = accuracies(
        lambda images, kind=kind, severity=severity: corruptions.corrupt(images, kind, severity, seed)
      )
  jax.clear_caches()  # The next run compiles its own evaluation; free this one's.
  return out


def severity_table(rows: list[dict], kind: str) -> str:
  """Markdown: method × severity, global and personalized mean accuracy % (mean ± std over
  the runs), from rows {"method", "kind", "severity", "global", "pers_mean"}."""
  levels = sorted({r["severity"] for r in rows if r["kind"] == kind})
  lines = [
    f"| method | accuracy | {' | '.join(f'severity {s}' for s in levels)} | drop 0 → {levels[-1]} | "
    f"kept at {levels[-1]} |",
    "|---|---|" + "---|" * (len(levels) + 2),
  ]
  for method in sorted({r["method"] for r in rows}):
    for key, label in (("global", "global"), ("pers_mean", "personalized mean")):
      by_level = [
        [
          r[key]
          for r in rows
          if r["method"] == method and r["kind"] == kind and r["severity"] == s and not np.isnan(r[key])
        ]
        for s in levels
      ]
      if not all(by_level):
        continue
      cells = [f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" for v in by_level]
      clean, severe = np.mean(by_level[0]), np.mean(by_level[-1])
      lines.append(
        f"| {method} | {label} | {' | '.join(cells)} | {100 * (clean - severe):.1f} | {100 * severe / clean:.0f}% |"
      )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dir")
  parser.add_argument("--benchmark", default=None, help="Only runs of this config.benchmark.")
  parser.add_argument("--methods", default="fedit,hyperlora,local_only")
  parser.add_argument("--kinds", default=",".join(corruptions.KINDS))
  parser.add_argument("--method", default="hyperlora", help="The claim's method.")
  parser.add_argument("--reference", default="fedit", help="The claim's reference.")
  parser.add_argument("--out", default=None, help="Also write the markdown here.")
  args = parser.parse_args(argv)
  methods, kinds = args.methods.split(","), tuple(args.kinds.split(","))
  rows_file = os.path.splitext(args.out)[0] + ".json" if args.out else None
  done = _read_rows(rows_file)  # Runs evaluated by an earlier, interrupted call are not redone.
  rows, checks = [], []
  for workdir in find_runs(args.runs_dir):
    final = final_metrics(workdir)
    if final is None or final["method"] not in methods or (args.benchmark and final["benchmark"] != args.benchmark):
      continue
    mine = [r for r in done if r["workdir"] == workdir and r["kind"] in kinds]
    if len(mine) < len(kinds) * (corruptions.SEVERITY_LEVELS + 1):
      measured = severity_accuracies(workdir_lib.recorded_config(workdir), workdir, kinds)
      mine = [
        {
          "workdir": workdir,
          "benchmark": final["benchmark"],
          "method": final["method"],
          "seed": final["seed"],
          "kind": kind,
          "severity": severity,
          "global": g,
          "pers_mean": p,
        }
        for (kind, severity), (g, p) in measured.items()
      ]
      done += mine
      _write_rows(rows_file, done)
    rows += mine
    clean = next(r for r in mine if r["severity"] == 0)
    checks.append(
      f"| {workdir} | {100 * (clean['global'] - (final['global'] or np.nan)):+.2f} | "
      f"{100 * (clean['pers_mean'] - final['pers_mean']):+.2f} |"
    )
    print(checks[-1], flush=True)
  if not rows:
    raise SystemExit(f"no finished run of {methods} under {args.runs_dir}")
  sections = [
    "Severity 0 against the run's last logged evaluation (points; global, personalized mean):\n\n"
    "| workdir | global | personalized |\n|---|---|---|\n" + "\n".join(checks)
  ]
  by_group = collections.defaultdict(list)
  for row in rows:
    by_group[(row["benchmark"], row["kind"])].append(row)
  for (benchmark, kind), group in sorted(by_group.items()):
    most_severe = f"severity={max(r['severity'] for r in group)}:"
    claim = [
      line
      for line in shift_claim(group, args.method, args.reference, f"{kind} severity", False)
      if most_severe in line or "| drop" in line
    ]  # The tables above hold the other levels.
    sections.append(
      f"## {benchmark}: {kind}\n\n{severity_table(group, kind)}\n\n"
      "| claim | setting | measured | verdict |\n|---|---|---|---|\n" + "\n".join(claim)
    )
  emit("\n\n".join(sections), args.out)


def _read_rows(path: str | None) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def _write_rows(path: str | None, rows: list[dict]) -> None:
  """Atomically, so an interrupted call leaves the last complete file."""
  if path:
    with open(path + ".tmp", "w") as f:
      json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
