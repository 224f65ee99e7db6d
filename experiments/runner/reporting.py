"""Run outputs: metrics.jsonl, the convergence plot, the one-screen summary."""

from __future__ import annotations

import json
import math
import os

from hyperlora_jax import files

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "convergence.png"


def _clean(value):
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def clean_record(record: dict) -> dict:
  """The record as `append_metrics` writes it (non-finite values become null)."""
  return {k: _clean(v) for k, v in record.items()}


def append_metrics(workdir: str, record: dict) -> dict:
  """Appends one round's record (non-finite values become null) and returns it as written."""
  record = clean_record(record)
  with open(os.path.join(workdir, METRICS_FILE), "a") as f:
    f.write(json.dumps(record) + "\n")
  return record


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` ([] if none).

  A last line cut short (no newline: a run killed while appending it) is dropped: it is a
  round after the last checkpoint, which resuming truncates anyway.

  Raises:
    ValueError: any other line is not a JSON record (naming the file and the line).
  """
  return read_records(os.path.join(workdir, METRICS_FILE))


def read_records(path: str) -> list[dict]:
  """The JSON-lines records of `path` ([] if it does not exist), as `read_metrics`."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        break  # Torn last write.
      raise ValueError(f"{path} line {number} is not a JSON record ({e}); fix or remove that line") from None
  return records


def write_records(path: str, records: list[dict]) -> None:
  """Writes JSON-lines `records` to `path` atomically (`files.atomic_write`: fsynced, renamed)."""
  files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def truncate_metrics(workdir: str, last_round: int) -> None:
  """Drops records of rounds after `last_round` (written after the checkpoint a run resumes from)."""
  write_records(os.path.join(workdir, METRICS_FILE), [r for r in read_metrics(workdir) if r["round"] <= last_round])


def plot_convergence(records: list[dict], path: str, title: str) -> None:
  """Accuracy vs round and vs cumulative bytes, and train loss, as one PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  evals = [r for r in records if r.get("personalized_accuracy_mean") is not None]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  rounds = [r["round"] for r in evals]
  for key, label in (
    ("global_accuracy", "global"),
    ("personalized_accuracy_mean", "personalized (mean)"),
    ("personalized_accuracy_worst", "personalized (worst client)"),
  ):
    ys = [r.get(key) for r in evals]
    if any(y is not None for y in ys):
      axes[0].plot(rounds, [math.nan if y is None else y for y in ys], label=label)
      axes[1].plot([r["cum_bytes"] / 1e6 for r in evals], [math.nan if y is None else y for y in ys], label=label)
  axes[0].set(xlabel="round", ylabel="test accuracy", title=title)
  axes[1].set(xlabel="MB communicated (up + down)", ylabel="test accuracy")
  axes[2].plot([r["round"] for r in records], [r["train_loss"] for r in records])
  axes[2].set(xlabel="round", ylabel="train loss")
  for ax in axes[:2]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary(records: list[dict], title: str) -> str:
  """A one-screen text summary of a run's metrics."""
  evals = [r for r in records if r.get("personalized_accuracy_mean") is not None]
  if not evals:
    return f"{title}: no evaluation yet"
  last = evals[-1]
  fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
  best_global = max((r["global_accuracy"] for r in evals if r.get("global_accuracy") is not None), default=None)
  lines = [
    f"== {title}: {last['round']} rounds ==",
    f"  global accuracy        {fmt(last.get('global_accuracy'))} (best {fmt(best_global)})",
    f"  personalized accuracy  mean {fmt(last['personalized_accuracy_mean'])}, "
    f"worst client {fmt(last['personalized_accuracy_worst'])}",
    f"  train loss             {'n/a' if last.get('train_loss') is None else format(last['train_loss'], '.3f')}",
    f"  communicated           up {last['cum_bytes_up'] / 1e6:.2f} MB, down {last['cum_bytes_down'] / 1e6:.2f} MB",
  ]
  if last.get("personalized_perplexity_mean") is not None:  # Text runs (next-token accuracy above).
    glob = last.get("global_perplexity")
    lines.insert(
      3,
      f"  perplexity             global {'n/a' if glob is None else format(glob, '.1f')}, "
      f"personalized mean {last['personalized_perplexity_mean']:.1f}, "
      f"worst client {last['personalized_perplexity_worst']:.1f}",
    )
  if records[-1].get("mc_accuracy_global") is not None:  # A text run's multiple choice (`mc`).
    choice = records[-1]
    lines.append(
      f"  multiple choice        global {fmt(choice['mc_accuracy_global'])}, "
      f"personalized mean {fmt(choice['mc_accuracy_personalized_mean'])}, "
      f"worst client {fmt(choice['mc_accuracy_personalized_worst'])}"
    )
  if records[-1].get("gen_rouge_l_global") is not None:  # A text run's generated responses (`gen`).
    gen = records[-1]
    lines.append(
      f"  generated responses    ROUGE-L global {fmt(gen['gen_rouge_l_global'])}, personalized mean "
      f"{fmt(gen['gen_rouge_l_personalized_mean'])}; exact match global {fmt(gen['gen_exact_match_global'])}"
    )
  if records[-1].get("dp_epsilon") is not None:
    lines.append(
      f"  privacy spent          ε = {records[-1]['dp_epsilon']:.1f} (client-level, at the config's dp.delta)"
    )
  return "\n".join(lines)


def rounds_to_reach(records: list[dict], target: float, key: str = "global_accuracy") -> int | None:
  """The first round whose `key` is >= target (None if never)."""
  for r in records:
    if r.get(key) is not None and r[key] >= target:
      return r["round"]
  return None


def side_by_side(runs: dict[str, list[dict]], reference: str | None = None) -> str:
  """A text table of several methods' final metrics on one config, plus the rounds each needs
  to reach the final global accuracy of `reference` (default: the first method)."""
  fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
  base = runs.get(reference) or next(iter(runs.values()))
  target = base[-1].get("global_accuracy") if base else None
  header = f"{'method':<12} {'global':>8} {'pers. mean':>11} {'pers. worst':>12} {'MB up+down':>11}"
  header += f"  rounds to {fmt(target)} global" if target is not None else ""
  lines = ["== side by side (final round) ==", header]
  for method, records in runs.items():
    last = records[-1]
    line = (
      f"{method:<12} {fmt(last.get('global_accuracy')):>8} {fmt(last['personalized_accuracy_mean']):>11} "
      f"{fmt(last['personalized_accuracy_worst']):>12} {last['cum_bytes'] / 1e6:>11.2f}"
    )
    if target is not None:
      line += f"  {rounds_to_reach(records, target) or 'not reached'}"
    lines.append(line)
  return "\n".join(lines)
