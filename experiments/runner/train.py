"""`train_and_evaluate(config, workdir)`: one run, read top to bottom in its phases.

  1. prepare   with several processes, the main one prepares the data and backbone once
  2. build     the experiment from the config (`experiment.build_experiment`: every check first)
  3. workdir   the config checked against the one recorded there, the environment recorded
  4. state     the round-0 state on the mesh, restored from the latest checkpoint if there is one
  5. records   `metrics.jsonl` made to agree with that checkpoint
  6. rounds    each round is dispatched; while it computes, the previous round's host work runs
               (its record, the finiteness check, logs); an evaluation is enqueued before the
               next round donates the state it reads
  7. save      a checkpoint every `checkpoint_every` rounds, with a copy of the metrics so far;
               PEFT adapters every `export_every` rounds (`export`)
  8. summary   the text summary and the convergence plot

The concerns live beside it: `experiment` (building), `config_validation` (every check),
`feeding` (round inputs), `evaluation`, `records` (a round's metrics line), `workdir` (lock,
recorded config and environment, checkpoints, resume), `chunking` (the measured chunk size).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time
from typing import Any
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from experiments.runner import (
  backbone,
  export as export_lib,
  memory,
  methods,
  records as records_lib,
  reporting,
  tensorboard,
)
from experiments.runner.config_validation import is_text
from experiments.runner import workdir as workdir_lib
from experiments.runner.data.loader import prepare_dataset
from experiments.runner.evaluation import (
  evaluate_new_clients,
  generation_evaluator,
  multiple_choice_evaluator,
  run_evaluator,
)
from experiments.runner.assembly import Experiment
from experiments.runner.experiment import build_experiment
from experiments.runner.feeding import round_on_mesh
from experiments.runner.settings import backbone_settings
from experiments.runner.text_experiment import prepare_text_inputs
from hyperlora_jax import autotune, diagnostics, distributed, federated, primitives


@dataclasses.dataclass(frozen=True)
class PendingRound:
  """A dispatched round whose host work (`finish_round`) is still to do.

  index: the round (0-based); metrics: its device metrics; client_ids: [C] host ids (-1 =
  padding); global_finite: device bool, the new global model is finite; collect_evaluation:
  waits for the dispatched evaluation (None: not an evaluation round); new_clients: the
  held-out new clients' accuracies (last round only, else empty); multiple_choice: a text run's
  `mc` accuracies and `gen` scores (their rounds only, else empty).
  """

  index: int
  metrics: dict
  client_ids: np.ndarray
  global_finite: Any
  collect_evaluation: Callable[[], tuple[float, np.ndarray, dict]] | None
  new_clients: dict
  multiple_choice: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after_round: int | None = None,
  log: Callable[[str], None] = print,
  progress: bool = True,
) -> dict:
  """Runs (or resumes) a federated LoRA experiment in `workdir` (locked while it runs; with
  several processes the main one holds the lock).

  Args:
    stop_after_round: stop (without checkpointing) after this many rounds, as a killed run
      would; for resume tests.
  Returns:
    {"records": metrics.jsonl records, "summary": str, "round_traces": times the round
     function was traced (1 for a whole run), "seconds": wall time of this call}.
  """
  lock = workdir_lib.workdir_lock(workdir) if distributed.is_main_process() else contextlib.nullcontext()
  with lock:
    return _run(config, workdir, stop_after_round=stop_after_round, log=log, progress=progress)


def _run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after_round: int | None,
  log: Callable[[str], None],
  progress: bool,
) -> dict:
  start_time = time.time()
  main_process = distributed.is_main_process()
  # 1. prepare
  config = backbone.with_checkpoint_architecture(config, log if main_process else (lambda _: None))
  prepare_once(config, log)
  # 2. build
  exp = build_experiment(config_for_resume(config, workdir), log if main_process else (lambda _: None))
  # 3. workdir
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.check_resumable(workdir, config)
  if main_process:
    workdir_lib.write_environment(workdir, exp)
  # 4. state
  state, frozen = state_on_mesh(exp)
  manager = workdir_lib.checkpoint_manager(workdir)
  state, done = workdir_lib.restore_state(manager, state)
  # 5. records
  records = records_of_checkpoint(workdir, done, manager, log)
  if done:
    log(f"resumed from round {done} in {workdir}")
  # 6. rounds (and 7. save)
  traces = []

  def traced_round(*args):
    traces.append(1)
    return exp.fed_round.step(*args)

  round_fn = jax.jit(traced_round, donate_argnums=(0,))
  global_is_finite = jax.jit(lambda state: primitives.is_finite(exp.fed_round.global_params(state)))
  evaluate = run_evaluator(exp, with_extras=True)
  evaluate_choices = multiple_choice_evaluator(exp)  # Waits: before the next round donates the state.
  evaluate_generation = generation_evaluator(exp)
  choices = settings_mc.every if (settings_mc := exp.settings.multiple_choice) else 0
  generating = settings_gen.every if (settings_gen := exp.settings.generation) else 0
  due = lambda every, done: done == exp.settings.fed.num_rounds or bool(every and done % every == 0)
  per_client = primitives.clients_sharding(exp.mesh)
  settings = exp.settings
  num_rounds = settings.fed.num_rounds
  last_round = num_rounds if stop_after_round is None else min(stop_after_round, num_rounds)
  bar = tqdm(
    range(done, last_round),
    initial=done,
    total=num_rounds,
    desc=config.method,
    disable=not (progress and main_process),
    leave=False,
  )
  prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # Round r+1's block while r runs.
  upcoming = prefetch.submit(round_on_mesh, exp, done, per_client) if done < last_round else None
  writer = tensorboard.MetricWriter(workdir, done + 1) if main_process else None
  finish = lambda pending: finish_round(exp, workdir, pending, records, manager, bar, log, writer)
  pending = None
  compiled = None
  adapters = None  # `export_every`: made at the first round it writes.
  for r in bar:
    (block, ids, weights), host_ids = upcoming.result()
    upcoming = prefetch.submit(round_on_mesh, exp, r + 1, per_client) if r + 1 < last_round else None
    if compiled is None:  # Compiled once, and refused before it runs if it cannot fit in memory.
      try:
        compiled = round_fn.lower(state, frozen, block, ids, weights).compile()
        memory.check_compiled_round(compiled, settings.fed, settings.input_size)
      except BaseException:
        prefetch.shutdown(cancel_futures=True)
        manager.close()
        raise
    state, round_metrics = compiled(state, frozen, block, ids, weights)  # Dispatched, not waited for.
    if pending is not None:
      finish(pending)  # Round r-1's host work while round r computes.
    evaluating = (r + 1) % settings.eval_every == 0 or r + 1 == num_rounds
    # The evaluation is enqueued before round r+1, which donates this state, so it reads it first.
    # A non-finite global is found in `finish_round` and never recorded or saved.
    pending = PendingRound(
      index=r,
      metrics=round_metrics,
      client_ids=host_ids,
      global_finite=global_is_finite(state),
      collect_evaluation=evaluate(state, frozen) if evaluating else None,
      new_clients=evaluate_new_clients(exp, state, frozen) if r + 1 == num_rounds else {},
      multiple_choice={
        **(evaluate_choices(state, frozen) if evaluate_choices and due(choices, r + 1) else {}),
        **(evaluate_generation(state, frozen) if evaluate_generation and due(generating, r + 1) else {}),
      },
    )
    saving = (r + 1) % settings.checkpoint_every == 0 or r + 1 == num_rounds
    exporting = bool(settings.export_every) and ((r + 1) % settings.export_every == 0 or r + 1 == num_rounds)
    if saving or exporting or r + 1 == last_round:  # A saved state is checked first; the last round ends here.
      finish(pending)
      pending = None
    if saving:  # 7. save
      workdir_lib.save_state(manager, r + 1, state)
      if main_process:
        workdir_lib.save_metrics_snapshot(workdir, r + 1, records, manager)
    if exporting:  # Before round r+1, which donates this state.
      adapters = adapters or export_lib.AdapterWriter(exp, backbone_settings(config), workdir)
      adapters.write(state, r + 1)
  bar.close()
  prefetch.shutdown()
  if writer is not None:
    writer.close()
  manager.wait_until_finished()
  manager.close()
  # 8. summary
  title = f"{config.method} on {config.data.name} ({config.data.partition})"
  text = reporting.summary(records, title)
  if main_process and records and records[-1]["round"] == num_rounds:
    reporting.plot_convergence(records, os.path.join(workdir, reporting.PLOT_FILE), title)
  return {"records": records, "summary": text, "round_traces": len(traces), "seconds": time.time() - start_time}


def prepare_once(config: ml_collections.ConfigDict, log: Callable[[str], None]) -> None:
  """With several processes, the main one prepares the dataset and the backbone (the others
  wait), so that they are not all written at once (a text run: the decoder and the tokenized
  records); one process: nothing (it builds them)."""
  if jax.process_count() == 1:
    return
  if distributed.is_main_process():
    if is_text(config):
      prepare_text_inputs(config, log)
    else:
      backbone_step = backbone_settings(config)
      prepare_dataset(config.data.name, config.data.data_dir or None)
      if not backbone.real_checkpoint(backbone_step.pretrain):
        prepare_dataset(config.pretrain.data_name, config.data.data_dir or None)
      backbone.prepare_backbone(backbone_step, log)
  distributed.barrier("data and backbone prepared")


def config_for_resume(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config to build with: a resumed run with `fed.clients_per_chunk=-1` keeps the chunk it
  measured when it started (recorded in the workdir's environment), so its floats stay the same."""
  recorded = workdir_lib.read_environment(workdir)
  if config.fed.clients_per_chunk != autotune.AUTO or "clients_per_chunk" not in recorded:
    return config
  build_config = ml_collections.ConfigDict(config.to_dict())
  build_config.fed.clients_per_chunk = recorded["clients_per_chunk"]
  return build_config


def restore_checkpointed(
  config: ml_collections.ConfigDict, workdir: str, step: int | None, clients: str
) -> tuple[Experiment, Any, int, list[int]]:
  """A run's experiment and state at a kept checkpoint, for the commands that read a workdir
  (`experiments.export`, `code_eval`, `mt_bench`), and the client ids `clients` names.

  Args:
    config: the run's recorded config (`workdir.recorded_config`).
    workdir: the run's directory.
    step: the checkpointed round (None: the latest).
    clients: '' (none), 'all' or comma-separated ids (`parse_clients`).
  Returns:
    (experiment, state, rounds done, client ids).
  Raises:
    ValueError: no checkpoint yet, none of `step`, or a bad client id.
  """
  exp, state, done = workdir_lib.restore_run(config_for_resume(config, workdir), workdir, finished=False, step=step)
  if not done:
    raise ValueError(f"{workdir}: the run has no checkpoint yet")
  return exp, state, done, export_lib.parse_clients(clients, exp.data.num_clients)


def state_on_mesh(exp: Experiment) -> tuple[Any, Any]:
  """(round-0 server state with its per-client store sharded over the clients axis, the task's
  frozen tree split over the `model` axis, `primitives.frozen_shardings`: replicated without
  one); host copies go to the global mesh (identical on every process)."""
  state = exp.fed_round.init(jax.random.key(exp.settings.seed), exp.initial_trainable, exp.signatures)
  to_mesh = (lambda t: t) if jax.process_count() == 1 else (lambda t: jax.tree.map(np.asarray, t))
  state = jax.device_put(to_mesh(state), federated.state_shardings(state, exp.mesh))
  frozen = to_mesh(exp.frozen())
  frozen = jax.device_put(frozen, primitives.frozen_shardings(frozen, exp.mesh))
  return state, frozen


def records_of_checkpoint(
  workdir: str, done: int, manager: ocp.CheckpointManager, log: Callable[[str], None]
) -> list[dict]:
  """The records of rounds 1..done, the checkpoint's: `metrics.jsonl` truncated to them, or
  rebuilt from the checkpoint's copy when it lacks some (counters continue from `done`).

  Raises:
    RuntimeError: neither holds every round (nothing is changed).
  """
  records = [r for r in reporting.read_metrics(workdir) if r.get("round", 0) <= done]
  rebuilt = False
  if [r.get("round") for r in records] != list(range(1, done + 1)):
    records = reporting.read_records(workdir_lib.metrics_snapshot_path(workdir, done))
    if [r.get("round") for r in records] != list(range(1, done + 1)):
      manager.close()
      raise RuntimeError(
        f"{workdir}/{reporting.METRICS_FILE} lacks rounds of the {done} the checkpoint "
        f"has done, and the checkpoint holds no copy of them; restore the file or use "
        f"a new workdir (nothing was changed)"
      )
    rebuilt = True
  if distributed.is_main_process():
    if rebuilt:
      reporting.write_records(os.path.join(workdir, reporting.METRICS_FILE), records)
      log(
        f"{workdir}/{reporting.METRICS_FILE} lacked checkpointed rounds: rebuilt rounds 1-{done} "
        f"from the checkpoint's copy"
      )
    else:
      reporting.truncate_metrics(workdir, done)
  distributed.barrier("metrics truncated")
  return records


def round_record(exp: Experiment, pending: PendingRound, previous: dict | None) -> dict:
  """Round `pending.index`'s metrics line from its device metrics (waits for them), before its
  evaluation: losses, aggregator metrics, rejections, faults, diagnostics, ε, bytes this round
  and cumulated after `previous` (the last record; None: the first round)."""
  r, round_metrics = pending.index, pending.metrics
  up, down = records_lib.communication_bytes(exp, r, pending.client_ids)
  cum_up = (previous["cum_bytes_up"] if previous else 0) + up
  cum_down = (previous["cum_bytes_down"] if previous else 0) + down
  number = records_lib.number
  return {
    "round": r + 1,
    "train_loss": float(round_metrics["train_loss"]),
    **{name: number(round_metrics[name]) for name in exp.fed_round.aggregator.capabilities.metrics},
    "nonfinite_clients": int(round_metrics["nonfinite_clients"]),
    **{key: int(round_metrics[key]) for key in records_lib.REJECTION_METRICS},
    **{key: int(value) for key, value in round_metrics.items() if key.startswith("faults_")},
    **{key: jax.tree.map(float, round_metrics[key]) for key in diagnostics.METRICS if key in round_metrics},
    **(
      {"dp_epsilon": records_lib.privacy_spent(exp.settings, r + 1, exp.method)}
      if methods.dp_on(exp.settings.dp)
      else {}
    ),
    "bytes_up": up,
    "bytes_down": down,
    "cum_bytes_up": cum_up,
    "cum_bytes_down": cum_down,
    "cum_bytes": cum_up + cum_down,
  }


def finish_round(
  exp: Experiment,
  workdir: str,
  pending: PendingRound,
  records: list[dict],
  manager: ocp.CheckpointManager,
  bar: Any,
  log: Callable[[str], None],
  writer: tensorboard.MetricWriter | None = None,
) -> None:
  """Round `pending.index`'s host work: its record, the finiteness check, the evaluation's
  results, logs, and the line appended to `records` (and, by the main process, to metrics.jsonl
  and, with the per-client accuracies, to `writer`'s TensorBoard files).

  Raises:
    FloatingPointError: the round's global model is non-finite (not recorded, not saved).
  """
  record = round_record(exp, pending, records[-1] if records else None)
  if not bool(pending.global_finite):  # Not recorded, not saved; its evaluation is discarded.
    raise FloatingPointError(
      f"round {record['round']}: the global model is non-finite, so it is not evaluated and the run "
      f"stops (rejected this round: {', '.join(f'{k}={record[k]}' for k in records_lib.REJECTION_METRICS)}); "
      + _close_naming_last_checkpoint(manager, workdir)
    )
  per_client = {}
  if pending.collect_evaluation is not None:
    has_test = exp.data.has_test_examples()
    global_accuracy, acc, extras = pending.collect_evaluation()  # extras: a text run's perplexities.
    per_client["personalized_accuracy"] = np.asarray(acc)[has_test]
    record.update(
      global_accuracy=global_accuracy,
      personalized_accuracy_mean=float(acc[has_test].mean()),
      personalized_accuracy_worst=float(acc[has_test].min()),
    )
    record.update(extras)
    bar.set_postfix(acc=f"{record['global_accuracy']:.3f}", pers=f"{record['personalized_accuracy_mean']:.3f}")
  record.update(pending.new_clients)
  record.update(pending.multiple_choice)
  main_process = distributed.is_main_process()
  rejected = [key for key in records_lib.REJECTION_METRICS if record[key]]
  if rejected and main_process:
    log(
      f"round {record['round']}: the server rejected a non-finite or exploding {', '.join(rejected)} "
      f"and kept the previous state for it"
    )
  if record["nonfinite_clients"] and main_process:
    log(
      f"round {record['round']}: {record['nonfinite_clients']} client update(s) were non-finite and "
      f"were left out of the aggregate"
    )
  records.append(reporting.append_metrics(workdir, record) if main_process else reporting.clean_record(record))
  if writer is not None:
    writer.write(records[-1], per_client)
  check_progress(exp, records, pending.client_ids, workdir, manager)


STALLED_ROUNDS = 3  # Rounds in a row with every client update non-finite before a run stops.


def check_progress(
  exp: Experiment, records: list[dict], client_ids: Any, workdir: str, manager: ocp.CheckpointManager
) -> None:
  """Raises FloatingPointError when every sampled client's update was non-finite in each of the
  last `STALLED_ROUNDS` rounds (and no fault injects them): nothing reaches the server, so the
  run would go on learning nothing (a non-finite frozen backbone or data, or a learning rate
  that diverges at once)."""
  faults = exp.settings.faults
  if faults is not None and faults.nonfinite > 0:
    return
  sampled = int(np.sum(np.asarray(client_ids) >= 0))
  recent = records[-STALLED_ROUNDS:]
  if sampled and len(recent) == STALLED_ROUNDS and all(r["nonfinite_clients"] >= sampled for r in recent):
    raise FloatingPointError(
      f"rounds {recent[0]['round']}-{recent[-1]['round']}: every client's update was non-finite, so nothing "
      f"reached the server and the run stops; the frozen backbone or the data may hold NaN/Inf, or "
      f"client_optimizer.learning_rate={exp.settings.client_optimizer.learning_rate} diverges at once; "
      + _close_naming_last_checkpoint(manager, workdir)
    )


def _close_naming_last_checkpoint(manager: ocp.CheckpointManager, workdir: str) -> str:
  """Waits for pending saves and closes `manager` (a run that stops); the sentence naming its
  last checkpoint."""
  manager.wait_until_finished()
  last_saved = manager.latest_step()
  manager.close()
  return (
    f"the last checkpoint is step {last_saved} in {workdir}"
    if last_saved is not None
    else f"no checkpoint was saved in {workdir}"
  )
