"""Where FedIT's aggregation bias is large: the round diagnostics of a sweep, by setting.

  python -m experiments.sweep --configs configs/default.py --seeds 0 --methods fedit \
      --set fed.num_rounds=10 --set eval_every=10 --runs_dir runs/bias --grid lora.rank=2,4,16
  python -m experiments.reports.bias_settings runs/bias --out runs/bias/bias.md

Reads RUNS_DIR/index.json (written by `experiments.sweep`). A run's setting is its grid values,
the workdir's path between the method and the seed ("default" when none). Per setting and
method, over seeds (mean ± std): the aggregation bias ‖B̄Ā − Σp_kB_kA_k‖_F / ‖Σp_kB_kA_k‖_F
averaged over every round, in round 1 and in the last round; the client drift averaged over
every round; the final global and mean personalized accuracy. Rows are sorted by the mean bias.
`--diagnostics a,b` adds columns: each metric's mean over every round (e.g. HyperLoRA's
`synth_weight_kl,corrector_gate,meta_loss` for a sweep over its meta-learning knobs).
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np

from experiments.reports.report import emit, round_mean
from experiments.runner import reporting

COLUMNS = ("bias (all rounds)", "bias round 1", "bias last round", "client drift", "global %", "pers. %")


def setting_of(workdir: str, method: str) -> str:
  """The grid values in a sweep workdir's path, '/'-joined ('default' when there are none)."""
  parts = os.path.normpath(workdir).split(os.sep)
  between = parts[parts.index(method) + 1 : -1] if method in parts else []
  return "/".join(between) or "default"


def run_row(entry: dict, extra: tuple[str, ...] = ()) -> dict | None:
  """One finished run of the index: its setting, method and per-run numbers (`COLUMNS`, then
  the round means of `extra`; None: unfinished or without the diagnostics)."""
  if entry.get("status") != "finished" or not os.path.exists(entry["workdir"]):
    return None
  records = reporting.read_metrics(entry["workdir"])
  bias = [r["aggregation_bias"] for r in records if isinstance(r.get("aggregation_bias"), (int, float))]
  if not bias:
    return None
  final = entry.get("final") or {}
  run = {"records": records}
  return {
    "setting": setting_of(entry["workdir"], entry["method"]),
    "method": entry["method"],
    "values": (
      float(np.mean(bias)),
      bias[0],
      bias[-1],
      round_mean(run, "client_drift"),
      final.get("global_accuracy"),
      final.get("personalized_accuracy_mean"),
    )
    + tuple(round_mean(run, key) for key in extra),
  }


def _cell(values: list, percent: bool) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  scale = 100.0 if percent else 1.0
  return f"{scale * np.mean(values):.3g} ± {scale * np.std(values):.2g}"


def bias_table(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
  """Markdown: one line per (setting, method), sorted by the mean bias (largest first)."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["setting"], row["method"])].append(row["values"])
  columns = COLUMNS + extra
  lines = ["| setting | method | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
  for (setting, method), values in sorted(groups.items(), key=lambda kv: -np.mean([v[0] for v in kv[1]])):
    cells = [_cell([v[i] for v in values], percent=i in (4, 5)) for i in range(len(columns))]
    lines.append(f"| {setting} | {method} | {len(values)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dir")
  parser.add_argument("--out", default=None, help="Also write the table here.")
  parser.add_argument("--diagnostics", default="", help="Comma-separated metrics to add (round means).")
  args = parser.parse_args(argv)
  with open(os.path.join(args.runs_dir, "index.json")) as f:
    entries = json.load(f)["runs"]
  extra = tuple(filter(None, args.diagnostics.split(",")))
  rows = [row for row in (run_row(entry, extra) for entry in entries) if row is not None]
  emit(bias_table(rows, extra), args.out)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
