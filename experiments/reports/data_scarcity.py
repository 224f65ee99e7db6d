"""Accuracy against training examples per client: where federated methods overtake local-only.

Reads every finished run under RUNS_DIR (a sweep over `data.max_client_examples`, e.g.

  python -m experiments.sweep --runs_dir runs/scarcity --jobs 2 --methods fedit,hyperlora,local_only \
      --seeds 0,1,2 --grid data.max_client_examples=8,16,32,64,0
  python -m experiments.reports.data_scarcity runs/scarcity --out runs/scarcity/scarcity.md

), groups the runs by method and cap (0: all of each client's examples), and writes a Markdown
table of final personalized-mean and global accuracy (mean ± std over seeds), a plot of both
against the cap (log scale), and, per federated method, the caps at which its personalized
accuracy is above local-only's and where it crosses it.
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np

from experiments.reports.report import diagnostic_cell, emit, finished_runs

REFERENCE = "local_only"


def scarcity_rows(runs_dir: str) -> list[dict]:
  """One row per finished run: `report.final_metrics` plus "cap" (data.max_client_examples;
  0 = all; runs recorded before the field existed count as 0)."""
  return [{**row, "cap": row["config"]["data"].get("max_client_examples", 0)} for row in finished_runs(runs_dir)]


def grouped(rows: list[dict], key: str) -> dict[str, dict[int, tuple[float, float, int]]]:
  """{method: {cap: (mean, std, seeds)}} of `key` (an accuracy in [0, 1]) in percent."""
  values = collections.defaultdict(list)
  for row in rows:
    if row.get(key) is not None:
      values[(row["method"], row["cap"])].append(100 * row[key])
  out = collections.defaultdict(dict)
  for (method, cap), vals in values.items():
    out[method][cap] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
  return dict(out)


def _sort_caps(caps) -> list[int]:
  return sorted(caps, key=lambda c: (c == 0, c))  # "all" (0) last.


def crossing(method_curve: dict[int, tuple], reference_curve: dict[int, tuple]) -> str:
  """Where `method` is above the reference, in words: the caps above it and the first cap (in
  increasing examples) from which the reference is ahead, if any."""
  caps = [c for c in _sort_caps(method_curve) if c in reference_curve]
  above = [c for c in caps if method_curve[c][0] > reference_curve[c][0]]
  label = lambda c: "all" if c == 0 else str(c)
  if not caps:
    return "no common caps"
  if not above:
    return "below at every cap"
  if len(above) == len(caps):
    return "above at every cap"
  behind = [c for c in caps if c not in above]
  return f"above at {', '.join(map(label, above))}; local-only ahead at {', '.join(map(label, behind))}"


def markdown(rows: list[dict]) -> str:
  pers, glob = grouped(rows, "pers_mean"), grouped(rows, "global")
  methods = sorted(pers, key=lambda m: (m == REFERENCE, m))
  caps = _sort_caps({c for curve in pers.values() for c in curve})
  label = lambda c: "all" if c == 0 else str(c)
  cell = lambda curve, c: f"{curve[c][0]:.1f} ± {curve[c][1]:.1f}" if c in curve else "–"
  lines = [
    "Personalized accuracy (mean over clients, %, mean ± std over seeds) by training examples per client (cap):",
    "",
    "| method | " + " | ".join(label(c) for c in caps) + " |",
    "|---|" + "---|" * len(caps),
  ]
  lines += [f"| {m} | " + " | ".join(cell(pers[m], c) for c in caps) + " |" for m in methods]
  lines += [
    "",
    "Global accuracy (%):",
    "",
    "| method | " + " | ".join(label(c) for c in caps) + " |",
    "|---|" + "---|" * len(caps),
  ]
  lines += [f"| {m} | " + " | ".join(cell(glob.get(m, {}), c) for c in caps) + " |" for m in methods if m in glob]
  if REFERENCE in pers:
    lines += ["", f"Personalized accuracy against {REFERENCE}:", ""]
    lines += [f"- {m}: {crossing(pers[m], pers[REFERENCE])}" for m in methods if m != REFERENCE]
  lines += diagnostics_lines(rows, methods, caps)
  return "\n".join(lines)


DIAGNOSTICS = ("aggregation_bias", "client_drift", "init_lag")


def diagnostics_lines(rows: list[dict], methods: list[str], caps: list[int]) -> list[str]:
  """A table of each method's round diagnostics (mean over rounds; mean ± std over seeds) per
  cap, for the runs that recorded them ([] if none did)."""
  cells = {}
  for method in methods:
    for cap in caps:
      group = [r for r in rows if r["method"] == method and r["cap"] == cap]
      for key in DIAGNOSTICS:
        cell = diagnostic_cell(group, key)
        if cell:
          cells[(method, cap, key)] = cell
  if not cells:
    return []
  label = lambda c: "all" if c == 0 else str(c)
  lines = [
    "",
    "Round diagnostics (mean over rounds; mean ± std over seeds):",
    "",
    "| method | cap | " + " | ".join(DIAGNOSTICS) + " |",
    "|---|---|" + "---|" * len(DIAGNOSTICS),
  ]
  for method in methods:
    for cap in caps:
      if any((method, cap, k) in cells for k in DIAGNOSTICS):
        lines.append(
          f"| {method} | {label(cap)} | " + " | ".join(cells.get((method, cap, k), "–") for k in DIAGNOSTICS) + " |"
        )
  return lines


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, (key, title) in zip(axes, (("pers_mean", "personalized accuracy (mean)"), ("global", "global accuracy"))):
    curves = grouped(rows, key)
    all_caps = [c for curve in curves.values() for c in curve if c]
    full = 2 * max(all_caps) if all_caps else 1  # Where "all" is drawn.
    for method in sorted(curves):
      caps = _sort_caps(curves[method])
      x = np.array([c or full for c in caps], float)
      mean = np.array([curves[method][c][0] for c in caps])
      std = np.array([curves[method][c][1] for c in caps])
      ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method)
    ax.set(xscale="log", xlabel="training examples per client (rightmost: all)", ylabel="%", title=title)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out", help="Markdown file to write (default: print only); the plot goes beside it.")
  args = parser.parse_args(argv)
  rows = scarcity_rows(args.runs_dir)
  if not rows:
    raise SystemExit(f"no finished runs under {args.runs_dir}")
  text = markdown(rows)
  png = os.path.join(os.path.dirname(args.out) if args.out else args.runs_dir, "scarcity.png")
  plot(rows, png)
  emit(text + f"\n\n![accuracy against examples per client]({os.path.basename(png)})", args.out)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
