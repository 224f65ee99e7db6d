"""Turns a runs directory into Markdown tables (mean ± std over seeds).

  python -m experiments.report runs/compare [--out runs/compare/report.md] [--reference fedit]

A run is any directory holding `metrics.jsonl` and `config.json`; runs are grouped by method.
"Rounds to ref." is, per run, the first round whose global accuracy reaches the final global
accuracy of the reference method's run with the same seed (same partition and backbone);
"n/k" counts the seeds that reached it.
Runs with held-out new clients get a second table.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from hyperlora_jax import reporting


def find_runs(runs_dir: str) -> list[str]:
  return sorted(root for root, _, files in os.walk(runs_dir)
                if reporting.METRICS_FILE in files and "config.json" in files)


def final_metrics(workdir: str) -> dict | None:
  records = [r for r in reporting.read_metrics(workdir) if r.get("personalized_accuracy_mean") is not None]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  if not records or records[-1]["round"] < config["fed"]["num_rounds"]:
    return None  # Unfinished.
  last = records[-1]
  return {"method": config["method"], "seed": config["seed"], "rounds": last["round"],
          "global": last.get("global_accuracy"), "pers_mean": last["personalized_accuracy_mean"],
          "pers_worst": last["personalized_accuracy_worst"], "mb": last["cum_bytes"] / 1e6,
          "records": records, **{k: v for k, v in last.items() if k.startswith("new_client_")}}


def _mean_std(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def _rounds_to(group: list[dict], targets: dict[int, float]) -> str:
  paired = [r for r in group if r["seed"] in targets]
  if not paired:
    return "n/a"
  reached = [reporting.rounds_to_reach(r["records"], targets[r["seed"]]) for r in paired]
  hit = [n for n in reached if n is not None]
  if not hit:
    return f"not reached (0/{len(paired)})"
  return f"{np.mean(hit):.1f} ± {np.std(hit):.1f} ({len(hit)}/{len(paired)})"


def markdown_table(rows: list[dict], reference: str | None = None) -> str:
  methods = sorted({r["method"] for r in rows}, key=lambda m: [r["method"] for r in rows].index(m))
  targets = {r["seed"]: r["global"] for r in rows if r["method"] == reference and r["global"] is not None}
  lines = ["| method | seeds | global acc. % | personalized mean % | personalized worst % | MB up+down | "
           f"rounds to {reference or 'ref.'}'s final global |", "|---|---|---|---|---|---|---|"]
  for m in methods:
    group = [r for r in rows if r["method"] == m]
    lines.append(f"| {m} | {len(group)} | {_mean_std([r['global'] for r in group])} | "
                 f"{_mean_std([r['pers_mean'] for r in group])} | {_mean_std([r['pers_worst'] for r in group])} | "
                 f"{np.mean([r['mb'] for r in group]):.2f} | {_rounds_to(group, targets)} |")
  new_keys = sorted({k for r in rows for k in r if k.startswith("new_client_")})
  if new_keys:
    lines += ["", "New (held-out) clients, mean accuracy % over them:", "",
              "| method | " + " | ".join(k[len("new_client_"):] for k in new_keys) + " |",
              "|---|" + "---|" * len(new_keys)]
    for m in methods:
      group = [r for r in rows if r["method"] == m]
      lines.append(f"| {m} | " + " | ".join(_mean_std([r.get(k) for r in group]) for k in new_keys) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit("usage: python -m experiments.report RUNS_DIR [--out FILE] [--reference METHOD]")
  rows = [m for m in map(final_metrics, find_runs(argv[1])) if m is not None]
  reference = argv[argv.index("--reference") + 1] if "--reference" in argv else "fedit"
  table = markdown_table(rows, reference)
  print(table)
  if "--out" in argv:
    with open(argv[argv.index("--out") + 1], "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main(sys.argv)
