"""Compares `make run`'s results with the table the README shows, within stated tolerances.

Floats differ across machines (CPU model, XLA's vectorization), so a fresh clone elsewhere gives
accuracies a few points away from the README's; runs on one machine are byte-identical. The
check therefore allows, in accuracy points: `--tolerance` for the global and mean personalized
accuracy (default 4: above the 3-seed standard deviations in RESULTS.md, 1-3 points, and the
cross-machine differences seen so far, at most 2 points), and `--worst_tolerance` for the worst
client (default 8: one client's test split, a few dozen examples, moves most; up to 3.5 points
seen across machines). Communicated MB are exact counts and must match to the table's 0.01 MB.
A run's figures are rounded as the table prints them (0.1 point, 0.01 MB) before comparing, so
`--tolerance 0 --worst_tolerance 0` asks for the identical table.

  python -m experiments.check_readme --workdir runs/default           # after `make run`
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from hyperlora_jax import reporting

TABLE_HEADER = "== side by side (final round) =="
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
    rows[method] = {"global": None if glob == "n/a" else float(glob), "pers_mean": float(mean),
                    "pers_worst": float(worst), "mb": float(mb)}
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
  return {"global": percent(last.get("global_accuracy")), "pers_mean": percent(last["personalized_accuracy_mean"]),
          "pers_worst": percent(last["personalized_accuracy_worst"]), "mb": last["cum_bytes"] / 1e6,
          "round": last["round"]}


def compare(expected: dict, measured: dict, tolerance: float, worst_tolerance: float) -> list[str]:
  """The differences beyond tolerance between the README's rows and the runs' ([] = agrees),
  the runs' figures rounded as the README prints them."""
  problems = []
  for method, want in expected.items():
    got = measured.get(method)
    if got is None:
      problems.append(f"{method}: no finished run")
      continue
    got = {k: (None if v is None else round(v, 2 if k == "mb" else 1)) for k, v in got.items()}
    for key, allowed in (("global", tolerance), ("pers_mean", tolerance), ("pers_worst", worst_tolerance)):
      if (want[key] is None) != (got[key] is None):
        problems.append(f"{method} {key}: README {want[key]}, run {got[key]}")
      elif want[key] is not None and abs(got[key] - want[key]) > allowed + 1e-9:
        problems.append(f"{method} {key}: README {want[key]:.1f}%, run {got[key]:.1f}% "
                        f"(|difference| {abs(got[key] - want[key]):.1f} > {allowed})")
    if abs(got["mb"] - want["mb"]) > 1e-9:
      problems.append(f"{method} MB: README {want['mb']:.2f}, run {got['mb']:.2f} (bytes are exact counts)")
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/default", help="make run's workdir (one subdirectory per method).")
  parser.add_argument("--readme", default="README.md")
  parser.add_argument("--tolerance", type=float, default=4.0, help="Points allowed on global and mean accuracy.")
  parser.add_argument("--worst_tolerance", type=float, default=8.0, help="Points allowed on the worst client.")
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
    print(f"{method:12s} README {want['global']} / {want['pers_mean']} / {want['pers_worst']} / {want['mb']} MB;"
          f" run (round {row['round']}) " + " / ".join(
              "n/a" if row[k] is None else f"{row[k]:.1f}" for k in ("global", "pers_mean", "pers_worst"))
          + f" / {row['mb']:.2f} MB")
  problems = compare(expected, measured, args.tolerance, args.worst_tolerance)
  if problems:
    print("The runs differ from the README's table beyond tolerance:\n  " + "\n  ".join(problems))
    return 1
  print(f"The runs agree with the README's table (accuracy within {args.tolerance} points, worst client "
        f"within {args.worst_tolerance}, MB exact).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
