"""A run's workdir: its lock, recorded config and environment, checkpoints and resume.

workdir/
  .lock                 held while a run writes here (`workdir_lock`)
  config.json           the fields the run used (`check_resumable` refuses another config)
  environment.json      versions, backend and the values left to the machine (`environment`)
  metrics.jsonl         one record per round (`reporting`)
  tensorboard/          the records as TensorBoard event files (`tensorboard`)
  adapters/round-<R>/   PEFT adapters, every `export_every` rounds (`export`)
  checkpoints/<step>/   orbax checkpoints of the whole server state
  checkpoints/metrics-<step>.jsonl   rounds 1..step of the metrics, kept with each checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import platform
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from configs import blocks as config_blocks
from experiments.runner import methods, reporting
from experiments.runner.config_validation import ConfigError, used_config
from experiments.runner.assembly import Experiment
from experiments.runner.experiment import build_experiment
from hyperlora_jax import distributed, files, states
from hyperlora_jax.faults import Faults
from hyperlora_jax.hyper import synthesis

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
ENVIRONMENT_FILE = "environment.json"  # Versions, backend and machine-chosen values (`environment`).
# Fields a resumed run may change (they do not alter the rounds already done).
RESUMABLE_FIELDS = (
  "fed.num_rounds",
  "eval_every",
  "checkpoint_every",
  "export_every",
  "export_clients",
  *(f"mc.{f.name}" for f in dataclasses.fields(config_blocks.MultipleChoice)),  # Evaluation only.
  *(f"gen.{f.name}" for f in dataclasses.fields(config_blocks.GenerationEval)),
)
# Fields added after runs were recorded without them, with the value that means "as before":
# a recorded run lacking one is the same config when this run has that value (so a workdir
# made by an older version resumes, or reprints, instead of being refused). Blocks that are
# dataclasses contribute their defaults, their one source.
ADDED_FIELDS = {
  "data.max_client_examples": 0,
  "data.validation_fraction": 0.0,
  "pretrain.checkpoint": "",
  "fed.model_parallel": 1,
  "data.data_dir": "",  # A text run's tokenized records (2026-12-06).
  "hyperlora.meta_steps": config_blocks.HyperLoRA().meta_steps,
  "export_every": 0,  # Adapters written while a run trains (2026-12-07).
  "export_clients": "",
  **config_blocks.dotted_defaults("faults", Faults()),  # All off.
  **config_blocks.dotted_defaults("robust", config_blocks.Robust()),
  **config_blocks.dotted_defaults("dp", config_blocks.DP()),
  # The generator's learning-rate schedule (constant before it existed).
  **{
    field: value
    for field, value in config_blocks.dotted_defaults("generator", config_blocks.Generator()).items()
    if field.rsplit(".", 1)[1] in ("schedule", "decay_steps", "final_fraction")
  },
}


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/.lock` (an exclusive `flock`, released when the run ends or its process
  dies, kill -9 included) so that two runs never write one workdir.

  Raises:
    RuntimeError: another process (or another run in this one) holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise RuntimeError(
        f"workdir {workdir} is in use by another run (pid {f.read().strip() or '?'}); "
        f"wait for it or use another workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield  # Closing the file releases the lock.


def config_differences(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The fields (dotted) in which `config` differs from the one recorded in `workdir` ([] when
  they agree or none is recorded), besides those a run may change on resume."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(
      f"{path} is not readable JSON ({type(e).__name__}: {e}), so this workdir's config cannot be "
      f"checked; restore the file or use a new workdir"
    ) from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} holds a JSON {type(saved).__name__}, not a config; restore it or use a new workdir")
  saved_flat = traverse_util.flatten_dict(saved, sep=".")
  current_flat = traverse_util.flatten_dict(used_config(config, methods.METHOD_BLOCKS), sep=".")
  for field, as_before in ADDED_FIELDS.items():
    if field not in saved_flat and current_flat.get(field) == as_before:
      saved_flat[field] = as_before
  return sorted(
    k
    for k in set(saved_flat) | set(current_flat)
    if saved_flat.get(k) != current_flat.get(k) and k not in RESUMABLE_FIELDS
  )


def recorded_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict of the run in `workdir`: its config file's defaults (`configs/default.py`,
  `configs/instruction_tuning.py` or `configs/preference_tuning.py` for a text run) overwritten by every field its
  `config.json` records, and its model block as recorded (a benchmark config replaces the model
  block whole: `configs/benchmarks.set_model`).

  Raises:
    OSError: the workdir has no readable config.json.
    ValueError: the rebuilt config still differs from the recorded one (a field the default
      config lacks, say), naming the fields.
  """
  from configs import default, instruction_tuning, preference_tuning
  from experiments.cli import set_field

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE}, so it is not a run's workdir (or its config was lost)")
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
  task = recorded.get("task")
  config = {"instruction_tuning": instruction_tuning, "preference_tuning": preference_tuning}.get(
    task, default
  ).get_config()
  config.model = ml_collections.ConfigDict(recorded.pop("model"))
  for field, value in traverse_util.flatten_dict(recorded, sep=".").items():
    try:
      set_field(config, field, tuple(value) if isinstance(value, list) else value)
    except ValueError:
      raise ConfigError(f"{path}: field {field!r} is not a field of this version's configs") from None
  changed = config_differences(workdir, config)
  if changed:
    raise ConfigError(f"{workdir}: its config could not be rebuilt from {CONFIG_FILE} (fields: {', '.join(changed)})")
  return config


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir holding another config (every process checks), then the main process
  records this one."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = used_config(config, methods.METHOD_BLOCKS)
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path) and os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ConfigError(
      f"workdir {workdir} has checkpoints but no {CONFIG_FILE}, so its config cannot "
      f"be checked against this one; restore the file or use a new workdir"
    )
  changed = config_differences(workdir, config)
  if changed:
    raise ConfigError(
      f"workdir {workdir} holds a run with a different config (fields: "
      f"{', '.join(changed)}); use a new workdir or the same config"
    )
  distributed.barrier("config checked")
  if distributed.is_main_process():
    files.atomic_write_json(path, current, indent=2)  # Never a torn file: a resume reads it.


def environment(exp: Experiment) -> dict:
  """What a run's numbers depend on besides its config: versions, backend, devices, and the
  values the config left to the machine (the measured `clients_per_chunk`, the backbone dtype)."""
  versions = {
    name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
  }
  return {
    "python": platform.python_version(),
    **versions,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "cpu": _cpu_name(),
    "cpus": os.cpu_count(),
    "clients_per_chunk": exp.fed_round.clients_per_chunk,
    "backbone_dtype": str(jnp.dtype(exp.task.compute_dtype)),
  }


def _cpu_name() -> str:
  """The CPU's model name (Linux), else the machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()
  except OSError:
    return platform.machine()


def read_environment(workdir: str) -> dict:
  path = os.path.join(workdir, ENVIRONMENT_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None


def write_environment(workdir: str, exp: Experiment) -> None:
  files.atomic_write_json(os.path.join(workdir, ENVIRONMENT_FILE), environment(exp), indent=2)


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )


def metrics_snapshot_path(workdir: str, step: int) -> str:
  """The copy of rounds 1..step of metrics.jsonl kept with checkpoint `step`."""
  return os.path.join(workdir, "checkpoints", f"metrics-{step}.jsonl")


def save_metrics_snapshot(workdir: str, step: int, records: list[dict], manager: ocp.CheckpointManager) -> None:
  """Keeps rounds 1..step of the metrics beside checkpoint `step`, so that a lost or damaged
  metrics.jsonl can be rebuilt on resume; drops the copies of checkpoints orbax has removed."""
  reporting.write_records(metrics_snapshot_path(workdir, step), [r for r in records if r["round"] <= step])
  kept = set(manager.all_steps()) | {step}
  directory = os.path.join(workdir, "checkpoints")
  for name in os.listdir(directory):
    if name.startswith("metrics-") and name.endswith(".jsonl") and int(name[8:-6]) not in kept:
      os.remove(os.path.join(directory, name))


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Checkpoint `step` of a round's state, in its dict layout (`ServerState.as_dict`), the
  layout every checkpoint of this project has."""
  manager.save(step, args=ocp.args.StandardSave(states.as_tree(state)))


def restore_state(manager: ocp.CheckpointManager, state: Any, step: int | None = None) -> tuple[Any, int]:
  """(state, rounds done) from checkpoint `step` (None: the latest), or (state, 0) if there is
  none; `state` (a `ServerState`, or a dict in its layout) gives the structure, dtypes and
  shardings.

  Raises:
    ValueError: no checkpoint of round `step` is kept (naming those that are).
    RuntimeError: a checkpoint exists but cannot be restored (it is left in place).
  """
  if step is not None and step not in manager.all_steps():
    kept = sorted(manager.all_steps())
    manager.close()
    raise ValueError(
      f"{manager.directory}: no checkpoint of round {step}; kept: {', '.join(map(str, kept)) or 'none'} "
      f"(a run keeps its last two; `export_every` writes adapters as it trains)"
    )
  step = manager.latest_step() if step is None else step
  if step is None:
    return state, 0
  template, state = state, states.as_tree(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax raises several types for unreadable files.
    restored = _restore_older(manager, step, state)
    if restored is None:
      manager.close()
      raise RuntimeError(
        f"checkpoint {manager.directory}/{step} is corrupt or incompatible "
        f"({type(e).__name__}: {e}); it was left untouched. Move it away to "
        f"resume from an earlier one, or use a new workdir."
      ) from e
  return states.like(template, restored), step


# Aggregator-state entries added after checkpoints were written without them (per-round
# metrics of HyperLoRA's synthesizer): such a checkpoint restores with these
# entries at their initial values.
ADDED_AGGREGATOR_ENTRIES = synthesis.DIAGNOSTIC_METRICS


def _restore_older(manager: ocp.CheckpointManager, step: int, state: Any) -> Any | None:
  """`state` restored from a checkpoint written before `ADDED_AGGREGATOR_ENTRIES` existed (they
  keep `state`'s values), or None when the state has none of them or that fails too."""
  agg = state.get("agg")
  added = [k for k in ADDED_AGGREGATOR_ENTRIES if isinstance(agg, dict) and k in agg]
  if not added:
    return None
  older = {**state, "agg": {k: v for k, v in agg.items() if k not in added}}
  try:
    restored = manager.restore(
      step, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, older))
    )
  except Exception:  # Not an older checkpoint either: the caller reports the first error.
    return None
  return {**restored, "agg": {**restored["agg"], **{k: agg[k] for k in added}}}


def restore_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  finished: bool = True,
  step: int | None = None,
  log: Callable[[str], None] = lambda _: None,
) -> tuple[Experiment, Any, int]:
  """A run's experiment and its state at its latest checkpoint (or at `step`), to evaluate or
  inspect it.

  Args:
    config: the ConfigDict the run was started with (its `config.json` holds the fields used).
    workdir: the run's directory.
    finished: require the checkpoint to be the run's last round (`config.fed.num_rounds`).
    step: the round of the checkpoint to restore (None: the latest).
  Returns:
    (experiment as `build_experiment` makes it, restored state, rounds done).
  Raises:
    ValueError: `finished` and the run has no checkpoint of its last round, or none of `step`.
    RuntimeError: the checkpoint is corrupt (it is left in place).
  """
  exp = build_experiment(config, log=log)
  state = exp.fed_round.init(jax.random.key(config.seed), exp.initial_trainable, exp.signatures)
  manager = checkpoint_manager(workdir)
  state, done = restore_state(manager, state, step)  # On an error it closes the manager and raises.
  manager.close()
  if finished and done < config.fed.num_rounds:
    raise ValueError(f"{workdir}: its latest checkpoint is of round {done} of {config.fed.num_rounds}")
  return exp, state, done
