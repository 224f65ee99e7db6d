"""The faults x method table of RELIABILITY.md, from a runs directory of fault/robust/DP runs.

  python -m experiments.reports.reliability_table runs/reliability [--out runs/reliability/table.md]

A run is any finished workdir (`metrics.jsonl` + `config.json`); runs are grouped by method and
by what they change from the defaults in the `faults`, `robust`, `dp` (and HyperLoRA's
`hyperlora`) blocks. Per group, over seeds: final global and personalized accuracy (mean ±
std), and what the rounds detected or injected, summed over all rounds and averaged over seeds:
faults injected per kind, non-finite client updates left out, server parts rejected; for DP
runs the final ε.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import numpy as np

from experiments.reports.report import emit, find_runs
from experiments.runner import reporting

BLOCKS = ("faults", "robust", "dp", "hyperlora")  # hyperlora: saved only with that method's runs.
COUNTERS = (
  "faults_byzantine",
  "faults_nonfinite",
  "faults_dropout",
  "faults_straggler",
  "nonfinite_clients",
  "rejected_aggregate",
  "rejected_server_step",
  "rejected_plugins",
  "meta_step_skipped",
)


# Fields that change nothing unless another field has a value: {field: (that field, is it active?)}.
ACTIVE_WHEN = {
  "faults.byzantine_scale": ("faults.byzantine", lambda v: v > 0),
  "faults.byzantine_kind": ("faults.byzantine", lambda v: v > 0),
  "faults.straggler_steps": ("faults.straggler", lambda v: v > 0),
  "robust.trim": ("robust.rule", lambda v: v == "trimmed_mean"),
  **{
    f"dp.{field}": ("dp.noise_multiplier", lambda v: v > 0)
    for field in ("clip_norm", "delta", "generator_clip_norm", "signature_clip_norm", "signature_noise_multiplier")
  },
}


def _setting(config: dict, defaults: dict) -> str:
  """The non-default, active fields of the reliability blocks, e.g. 'faults.byzantine=0.1,
  faults.byzantine_scale=10.0, robust.rule=median'."""
  flat = {f"{block}.{key}": value for block in BLOCKS for key, value in config.get(block, {}).items()}
  flat_defaults = {f"{block}.{key}": value for block in BLOCKS for key, value in defaults.get(block, {}).items()}
  changed = [
    f"{field}={value}"
    for field, value in sorted(flat.items())
    if flat_defaults.get(field) != value
    and (field not in ACTIVE_WHEN or ACTIVE_WHEN[field][1](flat.get(ACTIVE_WHEN[field][0])))
  ]
  return ", ".join(changed) or "no faults"


def summarize_run(workdir: str, defaults: dict) -> dict | None:
  """The run's setting, method, seed, final accuracies and summed counters (None: unfinished)."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  records = reporting.read_metrics(workdir)
  if not records or records[-1]["round"] < config["fed"]["num_rounds"]:
    return None
  last = [r for r in records if r.get("personalized_accuracy_mean") is not None][-1]
  return {
    "setting": _setting(config, defaults),
    "method": config["method"],
    "seed": config["seed"],
    "global": last.get("global_accuracy"),
    "personal": last["personalized_accuracy_mean"],
    "epsilon": records[-1].get("dp_epsilon"),
    **{key: sum(r.get(key) or 0 for r in records) for key in COUNTERS},
  }


def _mean_std(values: list) -> str:
  values = [100 * v for v in values if v is not None]
  if not values:
    return "n/a"
  return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def markdown_table(rows: list[dict]) -> str:
  groups = defaultdict(list)
  for row in rows:
    groups[(row["setting"], row["method"])].append(row)
  lines = [
    "| setting | method | seeds | global acc. % | pers. acc. % | injected (per run) | detected (per run) | ε |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for (setting, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != "no faults", kv[0])):
    mean = {key: np.mean([g[key] for g in group]) for key in COUNTERS}
    injected = ", ".join(f"{key[7:]} {mean[key]:.0f}" for key in COUNTERS[:4] if mean[key]) or "none"
    detected = (
      ", ".join(f"{key} {mean[key]:.1f}".rstrip("0").rstrip(".") for key in COUNTERS[4:] if mean[key]) or "none"
    )
    epsilon = f"{group[0]['epsilon']:.1f}" if group[0]["epsilon"] is not None else "–"
    lines.append(
      f"| {setting} | {method} | {len(group)} | {_mean_std([g['global'] for g in group])} | "
      f"{_mean_std([g['personal'] for g in group])} | {injected} | {detected} | {epsilon} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  from configs import default

  defaults = json.loads(default.get_config().to_json())
  rows = [row for row in (summarize_run(w, defaults) for w in find_runs(args.runs_dir)) if row]
  emit(markdown_table(rows), args.out)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
