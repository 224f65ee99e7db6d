"""Turns a runs directory into Markdown tables (mean ± std over seeds) and convergence plots.

  python -m experiments.reports.report runs/bench [--out runs/bench/report.md] [--reference fedit] \
      [--target 0.5] [--plots runs/bench/plots]

A run is any directory holding `metrics.jsonl` and `config.json`; runs are grouped by
benchmark (`config.benchmark`), then by method. Per benchmark, one table: final global
accuracy, personalized mean and worst-client accuracy, MB communicated (up + down), rounds to
the reference method's final global accuracy of the same seed ("n/k": seeds that reached it),
and, with --target, rounds to that absolute global accuracy; runs with held-out new clients
get a second table. Plots (one PNG per benchmark, default RUNS_DIR/plots): global and
personalized accuracy vs round and vs MB, mean over seeds with a ±1 std band.
Unfinished runs are left out.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from experiments.runner import reporting
from experiments.runner.methods import METHODS


def find_runs(runs_dir: str) -> list[str]:
  """Every run directory under `runs_dir`, symbolic links followed (a directory of links can
  gather runs of several sweeps into one report)."""
  return sorted(
    root
    for root, _, files in os.walk(runs_dir, followlinks=True)
    if reporting.METRICS_FILE in files and "config.json" in files
  )


def final_metrics(workdir: str) -> dict | None:
  records = [r for r in reporting.read_metrics(workdir) if r.get("personalized_accuracy_mean") is not None]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  if not records or records[-1]["round"] < config["fed"]["num_rounds"]:
    return None  # Unfinished.
  last = records[-1]
  return {
    "benchmark": config.get("benchmark", "default"),
    "method": config["method"],
    "seed": config["seed"],
    "rounds": last["round"],
    "global": last.get("global_accuracy"),
    "pers_mean": last["personalized_accuracy_mean"],
    "pers_worst": last["personalized_accuracy_worst"],
    "mb": last["cum_bytes"] / 1e6,
    "records": records,
    "config": config,
    **{k: v for k, v in last.items() if k.startswith("new_client_")},
    # A text run's multiple-choice and generation scores (`mc.*`, `gen.*`), scalars only.
    **{k: v for k, v in last.items() if k.startswith(TEXT_EVALUATION) and not isinstance(v, dict)},
  }


def finished_runs(runs_dir: str) -> list[dict]:
  """`final_metrics` of every finished run under `runs_dir` (unfinished runs left out)."""
  return [row for row in map(final_metrics, find_runs(runs_dir)) if row is not None]


def _mean_std(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def _rounds_summary(reached: list[int | None]) -> str:
  if not reached:
    return "n/a"
  hit = [n for n in reached if n is not None]
  if not hit:
    return f"not reached (0/{len(reached)})"
  return f"{np.mean(hit):.1f} ± {np.std(hit):.1f} ({len(hit)}/{len(reached)})"


def _rounds_to(group: list[dict], targets: dict[int, float]) -> str:
  paired = [r for r in group if r["seed"] in targets]
  return _rounds_summary([reporting.rounds_to_reach(r["records"], targets[r["seed"]]) for r in paired])


def _ordered_methods(rows: list[dict]) -> list[str]:
  """The methods present, in `methods.METHODS` order (unknown names last, alphabetically)."""
  known = list(METHODS)
  return sorted({r["method"] for r in rows}, key=lambda m: (known.index(m), "") if m in known else (len(known), m))


def markdown_table(rows: list[dict], reference: str | None = None, target: float | None = None) -> str:
  """The table of one benchmark's runs (see the module docstring)."""
  methods = _ordered_methods(rows)
  targets = {r["seed"]: r["global"] for r in rows if r["method"] == reference and r["global"] is not None}
  target_col = f" rounds to {100 * target:.0f}% global |" if target is not None else ""
  lines = [
    "| method | seeds | global acc. % | personalized mean % | personalized worst % | MB up+down | "
    f"rounds to {reference or 'ref.'}'s final global |" + target_col,
    "|---|---|---|---|---|---|---|" + ("---|" if target is not None else ""),
  ]
  for m in methods:
    group = [r for r in rows if r["method"] == m]
    line = (
      f"| {m} | {len(group)} | {_mean_std([r['global'] for r in group])} | "
      f"{_mean_std([r['pers_mean'] for r in group])} | {_mean_std([r['pers_worst'] for r in group])} | "
      f"{np.mean([r['mb'] for r in group]):.2f} | {_rounds_to(group, targets)} |"
    )
    if target is not None:
      line += f" {_rounds_summary([reporting.rounds_to_reach(r['records'], target) for r in group])} |"
    lines.append(line)
  groups = [(m, [r for r in rows if r["method"] == m]) for m in methods]
  return "\n".join(
    lines
    + new_client_lines(groups, "New (held-out) clients, mean accuracy % over them:", _mean_std)
    + text_evaluation_lines(groups)
  )


TEXT_EVALUATION = ("mc_accuracy_", "gen_")


def text_evaluation_lines(groups: list[tuple[str, list[dict]]]) -> list[str]:
  """Text runs' multiple-choice and generation scores, % mean ± std over seeds ([] when no run
  has them): one line per method, one column per metric."""
  keys = sorted({k for _, group in groups for r in group for k in r if k.startswith(TEXT_EVALUATION)})
  if not keys:
    return []
  lines = ["", "Text evaluation (`mc.*`: multiple choice; `gen.*`: generated responses), %:", ""]
  lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for method, group in groups:
    lines.append(f"| {method} | " + " | ".join(_mean_std([r.get(k) for r in group]) for k in keys) + " |")
  return lines


def new_client_lines(groups: list[tuple[str, list[dict]]], title: str, cell, skip_empty: bool = False) -> list[str]:
  """The held-out new clients' table ([] when no run has them): one line per (name, rows) of
  `groups`, one column per `new_client_*` metric, `cell(values)` in each (`skip_empty`: leave
  out names whose runs have none)."""
  rows = [r for _, group in groups for r in group]
  new_keys = sorted({k for r in rows for k in r if k.startswith("new_client_")})
  if not new_keys:
    return []
  lines = [
    "",
    title,
    "",
    "| method | " + " | ".join(k[len("new_client_") :] for k in new_keys) + " |",
    "|---|" + "---|" * len(new_keys),
  ]
  for name, group in groups:
    if not skip_empty or any(k in r for r in group for k in new_keys):
      lines.append(f"| {name} | " + " | ".join(cell([r.get(k) for r in group]) for k in new_keys) + " |")
  return lines


def mean_curve(group: list[dict], key: str, x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(x, mean, std) of `key` over a method's seeds, on the rounds all of them evaluated; x is
  the round or the seeds' mean of `x_key` there. None if no run has `key`."""
  per_run = [{r["round"]: r for r in run["records"] if r.get(key) is not None} for run in group]
  rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
  if not rounds:
    return None
  ys = np.array([[p[t][key] for t in rounds] for p in per_run])
  xs = np.array([[p[t][x_key] if x_key != "round" else t for t in rounds] for p in per_run], float)
  return xs.mean(0), ys.mean(0), ys.std(0)


def plot_benchmark(rows: list[dict], path: str, title: str) -> None:
  """Global and personalized accuracy vs round and vs MB, one line per method (mean ± std)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
  panels = [("global_accuracy", "global accuracy"), ("personalized_accuracy_mean", "personalized accuracy (mean)")]
  cmap = plt.get_cmap("tab20")
  for color, method in enumerate(_ordered_methods(rows)):
    group = [r for r in rows if r["method"] == method]
    for row, (key, label) in enumerate(panels):
      for col, x_key in enumerate(("round", "cum_bytes")):
        curve = mean_curve(group, key, x_key)
        if curve is None:
          continue
        x, mean, std = curve
        x = x / 1e6 if x_key == "cum_bytes" else x
        ax = axes[row][col]
        ax.plot(x, mean, color=cmap(color % 20), label=f"{method} ({len(group)})")
        ax.fill_between(x, mean - std, mean + std, color=cmap(color % 20), alpha=0.15, linewidth=0)
        ax.set(xlabel="round" if x_key == "round" else "MB communicated (up + down)", ylabel=label)
        if x_key == "cum_bytes" and np.all(x > 0):
          ax.set_xscale("log")
          ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # Decades only: minor labels overlap.
  axes[0][0].set_title(title)
  handles, labels = axes[1][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.85, 1))
  fig.savefig(path, dpi=90)
  plt.close(fig)


DIAGNOSTIC_PANELS = (
  ("aggregation_bias", "aggregation bias ‖B̄Ā − ΣpBA‖/‖ΣpBA‖"),
  ("client_drift", "client drift (update spread / mean)"),
  ("init_lag", "init. lag (first − last step loss)"),
  ("generator_offset_norm", "generator offset norm Σp‖o‖"),
  ("synth_weight_kl", "synthesizer KL(w ‖ p)"),
  ("corrector_gate", "corrector gate (mean)"),
)


def diagnostics_table(rows: list[dict]) -> str | None:
  """Markdown: each method's diagnostics averaged over its rounds (mean ± std over seeds), or
  None when no run reports any (runs made before diagnostics existed)."""
  keys = [k for k, _ in DIAGNOSTIC_PANELS if any(round_mean(r, k) is not None for r in rows)]
  if not keys:
    return None
  lines = ["| method | " + " | ".join(f"{k} (mean over rounds)" for k in keys) + " |", "|---|" + "---|" * len(keys)]
  for method in _ordered_methods(rows):
    group = [r for r in rows if r["method"] == method]
    lines.append(f"| {method} | " + " | ".join(diagnostic_cell(group, key) or "–" for key in keys) + " |")
  return "\n".join(lines)


def round_mean(run: dict, key: str) -> float | None:
  """The mean over a run's evaluated rounds of a numeric metric `key` (None if none has it)."""
  values = [r[key] for r in run["records"] if isinstance(r.get(key), (int, float))]
  return float(np.mean(values)) if values else None


def diagnostic_cell(group: list[dict], key: str) -> str | None:
  """ "mean ± std" over the runs of `group` of their `round_mean` of `key` (None if none has it)."""
  values = [v for v in (round_mean(r, key) for r in group) if v is not None]
  return f"{np.mean(values):.3g} ± {np.std(values):.2g}" if values else None


def plot_diagnostics(rows: list[dict], path: str, title: str) -> bool:
  """The round's diagnostics vs round, one line per method (mean ± std over seeds), one panel
  per diagnostic any run reports. Returns False (and writes nothing) when none does."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
    (k, label) for k, label in DIAGNOSTIC_PANELS if any(r.get(k) is not None for run in rows for r in run["records"])
  ]
  if not panels:
    return False
  cols = 3
  fig, axes = plt.subplots(
    (len(panels) + cols - 1) // cols, cols, figsize=(14, 3.6 * ((len(panels) + 2) // 3)), squeeze=False
  )
  cmap = plt.get_cmap("tab20")
  for color, method in enumerate(_ordered_methods(rows)):
    group = [r for r in rows if r["method"] == method]
    for i, (key, label) in enumerate(panels):
      curve = mean_curve(group, key, "round")
      if curve is None:
        continue
      x, mean, std = curve
      ax = axes[i // cols][i % cols]
      ax.plot(x, mean, color=cmap(color % 20), label=method)
      ax.fill_between(x, mean - std, mean + std, color=cmap(color % 20), alpha=0.15, linewidth=0)
      ax.set(xlabel="round", title=label)
  for j in range(len(panels), axes.size):
    axes[j // cols][j % cols].axis("off")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 0.87, 0.97))
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return True


def build_report(
  runs_dir: str,
  reference: str = "fedit",
  target: float | None = None,
  plots_dir: str | None = None,
  links_from: str | None = None,
) -> str:
  """The Markdown report of every finished run under `runs_dir`; writes the plots, linked
  relative to the directory `links_from` (default `runs_dir`), where the report will live."""
  rows = finished_runs(runs_dir)
  benchmarks = sorted({r["benchmark"] for r in rows})
  plots_dir = plots_dir or os.path.join(runs_dir, "plots")
  sections = []
  for benchmark in benchmarks:
    group = [r for r in rows if r["benchmark"] == benchmark]
    sections.append(f"## {benchmark}\n\n{markdown_table(group, reference, target)}")
    os.makedirs(plots_dir, exist_ok=True)
    png = os.path.join(plots_dir, benchmark.replace("/", "__") + ".png")
    plot_benchmark(group, png, benchmark)
    sections[-1] += f"\n\n![{benchmark}]({os.path.relpath(png, links_from or runs_dir)})"
    table = diagnostics_table(group)
    png = os.path.join(plots_dir, benchmark.replace("/", "__") + "__diagnostics.png")
    if table and plot_diagnostics(group, png, f"{benchmark}: diagnostics"):
      sections[-1] += (
        f"\n\nDiagnostics (`hyperlora_jax/diagnostics.py`):\n\n{table}\n\n"
        f"![{benchmark} diagnostics]({os.path.relpath(png, links_from or runs_dir)})"
      )
  if not sections:
    return f"No finished runs under {runs_dir}."
  return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out", help="Markdown file to write (default: print only).")
  parser.add_argument("--reference", default="fedit", help="Method whose final global accuracy is the target.")
  parser.add_argument("--target", type=float, help="An absolute global-accuracy target in [0, 1].")
  parser.add_argument("--plots", help="Directory for the PNGs (default RUNS_DIR/plots).")
  args = parser.parse_args(argv)
  if args.target is not None and not 0 < args.target <= 1:
    raise SystemExit(f"--target {args.target}: must be in (0, 1]")
  links_from = os.path.dirname(os.path.abspath(args.out)) if args.out else None
  emit(build_report(args.runs_dir, args.reference, args.target, args.plots, links_from), args.out)


def emit(text: str, out: str | None) -> None:
  """Prints `text`, and writes it to `out` when given."""
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
