"""Runs benchmarks x methods x seeds x override grids, each run in its own workdir.

  python -m experiments.sweep --runs_dir runs/bench --jobs 2 \
      --configs configs/domainnet_like.py:clients_per_domain=1 --configs configs/label_skew.py:alpha=0.1 \
      --methods fedit,flexlora,hyperlora --seeds 0,1,2 --grid lora.rank=4,8 --set fed.num_rounds=15

Workdirs are RUNS_DIR/<config.benchmark>/<method>[/<grid values>]/seed<k>. Finished runs are
skipped, interrupted ones resume from their last checkpoint, so rerunning the same command
finishes a sweep. Backbones and datasets are prepared once, in this process, before any run
starts; `--jobs N` then runs N runs at once, each in its own process. RUNS_DIR/index.json lists
every run of the sweep (config, method, seed, overrides, workdir, status, seconds, final
metrics, error), rewritten after each run; earlier sweeps' runs into the same RUNS_DIR stay in it.
`--plan TARGET` (e.g. v5e:2x4) runs nothing: each distinct run is planned for the target
(`experiments.plan`; a seed changes the numbers, not the program) and the sweep's device time and
chip-hours are estimated from the TPU cost model (`plan_sweep`).
A failed run is recorded and the sweep goes on; the command exits non-zero if any run failed.
Workers die with the sweep (`kill -9` of it included), and each workdir is locked while a run
uses it, so a restarted sweep never runs beside leftovers of the killed one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback

from absl import flags, logging

from experiments.cli import load_config_file, parse_override, set_field
from experiments.runner import reporting
from hyperlora_jax import files

_CONFIGS = flags.DEFINE_multi_string(
  "configs",
  ["configs/default.py"],
  "Benchmark config files with their arg, e.g. configs/label_skew.py:alpha=0.1 (repeatable).",
)
_METHODS = flags.DEFINE_list("methods", ["fedit"], "Methods to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/sweep", "Parent of the runs' workdirs.")
_VARIANT = flags.DEFINE_string("variant", "", "Extra variant appended to every config's arg, e.g. 'smoke'.")
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE for every run (repeatable).")
_GRID = flags.DEFINE_multi_string("grid", [], "A swept override FIELD=V1,V2,... (repeatable; product).")
_JOBS = flags.DEFINE_integer("jobs", 1, "Runs at once (separate processes).")
_PLAN = flags.DEFINE_string(
  "plan",
  "",
  "Plan the sweep for a target instead of running it (e.g. v5e:2x4; experiments.plan): each distinct run "
  "planned once (its seeds run the same program), and the sweep's device time and chip-hours estimated.",
)

INDEX_FILE = "index.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep. `config_spec` is 'path/to/config.py[:arg]'."""

  config_spec: str
  method: str
  seed: int
  overrides: tuple[str, ...] = ()
  grid: tuple[str, ...] = ()  # The swept overrides of this run (also in `overrides`).


def make_config(spec: RunSpec, variant: str = ""):
  """The run's ConfigDict: the config file with `method`, `seed` and `variant` in its arg,
  then the overrides."""
  path, _, arg = spec.config_spec.partition(":")
  extra = ",".join(filter(None, [arg, f"method={spec.method},seed={spec.seed}", variant]))
  config = load_config_file(f"{path}:{extra}")
  for field, value in map(parse_override, spec.overrides):
    set_field(config, field, value)
  return config


def expand(
  config_specs: list[str], methods: list[str], seeds: list[int], fixed: list[str], grid: list[str]
) -> list[RunSpec]:
  """Every (config, grid point, method, seed), in that nesting order."""
  axes = []
  for entry in grid:
    field, _, values = entry.partition("=")
    if not values:
      raise ValueError(f"--grid {entry}: expected FIELD=V1,V2,...")
    axes.append([f"{field}={v}" for v in values.split(",")])
  points = list(itertools.product(*axes)) if axes else [()]
  return [
    RunSpec(c, m, s, tuple(fixed) + point, point)
    for c in config_specs
    for point in points
    for m in methods
    for s in seeds
  ]


def workdir_of(runs_dir: str, benchmark: str, spec: RunSpec) -> str:
  """RUNS_DIR/<benchmark>/<method>[/<grid values>]/seed<k>; refuses a benchmark name that
  would leave RUNS_DIR (absolute, or with '..')."""
  from experiments.runner.config_validation import check_relative_name

  check_relative_name(benchmark, "benchmark")  # ConfigError (a ValueError) naming the field.
  parts = [runs_dir, benchmark, spec.method]
  if spec.grid:
    parts.append(",".join(p.replace("/", "_") for p in spec.grid))
  return os.path.join(*parts, f"seed{spec.seed}")


def die_with_parent(parent_pid: int) -> None:
  """Worker initializer: the worker exits as soon as the sweep process that started it is
  gone, `kill -9` included, so that no orphan keeps running (or takes queued runs) beside a
  restarted sweep. Linux: the kernel's parent-death signal; everywhere: a watchdog thread."""
  try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(1)

  if os.getppid() != parent_pid:  # The parent died before this ran.
    os._exit(1)
  threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def is_finished(workdir: str, num_rounds: int) -> bool:
  records = reporting.read_metrics(workdir)
  return bool(records) and records[-1]["round"] >= num_rounds


def final_metrics(records: list[dict]) -> dict:
  """The accuracies, new-client accuracies, round and total bytes of the last evaluated round."""
  last = [r for r in records if r.get("personalized_accuracy_mean") is not None][-1]
  return {
    k: v for k, v in last.items() if "accuracy" in k or k.startswith("new_client_") or k in ("round", "cum_bytes")
  }


def run_one(spec: RunSpec, workdir: str, variant: str) -> dict:
  """Runs (or resumes) one run; returns its index entry. Never raises."""
  from experiments.runner.train import train_and_evaluate  # In the worker process.

  logging.set_verbosity(logging.WARNING)
  start = time.time()
  try:
    config = make_config(spec, variant)
    result = train_and_evaluate(config, workdir, progress=False, log=lambda _: None)
    return {
      "status": "finished",
      "seconds": round(time.time() - start, 1),
      "final": final_metrics(result["records"]),
      "summary": result["summary"],
    }
  except Exception as e:  # Recorded in the index; the sweep goes on.
    return {
      "status": "failed",
      "seconds": round(time.time() - start, 1),
      "error": f"{type(e).__name__}: {e}",
      "traceback": traceback.format_exc(),
    }


def prepare_shared_inputs(configs: list, log=print) -> None:
  """Builds every dataset and backbone the runs need, once, before runs start in parallel.
  A failure here is only logged: the runs that need that input fail and are recorded."""
  from experiments.runner import backbone, pretrain
  from experiments.runner.data.loader import prepare_dataset
  from experiments.runner import pretrain_text, text_experiment
  from experiments.runner.settings import backbone_settings
  from experiments.runner.config_validation import is_text

  done = set()
  for config in configs:
    if is_text(config):  # The embedded decoder is built and the records tokenized once.
      data = config.data
      key = (
        config.pretrain.get("checkpoint", "") or pretrain_text.cache_path(backbone_settings(config)),
        data.name,
        data.max_len,
        data.layout,
        data.chat_template,
        data.group_field,
        data.get("data_dir", ""),
      )
      if key in done:
        continue
      done.add(key)
      try:
        text_experiment.prepare_text_inputs(config, log=log)
      except Exception as e:  # The affected runs report it themselves.
        log(f"sweep: preparing the decoder and records for {config.benchmark} failed ({type(e).__name__}: {e})")
      continue
    data_key = (config.data.name, config.data.data_dir)
    backbone_step = backbone_settings(config)
    backbone_key = None if backbone.real_checkpoint(backbone_step.pretrain) else pretrain.cache_path(backbone_step)
    try:
      if data_key not in done:
        done.add(data_key)
        prepare_dataset(config.data.name, config.data.data_dir or None)
      if backbone_key and backbone_key not in done:
        done.add(backbone_key)
        backbone.prepare_backbone(backbone_step, log=log)
    except Exception as e:  # The affected runs report it themselves.
      log(f"sweep: preparing inputs for {config.benchmark} failed ({type(e).__name__}: {e})")


def read_index(runs_dir: str) -> list[dict]:
  path = os.path.join(runs_dir, INDEX_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["runs"]


def write_index(runs_dir: str, entries: list[dict]) -> None:
  """Merges `entries` into the index: under an exclusive lock, the index as it is on disk now
  (other sweeps into the same RUNS_DIR may be writing theirs at the same time) with each of
  `entries` in place of the entry of its workdir (or appended), written atomically."""
  path = os.path.join(runs_dir, INDEX_FILE)
  with files.exclusive_lock(path):
    mine = {e["workdir"]: e for e in entries}
    current = read_index(runs_dir)
    runs = [mine.pop(e["workdir"], e) for e in current] + [e for e in entries if e["workdir"] in mine]
    files.atomic_write_json(path, {"runs": runs}, indent=1)


def run_sweep(specs: list[RunSpec], runs_dir: str, jobs: int = 1, variant: str = "", log=print) -> list[dict]:
  """Runs every spec (skipping finished ones), `jobs` at a time; returns the index entries."""
  from experiments.runner.config_validation import validate_config
  from experiments.runner import methods
  from experiments.runner.workdir import config_differences

  os.makedirs(runs_dir, exist_ok=True)
  configs = [make_config(s, variant) for s in specs]
  for config in configs:  # Every config error surfaces before anything runs.
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  previous = {e["workdir"]: e for e in read_index(runs_dir)}
  entries = []
  for spec, config in zip(specs, configs):
    workdir = workdir_of(runs_dir, config.benchmark, spec)
    entry = {
      "config": spec.config_spec,
      "benchmark": config.benchmark,
      "method": spec.method,
      "seed": spec.seed,
      "overrides": list(spec.overrides),
      "workdir": workdir,
      "status": "pending",
    }
    changed = config_differences(workdir, config)
    if changed:  # Neither finished nor resumable: the workdir holds another config's run.
      entry.update(
        status="failed",
        seconds=0.0,
        error=f"ConfigError: {workdir} holds a run of a different config (fields: "
        f"{', '.join(changed)}); it was left untouched. Fixed --set overrides are not "
        f"part of a workdir's path: use another --runs_dir or put the field in --grid",
      )
    elif is_finished(workdir, config.fed.num_rounds):  # Keep what the sweep that ran it recorded.
      entry = {**previous.get(workdir, {}), **entry, "status": "finished"}
      entry.pop("error", None)
      entry.pop("traceback", None)
      entry.setdefault("final", final_metrics(reporting.read_metrics(workdir)))
    entries.append(entry)
  todo = [i for i, e in enumerate(entries) if e["status"] == "pending"]
  conflicts = [e for e in entries if e["status"] == "failed"]
  log(
    f"sweep: {len(entries)} runs, {len(entries) - len(todo) - len(conflicts)} already finished, "
    f"{len(todo)} to run ({jobs} at a time)"
    + (f"; {len(conflicts)} refused: their workdirs hold another config's run" if conflicts else "")
  )
  write_index(runs_dir, entries)
  prepare_shared_inputs([configs[i] for i in todo], log)

  def record(i: int, outcome: dict) -> None:
    entries[i].update(outcome)
    if outcome["status"] == "finished":
      entries[i].pop("traceback", None)
      entries[i].pop("error", None)
    write_index(runs_dir, entries)
    tag = "done" if outcome["status"] == "finished" else "FAILED"
    log(
      f"[{tag}] {entries[i]['workdir']} in {outcome['seconds']:.0f}s"
      + (f": {outcome['error']}" if outcome["status"] == "failed" else "")
    )

  if jobs <= 1:
    for i in todo:
      record(i, run_one(specs[i], entries[i]["workdir"], variant))
  else:
    context = multiprocessing.get_context("spawn")  # A fresh JAX runtime per worker.
    with concurrent.futures.ProcessPoolExecutor(
      jobs, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
      futures = {pool.submit(run_one, specs[i], entries[i]["workdir"], variant): i for i in todo}
      for future in concurrent.futures.as_completed(futures):
        record(futures[future], future.result())
  return entries


def plan_sweep(specs: list[RunSpec], target_name: str, variant: str = "", log=print) -> list[dict]:
  """Plans every distinct run of the sweep for `target_name` (`experiments.plan.plan_run`) and
  prints the sweep's device time: each run's rounds times its round's TPU cost-model estimate,
  times its seeds (a seed changes the numbers, not the program). Nothing runs; every config is
  checked before the first compile.

  Args:
    specs: the sweep's runs (`expand`); target_name: e.g. "v5e:2x4" (`hyperlora_jax.plan.TARGETS`).
    variant: as for `run_sweep`; log: where the summary goes.
  Returns:
    One row per distinct run: {"config", "method", "grid" (its swept values), "seeds", "flags", "fits",
    "memory_bytes", "round_seconds", "run_seconds", "loops"} (seconds None without a cost model;
    loops left in the round's cost program, their bodies counted once: its time a lower bound), or
    {"config", "method", "grid", "seeds", "error"} where nothing fits.
  """
  from experiments import plan as planning
  from experiments.runner import methods
  from experiments.runner.config_validation import validate_config
  from hyperlora_jax import plan

  groups: dict[tuple, list[RunSpec]] = {}
  for spec in specs:
    groups.setdefault((spec.config_spec, spec.method, spec.overrides), []).append(spec)
  configs = [make_config(group[0], variant) for group in groups.values()]
  for config in configs:  # Every config error surfaces before anything compiles.
    validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  rows = []
  for ((config_spec, method, overrides), group), config in zip(groups.items(), configs):
    row = {"config": config_spec, "method": method, "grid": list(group[0].grid), "seeds": len(group)}
    log(f"sweep plan: {config_spec} --methods {method} {' '.join(overrides)} ({len(group)} seed(s))")
    try:
      planned = planning.plan_run(config, target_name)
    except planning.NothingFits as e:
      rows.append({**row, "error": str(e)})
      continue
    rows.append({
      **row, "flags": planned.flags, "fits": planned.report.fits, "memory_bytes": planned.report.memory["total"],
      "round_seconds": planned.report.estimated_seconds, "run_seconds": planned.run_seconds,
      "loops": planned.report.loops,
    })  # fmt: skip
  chips = len(plan.target(target_name).devices)
  for line in sweep_plan_lines(rows, target_name, chips):
    log(line)
  return rows


def sweep_plan_lines(rows: list[dict], target_name: str, chips: int) -> list[str]:
  """The summary of `plan_sweep`'s rows: a line per distinct run, then the sweep's total.

  Args:
    rows: `plan_sweep`'s rows; target_name: the target; chips: its devices.
  Returns:
    Lines without newlines; every time labelled a TPU cost-model estimate of the rounds alone.
  """
  from experiments.plan import device_time, duration
  from hyperlora_jax import plan

  out = [f"sweep plan on {target_name} ({chips} chips; compiler estimates, nothing ran):"]
  for row in rows:
    name = " ".join([row["config"], row["method"], *row["grid"]])
    if "error" in row:
      out.append(f"  {name}: NOTHING FITS ({row['error']})")
      continue
    seconds = row["run_seconds"]
    at_least = "at least " if row["loops"] else ""  # Loops left in the round: counted once.
    timed = "no time estimate" if seconds is None else f"{at_least}{duration(seconds)} a run"
    out.append(f"  {name}: {plan.format_bytes(row['memory_bytes'])} per device, {timed} x {row['seeds']} seed(s); "
               f"{row['flags']}")  # fmt: skip
  runs = sum(row["seeds"] for row in rows)
  timed = [row for row in rows if row.get("run_seconds") is not None]
  total = sum(row["run_seconds"] * row["seeds"] for row in timed)
  untimed = runs - sum(row["seeds"] for row in timed)
  lower_bound = any(row["loops"] for row in timed)
  out.append(
    f"the sweep's {runs} runs: {device_time(total, chips, lower_bound)} (TPU cost model estimate of their rounds "
    f"alone: evaluations, the host's input and the compiles not included)"
    + (f"; {untimed} run(s) without an estimate (no cost model for the target, or nothing fits)" if untimed else "")
  )
  return out


def raise_if_failed(entries: list[dict], runs_dir: str) -> None:
  """SystemExit naming how many of the sweep's runs failed, if any did (their errors are in the
  index)."""
  failed = [e for e in entries if e["status"] == "failed"]
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed; see their 'error' in {os.path.join(runs_dir, INDEX_FILE)}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  specs = expand(_CONFIGS.value, _METHODS.value, [int(s) for s in _SEEDS.value], _SET.value, _GRID.value)
  if _PLAN.value:
    plan_sweep(specs, _PLAN.value, _VARIANT.value)
    return
  start = time.time()
  entries = run_sweep(specs, _RUNS_DIR.value, _JOBS.value, _VARIANT.value)
  failed = [e for e in entries if e["status"] == "failed"]
  print(
    f"sweep: {len(entries) - len(failed)}/{len(entries)} runs finished in {time.time() - start:.0f}s; "
    f"index {os.path.join(_RUNS_DIR.value, INDEX_FILE)}"
  )
  raise_if_failed(entries, _RUNS_DIR.value)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, absl_app=True)
