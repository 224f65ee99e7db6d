"""Compares `make run`'s results with the table the README shows, on what reproduces across machines.

Runs on one machine are byte-identical; across machines floats differ (CPU model, XLA's
vectorization, the measured client chunk), so a fresh clone elsewhere gives accuracies a few
points away. What the check asks, and why:
- **MB up+down exactly** (to the table's 0.01 MB): byte counts follow from the shapes, the
  method and the sampled clients, which depend only on the seed: identical everywhere.
- **Global and mean personalized accuracy within `--tolerance`** (default 4 points): means over
  10 and 20 clients' test splits; the cross-machine differences seen are at most 2 points, and
  the 3-seed standard deviations in RESULTS.md 1-3.
- **The README's ranking by mean personalized accuracy** (HyperLoRA above FedIT, 11.2 points),
  whatever `--tolerance` is set to: the comparison the table is there to show (README gaps under
  1 point are not a ranking).
- **The worst client is printed, not checked** (unless `--worst_tolerance` is given): it is one
  client's test split of a few dozen examples, and fresh clones on 2-core machines gave 24.1 and
  34.5 for the same README row: no tolerance that still tests something covers that.
A run's figures are rounded as the table prints them (0.1 point, 0.01 MB) before comparing, so
`--tolerance 0 --worst_tolerance 0` asks for the identical table.

  python -m experiments.reports.check_readme --workdir runs/default           # after `make run`
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from experiments.runner import reporting

TABLE_HEADER = "== side by side (final round) =="
RANKING_GAP = 1.0  # Points: a smaller gap in the README's table is not a ranking it claims.
_ROW = re.compile(r"^(\S+)\s+(n/a|[\d.]+)%?\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)\b")


def readme_table(readme_text: str) -> dict[str, dict[str, float | None]]:
  """{method: {"global", "pers_mean", "pers_worst" (percent; global None for n/a), "mb"}} from
  the first side-by-side table in the README's text. Raises ValueError if there is none."""
  start = readme_text.find(TABLE_HEADER)
  if start < 0:
    raise ValueError(f"the README has no '{TABLE_HEADER}' table")
  rows = {}
  for line in readme_text[start:].splitlines()[2:]:
    match = _ROW.match(line.strip())
    if not match:
      break
    method, glob, mean, worst, mb = match.groups()
    rows[method] = {
      "global": None if glob == "n/a" else float(glob),
      "pers_mean": float(mean),
      "pers_worst": float(worst),
      "mb": float(mb),
    }
  if not rows:
    raise ValueError(f"the README's '{TABLE_HEADER}' table has no rows")
  return rows


def run_row(workdir: str) -> dict[str, float | None] | None:
  """The final evaluated round of one run, in the README's units (None: no finished round)."""
  records = [r for r in reporting.read_metrics(workdir) if r.get("personalized_accuracy_mean") is not None]
  if not records:
    return None
  last = records[-1]
  percent = lambda v: None if v is None else 100 * v
  return {
    "global": percent(last.get("global_accuracy")),
    "pers_mean": percent(last["personalized_accuracy_mean"]),
    "pers_worst": percent(last["personalized_accuracy_worst"]),
    "mb": last["cum_bytes"] / 1e6,
    "round": last["round"],
  }


def compare(expected: dict, measured: dict, tolerance: float, worst_tolerance: float | None = None) -> list[str]:
  """The differences beyond tolerance between the README's rows and the runs' ([] = agrees),
  the runs' figures rounded as the README prints them; the worst client only when
  `worst_tolerance` is given; the README's ranking by mean personalized accuracy where its gap
  is at least `RANKING_GAP` points."""
  problems = []
  for method, want in expected.items():
    got = measured.get(method)
    if got is None:
      problems.append(f"{method}: no finished run")
      continue
    got = {k: (None if v is None else round(v, 2 if k == "mb" else 1)) for k, v in got.items()}
    checked = (("global", tolerance), ("pers_mean", tolerance)) + (
      (("pers_worst", worst_tolerance),) if worst_tolerance is not None else ()
    )
    for key, allowed in checked:
      if (want[key] is None) != (got[key] is None):
        problems.append(f"{method} {key}: README {want[key]}, run {got[key]}")
      elif want[key] is not None and abs(got[key] - want[key]) > allowed + 1e-9:
        problems.append(
          f"{method} {key}: README {want[key]:.1f}%, run {got[key]:.1f}% "
          f"(|difference| {abs(got[key] - want[key]):.1f} > {allowed})"
        )
    if abs(got["mb"] - want["mb"]) > 1e-9:
      problems.append(f"{method} MB: README {want['mb']:.2f}, run {got['mb']:.2f} (bytes are exact counts)")
  for better, want_better in expected.items():
    for worse, want_worse in expected.items():
      gap = want_better["pers_mean"] - want_worse["pers_mean"]
      if (
        gap >= RANKING_GAP
        and better in measured
        and worse in measured
        and measured[better]["pers_mean"] <= measured[worse]["pers_mean"]
      ):
        problems.append(
          f"ranking: the README has {better} {gap:.1f} points above {worse} in mean personalized "
          f"accuracy; the runs have {measured[better]['pers_mean']:.1f} against "
          f"{measured[worse]['pers_mean']:.1f}"
        )
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/default", help="make run's workdir (one subdirectory per method).")
  parser.add_argument("--readme", default="README.md")
  parser.add_argument("--tolerance", type=float, default=4.0, help="Points allowed on global and mean accuracy.")
  parser.add_argument(
    "--worst_tolerance",
    type=float,
    default=None,
    help="Points allowed on the worst client (default: printed, not checked).",
  )
  args = parser.parse_args(argv)
  with open(args.readme) as f:
    expected = readme_table(f.read())
  measured = {}
  for method in expected:
    path = os.path.join(args.workdir, method)
    row = run_row(path) if os.path.isdir(path) else None
    if row is not None:
      measured[method] = row
  for method, row in measured.items():
    want = expected[method]
    print(
      f"{method:12s} README {want['global']} / {want['pers_mean']} / {want['pers_worst']} / {want['mb']} MB;"
      f" run (round {row['round']}) "
      + " / ".join("n/a" if row[k] is None else f"{row[k]:.1f}" for k in ("global", "pers_mean", "pers_worst"))
      + f" / {row['mb']:.2f} MB"
    )
  problems = compare(expected, measured, args.tolerance, args.worst_tolerance)
  if problems:
    print("The runs differ from the README's table beyond tolerance:\n  " + "\n  ".join(problems))
    return 1
  worst = "not checked" if args.worst_tolerance is None else f"within {args.worst_tolerance}"
  print(
    f"The runs agree with the README's table (global and mean personalized accuracy within "
    f"{args.tolerance} points, its ranking by personalized accuracy, MB exact; worst client {worst})."
  )
  return 0


if __name__ == "__main__":
  from experiments import cli

  cli.run(lambda: sys.exit(main()))
