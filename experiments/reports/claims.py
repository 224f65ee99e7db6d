"""The paper's claims against a sweep's runs: claim → setting → measured → confirmed or not.

  python -m experiments.sweep --configs configs/default.py --seeds 0,1,2 \
      --methods fedit,hyperlora,local_only,centralized --set fed.num_rounds=100 --set eval_every=5 \
      --runs_dir runs/converge --jobs 2
  python -m experiments.reports.claims runs/converge --targets 0.3,0.35 --out runs/converge/claims.md

Per benchmark of RUNS_DIR (finished runs, `report.final_metrics`), with HyperLoRA (`--method`)
against FedIT (`--reference`), mean ± std over seeds:

  * "about 30% faster convergence": rounds until the global accuracy, and separately the mean
    personalized accuracy, first reaches each target: the `--targets` (absolute) and
    `--centralized_fractions` of the centralized run's final global accuracy (mean over its
    seeds). The speed-up is 1 − rounds(method) / rounds(reference) over the seeds both reach.
    Confirmed when every seed of both reaches the target and the speed-up is at least
    `--claimed_speedup`; "not reached" when a seed of either does not.
  * "personalization gains of up to 20%": final mean personalized accuracy of the method against
    the reference and against local-only (points and relative %). Confirmed when the gain is
    positive and larger than the two groups' pooled std.
  * new clients (runs with held-out clients): the generated start (zero local steps) against
    the method's own global model, and against the reference's global model, both without local
    steps and both fine-tuned by the same local steps; same rule.
  * the plateau criterion (`--plateau_window W`, `--plateau_tolerance T`): each run's change of
    global and mean personalized accuracy over its last W rounds (final value minus the value
    evaluated W rounds before the end); a method has plateaued on a benchmark when the mean
    change over seeds is below T (default 1 point; a fall counts as flat). A separate table.
  * robustness to distribution shift (`--shift SHIFT_RUNS_DIR --shift_field FIELD`): a sweep
    over one config field that sets the shift's severity (e.g. `data.dirichlet_alpha`, more severe
    when lower: `--severe_when lower`). Per severity, the method's final accuracy against the
    reference's; then each one's drop from the mildest to the most severe setting (mean over seeds
    at the one minus mean at the other). Confirmed when the reference's drop exceeds the method's
    by more than the pooled std of the four groups (method and reference, mildest and most severe).
    Without `--shift` the row says "not measured".

  python -m experiments.sweep --runs_dir runs/shift --jobs 2 --methods fedit,hyperlora --seeds 0,1,2 \
      --grid data.dirichlet_alpha=1.0,0.5,0.1
  python -m experiments.reports.claims runs/converge --shift runs/shift --shift_field data.dirichlet_alpha
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from experiments.reports.report import emit, finished_runs
from experiments.runner import reporting


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
  return f"{scale * np.mean(values):.{digits}f} ± {scale * np.std(values):.{digits}f}"


def rounds_claim(
  method_runs: list[dict], reference_runs: list[dict], target: float, key: str, claimed_speedup: float
) -> tuple[str, str]:
  """(measured, verdict) for "the method reaches `target` of `key` in (1 − speed-up) of the
  reference's rounds". Runs are `report.final_metrics` rows (their "records" evaluated)."""

  def reached(runs):
    return [reporting.rounds_to_reach(r["records"], target, key) for r in runs]

  mine, theirs = reached(method_runs), reached(reference_runs)
  measured = f"{_summary(mine)} vs {_summary(theirs)} rounds"
  if None in mine or None in theirs or not mine or not theirs:
    return measured, "not reached"
  speedup = 1.0 - np.mean(mine) / np.mean(theirs)
  measured += f" (speed-up {100 * speedup:.0f}%)"
  return measured, "confirmed" if speedup >= claimed_speedup else "not confirmed"


def _summary(rounds: list[int | None]) -> str:
  hit = [r for r in rounds if r is not None]
  if not hit:
    return f"none of {len(rounds)}"
  text = _mean_std(hit)
  return text if len(hit) == len(rounds) else f"{text} ({len(hit)}/{len(rounds)})"


def _points(change: float) -> str:
  """A change in accuracy as signed points, "+0.0" for none (never "-0.0")."""
  return f"{round(100 * change, 1) + 0.0:+.1f}"


def gain_claim(mine: list[float], theirs: list[float]) -> tuple[str, str]:
  """(measured, verdict) for "`mine` is above `theirs`": the gain in points and relative %;
  confirmed when it is positive and larger than the pooled std of the two groups."""
  if not mine or not theirs:
    return "n/a", "not measured"
  gain = np.mean(mine) - np.mean(theirs)
  pooled = float(np.sqrt((np.var(mine) + np.var(theirs)) / 2))
  measured = (
    f"{_mean_std(mine, 100)} vs {_mean_std(theirs, 100)}: {100 * gain:+.1f} points "
    f"({100 * gain / np.mean(theirs):+.0f}%)"
  )
  return measured, "confirmed" if gain > pooled and gain > 0 else "not confirmed"


def config_value(config: dict, field: str):
  """`config`'s value at a dotted `field`, e.g. "data.dirichlet_alpha"."""
  for part in field.split("."):
    config = config[part]
  return config


def shift_rows(runs_dir: str, field: str) -> list[dict]:
  """`report.final_metrics` rows of RUNS_DIR's finished runs, each with its "severity": the
  value of `field` in the run's config."""
  return [{**row, "severity": config_value(row["config"], field)} for row in finished_runs(runs_dir)]


def shift_claim(rows: list[dict], method: str, reference: str, field: str, severe_when_lower: bool) -> list[str]:
  """Markdown lines for "the method is more robust to shift than the reference", from `shift_rows`
  (one benchmark): per severity (mildest first) and per accuracy (global, personalized mean),
  the method against the reference, then the verdict on their drops (module docstring)."""
  lines = []
  levels = sorted({r["severity"] for r in rows}, reverse=severe_when_lower)
  benchmark = ", ".join(sorted({r["benchmark"] for r in rows}))
  for key, label in (("global", "global"), ("pers_mean", "personalized mean")):

    def values(name, level):
      return [r[key] for r in rows if r["method"] == name and r["severity"] == level and r[key] is not None]

    for level in levels:
      measured, _ = gain_claim(values(method, level), values(reference, level))
      lines.append(
        f"| robustness to shift ({label}) | {benchmark} | {field}={level}: {method} vs {reference}, "
        f"final {label} | {measured} | – |"
      )
    mild, severe = (levels[0], levels[-1]) if levels else (None, None)
    groups = [values(name, level) for name in (method, reference) for level in (mild, severe)]
    if len(levels) < 2 or not all(groups):
      lines.append(f"| robustness to shift ({label}) | {benchmark} | drop | n/a | not measured |")
      continue
    mine, theirs = (np.mean(groups[0]) - np.mean(groups[1]), np.mean(groups[2]) - np.mean(groups[3]))
    pooled = float(np.sqrt(np.mean([np.var(g) for g in groups])))
    verdict = "confirmed" if theirs - mine > pooled else "not confirmed"
    lines.append(
      f"| robustness to shift ({label}) | {benchmark} | drop from {field}={mild} to {severe} | "
      f"{method} {_points(-mine)} vs {reference} {_points(-theirs)} points (pooled std "
      f"{100 * pooled:.1f}) | {verdict} |"
    )
  return lines


def accuracy_change(records: list[dict], key: str, window: int) -> float | None:
  """`key` at the last evaluated round minus `key` at the last evaluated round ≤ (last − window);
  None where either is missing."""
  evaluated = [r for r in records if r.get(key) is not None]
  if not evaluated:
    return None
  last = evaluated[-1]
  before = [r for r in evaluated if r["round"] <= last["round"] - window]
  return last[key] - before[-1][key] if before else None


def plateau_table(rows: list[dict], window: int, tolerance: float) -> str:
  """Markdown: per benchmark and method, the change over the last `window` rounds (mean ± std
  over seeds, points) of global and personalized mean accuracy, and whether both are below
  `tolerance` (a fraction, 0.01 = 1 point)."""
  lines = [
    f"| benchmark | method | global change, last {window} rounds | personalized change | plateaued "
    f"(< {100 * tolerance:g} point) |",
    "|---|---|---|---|---|",
  ]
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["benchmark"], row["method"])].append(row)
  for (benchmark, method), group in sorted(groups.items()):
    cells, flat = [], True
    for key in ("global_accuracy", "personalized_accuracy_mean"):
      changes = [c for c in (accuracy_change(r["records"], key, window) for r in group) if c is not None]
      cells.append(f"{_points(np.mean(changes))} ± {100 * np.std(changes):.1f}" if changes else "–")
      flat = flat and (not changes or np.mean(changes) < tolerance)
    lines.append(f"| {benchmark} | {method} | {cells[0]} | {cells[1]} | {'yes' if flat else 'no'} |")
  return "\n".join(lines)


def claims_table(
  rows: list[dict],
  method: str,
  reference: str,
  targets: list[float],
  centralized_fractions: list[float],
  claimed_speedup: float,
  shift_lines: list[str] | None = None,
) -> str:
  """Markdown: one line per (claim, benchmark, setting); `shift_lines` (from `shift_claim`) replace
  each benchmark's "robustness to shift: not measured" line by one block at the end."""
  lines = ["| claim | benchmark | setting | measured (mean ± std over seeds) | verdict |", "|---|---|---|---|---|"]
  benchmarks = collections.defaultdict(list)
  for row in rows:
    benchmarks[row["benchmark"]].append(row)
  for benchmark, group in sorted(benchmarks.items()):
    by_method = collections.defaultdict(list)
    for row in group:
      by_method[row["method"]].append(row)
    mine, theirs = by_method.get(method, []), by_method.get(reference, [])
    all_targets = [(f"{100 * t:.0f}%", t) for t in targets]
    central = [r["global"] for r in by_method.get("centralized", []) if r["global"] is not None]
    if central:
      all_targets += [
        (f"{100 * f:.0f}% of centralized's global ({100 * f * np.mean(central):.1f}%)", f * np.mean(central))
        for f in centralized_fractions
      ]
    rounds = min((r["rounds"] for r in group), default=0)
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy_mean", "personalized mean")):
      for name, target in all_targets:
        measured, verdict = rounds_claim(mine, theirs, target, key, claimed_speedup)
        lines.append(
          f"| {100 * claimed_speedup:.0f}% faster convergence ({label}) | {benchmark} | "
          f"{method} vs {reference}, rounds until {label} ≥ {name}, {rounds} rounds | {measured} | "
          f"{verdict} |"
        )
    for other in (reference, "local_only"):
      measured, verdict = gain_claim([r["pers_mean"] for r in mine], [r["pers_mean"] for r in by_method.get(other, [])])
      lines.append(
        f"| personalization gain (up to 20%) | {benchmark} | {method} vs {other}, final personalized "
        f"mean | {measured} | {verdict} |"
      )
    generated = [r["new_client_generated"] for r in mine if r.get("new_client_generated") is not None]
    global_start = [r["new_client_global"] for r in mine if r.get("new_client_global") is not None]
    measured, verdict = gain_claim(generated, global_start)
    lines.append(
      f"| new clients served by the generator | {benchmark} | {method}: generated start vs global, "
      f"0 local steps | {measured} | {verdict} |"
    )
    for mine_key, theirs_key, setting in (
      ("new_client_generated", "new_client_global", "0 local steps"),
      ("new_client_generated_finetuned", "new_client_global_finetuned", "both fine-tuned by the same local steps"),
    ):
      if generated:
        measured, verdict = gain_claim(
          [r[mine_key] for r in mine if r.get(mine_key) is not None],
          [r[theirs_key] for r in theirs if r.get(theirs_key) is not None],
        )
        lines.append(
          f"| new clients served by the generator | {benchmark} | {method}'s generated start vs "
          f"{reference}'s global, {setting} | {measured} | {verdict} |"
        )
    if shift_lines is None:
      lines.append(
        f"| robustness to distribution shift | {benchmark} | needs runs at several shift "
        f"severities (`--shift`) | – | not measured |"
      )
  return "\n".join(lines + (shift_lines or []))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dir")
  parser.add_argument("--method", default="hyperlora")
  parser.add_argument("--reference", default="fedit")
  parser.add_argument("--targets", default="0.3", help="Comma-separated absolute accuracy targets.")
  parser.add_argument("--centralized_fractions", default="0.9", help="Targets as fractions of centralized.")
  parser.add_argument("--claimed_speedup", type=float, default=0.3)
  parser.add_argument("--shift", default=None, help="A sweep over --shift_field's severities.")
  parser.add_argument("--shift_field", default="data.dirichlet_alpha")
  parser.add_argument("--severe_when", choices=("lower", "higher"), default="lower")
  parser.add_argument("--plateau_window", type=int, default=20)
  parser.add_argument("--plateau_tolerance", type=float, default=0.01)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = finished_runs(args.runs_dir)
  floats = lambda text: [float(v) for v in text.split(",") if v]
  shift_lines = None
  if args.shift:
    shift_lines = shift_claim(
      shift_rows(args.shift, args.shift_field),
      args.method,
      args.reference,
      args.shift_field,
      args.severe_when == "lower",
    )
  emit(
    claims_table(
      rows,
      args.method,
      args.reference,
      floats(args.targets),
      floats(args.centralized_fractions),
      args.claimed_speedup,
      shift_lines,
    )
    + "\n\nPlateau criterion:\n\n"
    + plateau_table(rows, args.plateau_window, args.plateau_tolerance),
    args.out,
  )


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
