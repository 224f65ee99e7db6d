"""The paper's claims against a sweep's runs: claim → setting → measured → confirmed or not.

  python -m experiments.sweep --configs configs/default.py --seeds 0,1,2 \
      --methods fedit,hyperlora,local_only,centralized --set fed.num_rounds=100 --set eval_every=5 \
      --runs_dir runs/converge --jobs 2
  python -m experiments.claims runs/converge --targets 0.3,0.35 --out runs/converge/claims.md

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
    the global model, same rule.
Robustness to distribution shift needs runs at several shift severities; it is listed as not
measured unless a `--shift` sweep's benchmarks are given (not built yet).
"""
from __future__ import annotations

import argparse
import collections

import numpy as np

from experiments.report import emit, final_metrics, find_runs
from hyperlora_jax import reporting


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
  return f"{scale * np.mean(values):.{digits}f} ± {scale * np.std(values):.{digits}f}"


def rounds_claim(method_runs: list[dict], reference_runs: list[dict], target: float, key: str,
                 claimed_speedup: float) -> tuple[str, str]:
  """(measured, verdict) for "the method reaches `target` of `key` in (1 − speed-up) of the
  reference's rounds". Runs are `report.final_metrics` rows (their "records" evaluated)."""
  def reached(runs):
    return [reporting.rounds_to_reach(r["records"], target, key) for r in runs]
  mine, theirs = reached(method_runs), reached(reference_runs)
  measured = (f"{_summary(mine)} vs {_summary(theirs)} rounds")
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


def gain_claim(mine: list[float], theirs: list[float]) -> tuple[str, str]:
  """(measured, verdict) for "`mine` is above `theirs`": the gain in points and relative %;
  confirmed when it is positive and larger than the pooled std of the two groups."""
  if not mine or not theirs:
    return "n/a", "not measured"
  gain = np.mean(mine) - np.mean(theirs)
  pooled = float(np.sqrt((np.var(mine) + np.var(theirs)) / 2))
  measured = (f"{_mean_std(mine, 100)} vs {_mean_std(theirs, 100)}: {100 * gain:+.1f} points "
              f"({100 * gain / np.mean(theirs):+.0f}%)")
  return measured, "confirmed" if gain > pooled and gain > 0 else "not confirmed"


def claims_table(rows: list[dict], method: str, reference: str, targets: list[float],
                 centralized_fractions: list[float], claimed_speedup: float) -> str:
  """Markdown: one line per (claim, benchmark, setting)."""
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
      all_targets += [(f"{100 * f:.0f}% of centralized's global ({100 * f * np.mean(central):.1f}%)",
                       f * np.mean(central))
                      for f in centralized_fractions]
    rounds = min((r["rounds"] for r in group), default=0)
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy_mean", "personalized mean")):
      for name, target in all_targets:
        measured, verdict = rounds_claim(mine, theirs, target, key, claimed_speedup)
        lines.append(f"| {100 * claimed_speedup:.0f}% faster convergence ({label}) | {benchmark} | "
                     f"{method} vs {reference}, rounds until {label} ≥ {name}, {rounds} rounds | {measured} | "
                     f"{verdict} |")
    for other in (reference, "local_only"):
      measured, verdict = gain_claim([r["pers_mean"] for r in mine], [r["pers_mean"] for r in by_method.get(other, [])])
      lines.append(f"| personalization gain (up to 20%) | {benchmark} | {method} vs {other}, final personalized "
                   f"mean | {measured} | {verdict} |")
    generated = [r["new_client_generated"] for r in mine if r.get("new_client_generated") is not None]
    global_start = [r["new_client_global"] for r in mine if r.get("new_client_global") is not None]
    measured, verdict = gain_claim(generated, global_start)
    lines.append(f"| new clients served by the generator | {benchmark} | {method}: generated start vs global, "
                 f"0 local steps | {measured} | {verdict} |")
    lines.append(f"| robustness to distribution shift | {benchmark} | needs runs at several shift "
                 f"severities | – | not measured |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dir")
  parser.add_argument("--method", default="hyperlora")
  parser.add_argument("--reference", default="fedit")
  parser.add_argument("--targets", default="0.3", help="Comma-separated absolute accuracy targets.")
  parser.add_argument("--centralized_fractions", default="0.9", help="Targets as fractions of centralized.")
  parser.add_argument("--claimed_speedup", type=float, default=0.3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = [row for row in map(final_metrics, find_runs(args.runs_dir)) if row is not None]
  floats = lambda text: [float(v) for v in text.split(",") if v]
  emit(claims_table(rows, args.method, args.reference, floats(args.targets), floats(args.centralized_fractions),
                    args.claimed_speedup), args.out)


if __name__ == "__main__":
  main()
