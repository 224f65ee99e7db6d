"""RESULTS.md's tables from the runs, in one command: one table per benchmark, the claims table.

  python -m experiments.reports.results_page runs/converge \
      --variant "HyperLoRA=runs/converge_ablate" \
      --rename "hyperlora=HyperLoRA, default generator" \
      --claims_row HyperLoRA --majority_label --targets 0.3,0.35,0.4 --out runs/results_tables.md

Rows: every method with finished runs under RUNS_DIR (in `methods.METHODS` order, by its
display name or its `--rename`), and each `--variant LABEL=DIR` (the finished runs under DIR,
e.g. a method at another setting) just before the row of its method. Columns: the final global
accuracy (the union of the clients' test splits), the personalized accuracy (each client's own
model on its own test split, mean over clients), both mean ± std over the seeds, the seeds and
the MB sent up + down (a text benchmark: and the perplexities, `benchmark_table`). The best
personalized mean of the federated rows is bold. With
`--majority_label`, a reference row predicts each client's most frequent training label
(`experiments.studies.label_prior`), on each seed of the benchmark's runs (their data, rebuilt from
their `config.json`). A second table gives the held-out new clients where runs have them.

The claims table (`experiments.reports.claims.claims_table`) compares `--claims_row` (a variant's label
or a method) with `--reference` and local-only, by `experiments.reports.claims`' rules.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from experiments.reports import claims, report
from experiments.runner.methods import METHODS

DISPLAY_NAMES = {
  "fedit": "FedIT",
  "local_only": "local-only",
  "ffa_lora": "FFA-LoRA",
  "fedsa_lora": "FedSA-LoRA",
  "rolora": "RoLoRA",
  "fedex_lora": "FedEx-LoRA",
  "flora": "FLoRA",
  "flexlora": "FlexLoRA",
  "lora_fair": "LoRA-FAIR",
  "hetlora": "HetLoRA",
  "pfedhn": "pFedHN",
  "centralized": "centralized (reference)",
  "hyperlora": "HyperLoRA",
}
REFERENCE_METHODS = ("centralized",)  # Not federated: never bold.
MAJORITY_LABEL = "majority label (reference)"


def _pct(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  if len(values) == 1:
    return f"{100 * values[0]:.1f}"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def labelled_rows(runs_dir: str, variants: list[tuple[str, str]], renames: dict[str, str]) -> list[dict]:
  """`report.finished_runs` of `runs_dir` and of each variant's directory, each row with its
  "label" (variant label, or the method's `renames` / display name), "order" (its place) and
  "variant" (whether it is a variant's)."""
  rows = []
  known = list(METHODS)
  for row in report.finished_runs(runs_dir):
    method = row["method"]
    rows.append(
      {
        **row,
        "label": renames.get(method, DISPLAY_NAMES.get(method, method)),
        "order": (known.index(method) if method in known else len(known), 1),
        "variant": False,
      }
    )
  for index, (label, directory) in enumerate(variants):
    found = report.finished_runs(directory)
    if not found:
      raise ValueError(f"--variant {label}={directory}: no finished runs there")
    for row in found:
      method = row["method"]
      rows.append(
        {
          **row,
          "label": label,
          "order": (known.index(method) if method in known else len(known), 0, index),
          "variant": True,
        }
      )
  return rows


def majority_label_accuracy(config: dict) -> float:
  """The majority-label reference on the clients of the run whose `config.json` is `config`."""
  import ml_collections

  from experiments.studies.label_prior import majority_label_accuracy as per_client
  from experiments.runner.federated_data import build_federated_data
  from experiments.runner.settings import data_block

  run_config = ml_collections.ConfigDict(config)
  data = build_federated_data(data_block(run_config), run_config.seed, run_config.eval_batch)
  return float(np.nanmean(per_client(data.train_pool.labels, data.test_pool.labels, data.train_parts, data.test_parts)))


def _mean_std(values: list) -> str:
  """'mean ± std' of the values that are not None, to the unit ('–' for none)."""
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  return f"{np.mean(values):.0f}" if len(values) == 1 else f"{np.mean(values):.0f} ± {np.std(values):.0f}"


def _perplexity(row: dict) -> float:
  """A text run's last personalized perplexity (mean over clients); inf for an image run."""
  return row["records"][-1].get("personalized_perplexity_mean", float("inf"))


def benchmark_table(rows: list[dict], majority: list[float] | None = None) -> str:
  """Markdown: one line per label of one benchmark's `rows` (module docstring); a text
  benchmark's table adds the last global and personalized (mean over clients) perplexities,
  mean ± std over the seeds, the lowest personalized one of the federated rows in bold."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[row["label"]].append(row)
  labels = sorted(groups, key=lambda label: min(r["order"] for r in groups[label]))
  federated = [label for label in labels if groups[label][0]["method"] not in REFERENCE_METHODS]
  best = max(federated, key=lambda label: np.mean([r["pers_mean"] for r in groups[label]]), default=None)
  text = any("global_perplexity" in r["records"][-1] for r in rows)  # A text benchmark: perplexities too.
  least = min(federated, key=lambda label: np.mean([_perplexity(r) for r in groups[label]]), default=None)
  lines = [
    "| method | seeds | global % | personalized % |"
    + (" global perplexity | personalized perplexity |" if text else "")
    + " MB up+down |",
    "|---|---|---|---|" + ("---|---|" if text else "") + "---|",
  ]
  for label in labels:
    group = groups[label]
    has_global = any(r["global"] is not None for r in group)
    personalized = _pct([r["pers_mean"] for r in group])
    if label == best:
      personalized = f"**{personalized}**"
    perplexities = ""
    if text:
      personal = _mean_std([_perplexity(r) for r in group])
      perplexities = (
        f" {_mean_std([r['records'][-1].get('global_perplexity') for r in group]) if has_global else '–'}"
        f" | {f'**{personal}**' if label == least else personal} |"
      )
    lines.append(
      f"| {label} | {len(group)} | {_pct([r['global'] for r in group]) if has_global else '–'} | "
      f"{personalized} |{perplexities} {np.mean([r['mb'] for r in group]):.2f} |"
    )
  if majority:
    lines.append(
      f"| {MAJORITY_LABEL} | {len(majority)} | – | {_pct(majority)} |" + (" – | – |" if text else "") + " – |"
    )
  lines += report.new_client_lines(
    [(label, groups[label]) for label in labels],
    "New clients (held out of training), mean accuracy % over them:",
    _pct,
    skip_empty=True,
  )
  return "\n".join(lines)


def claims_rows(rows: list[dict], claims_row: str) -> list[dict]:
  """The rows `claims.claims_table` reads: every method's own runs, those of the method of
  `claims_row` (a label) replaced by that label's runs."""
  chosen = [r for r in rows if r["label"] == claims_row]
  if not chosen:
    raise ValueError(f"--claims_row {claims_row!r}: no such row (labels: {sorted({r['label'] for r in rows})})")
  methods = {r["method"] for r in chosen}
  own = [r for r in rows if not r["variant"] and r["method"] not in methods]
  return own + chosen


def build_page(
  runs_dir: str,
  variants: list[tuple[str, str]] = (),
  renames: dict[str, str] | None = None,
  claims_row: str | None = None,
  reference: str = "fedit",
  targets: tuple[float, ...] = (0.3,),
  majority_label: bool = False,
) -> str:
  """The Markdown of the tables (module docstring)."""
  rows = labelled_rows(runs_dir, list(variants), renames or {})
  if not rows:
    return f"No finished runs under {runs_dir}."
  sections = []
  for benchmark in sorted({r["benchmark"] for r in rows}):
    group = [r for r in rows if r["benchmark"] == benchmark]
    majority = None
    if majority_label:
      configs = {r["seed"]: r["config"] for r in sorted(group, key=lambda r: r["order"])}
      majority = [majority_label_accuracy(configs[seed]) for seed in sorted(configs)]
    rounds = sorted({r["rounds"] for r in group})
    sections.append(f"### {benchmark} ({', '.join(map(str, rounds))} rounds)\n\n{benchmark_table(group, majority)}")
  if claims_row is not None:
    chosen = claims_rows(rows, claims_row)
    table = claims.claims_table(
      chosen,
      method=chosen[-1]["method"],
      reference=reference,
      targets=list(targets),
      centralized_fractions=[0.9],
      claimed_speedup=0.3,
    )
    sections.append(
      f"### The paper's claims: {claims_row} against {DISPLAY_NAMES.get(reference, reference)}\n\n{table}"
    )
  return "\n\n".join(sections) + "\n"


def _pair(text: str, flag: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not key or not value:
    raise SystemExit(f"{flag} {text!r}: expected KEY=VALUE")
  return key, value


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs_dir")
  parser.add_argument("--variant", action="append", default=[], help="LABEL=DIR: a row of DIR's runs.")
  parser.add_argument("--rename", action="append", default=[], help="METHOD=LABEL: a method row's label.")
  parser.add_argument("--claims_row", default=None, help="The label (or method display name) whose claims to test.")
  parser.add_argument("--reference", default="fedit")
  parser.add_argument("--targets", default="0.3", help="Comma-separated absolute accuracy targets.")
  parser.add_argument("--majority_label", action="store_true", help="Add the majority-label reference row.")
  parser.add_argument("--out", default=None, help="Markdown file to write (default: print only).")
  args = parser.parse_args(argv)
  page = build_page(
    args.runs_dir,
    [_pair(v, "--variant") for v in args.variant],
    dict(_pair(r, "--rename") for r in args.rename),
    args.claims_row,
    args.reference,
    tuple(float(t) for t in args.targets.split(",")),
    args.majority_label,
  )
  report.emit(page, args.out)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main)
