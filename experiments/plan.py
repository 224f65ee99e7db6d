"""Plans a configured run's round for a TPU or GPU before renting one (`hyperlora_jax.plan`).

  python -m experiments.plan --config configs/default.py --target v5e:2x4
  python -m experiments.plan --config configs/instruction_tuning.py:smoke --target h100 --model_parallel 1
  python -m experiments.plan --config configs/default.py --target cpu --chunks 0,2,4

The run is built here as it would start (data, backbone, method: on this machine's CPU), then
its first round is compiled for the target's devices, nothing attached: the largest
`fed.clients_per_chunk` whose memory per device fits the chip's (all of a device's clients at
once, then 16, 4, 1 per device, then by bisection between the first that fits and the one before
it: `hl.plan.largest_fitting_chunk`; `--chunks` plans the chunks given instead); where none fits,
again with the round's inputs in host memory, `data.feed='host'`, then a decoder's attention
weights recomputed in the backward, `model.recompute_attention`, then the backbone's blocks
recomputed, `model.remat`, split over a model axis, then its kernels in int8, then nf4:
`compute.backbone_quantization`; `experiments.runner.memory.settings_to_try`; then, for the largest
chunk that fits, FLOPs, the TPU cost model's time and MFU, and the collectives; where the cost
model gives a time (and neither `--chunks` nor `--compare=false` is given), the round of one
client per device at a time too (where that chunk holds several clients a device), each also with
a decoder's attention weights recomputed (where it was planned without), and the fastest that
fits is the best (`fastest`); then the run's rounds times that round's time. Every compiler
figure is an estimate. The frozen backbone runs in `compute.backbone_dtype` as on the target
('auto': bfloat16); the round's block is planned on the devices (`data.feed='round'`; 'chunk'
is planned as 'round') and, where nothing fits so and the target's devices have pinned host
memory (TPUs; compile-only GPU devices list none), in host memory (`data.feed='host'`). TPU
targets need libtpu (`pip install -e '.[tpu-plan]'`), GPU targets jax-cuda12-plugin (run with
JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.runner import memory
from experiments.runner.data import blocks
from experiments.runner.experiment import build_experiment
from experiments.runner.feeding import round_inputs
from hyperlora_jax import federated, plan, primitives, quantize
from hyperlora_jax.tasks import image_classification as task_lib
from hyperlora_jax.tasks.common import backbone_dtype


def padded(tree, size: int):
  """`tree` ([C, ...] NumPy leaves) padded with zero rows to `size` rows along the first axis."""
  return jax.tree.map(
    lambda x: np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if size > len(x) else x,
    tree,
  )


def _padded_inputs(exp, axis: int) -> tuple[dict, np.ndarray, np.ndarray, int]:
  """(block, ids, weights, cohort) of the run's first round, padded to a multiple of the clients
  axis as the runner pads (padding clients: id -1, no example, weight 0)."""
  block, ids, weights = round_inputs(exp, 0)
  ids = blocks.pad_client_ids(ids, axis)
  cohort = len(ids)
  return padded(block, cohort), ids, padded(weights, cohort), cohort


def _task_with(task, **changes):
  """`task` with `changes` (its model, compute_dtype): a DPO task's (`PreferenceLM`) are those of
  the language model it wraps."""
  if hasattr(task, "lm"):
    return dataclasses.replace(task, lm=dataclasses.replace(task.lm, **changes))
  return dataclasses.replace(task, **changes)


def _round_for(exp, dtype, remat: bool | None, recompute_attention: bool | None = None):
  """(task, round) of the run with the backbone in `dtype`, its blocks and attention weights
  recomputed as `remat` and `recompute_attention` say (None: the model's own)."""
  task = _task_with(exp.task, compute_dtype=dtype)
  changes = {"remat": remat, "recompute_attention": recompute_attention}
  changes = {k: v for k, v in changes.items() if v is not None}
  if changes:
    task = _task_with(task, model=task.model.clone(**changes))
  return task, dataclasses.replace(
    exp.fed_round, client_update=dataclasses.replace(exp.fed_round.client_update, loss_fn=task.loss_fn)
  )


def plan_evaluation(exp, task, fed_round, frozen, target, model_parallel: int, chunk: int) -> dict[str, plan.Plan]:
  """The plans of the run's evaluation programs (`tasks.image_classification.make_evaluate`) on
  `target`, on the first of their blocks (the largest): {"global": the global model on a global
  test block, "clients": each client's model on its own test split, a block of clients}.

  Args:
    exp: the run; task, fed_round: as planned (`_round_for`); frozen: the frozen tree planned.
    target: the devices; model_parallel: the model axis; chunk: clients evaluated at once (all: 0).
  Returns:
    {name: Plan}.
  """
  mesh = target.mesh(model_parallel)
  placed = dataclasses.replace(fed_round, mesh=mesh, clients_per_chunk=chunk)
  counts = task.accuracy_and_nll if hasattr(task, "accuracy_and_nll") else None
  evaluation = task_lib.make_evaluate(
    task, placed, eval_batch=exp.settings.eval_batch, clients_per_chunk=chunk, counts=counts
  )
  state = jax.eval_shape(lambda t, s: placed.init(jax.random.key(0), t, s), exp.initial_trainable, exp.signatures)
  state_shardings = federated.state_shardings(state, mesh)
  frozen_shardings = primitives.frozen_shardings(frozen, mesh)
  per_client = primitives.clients_sharding(mesh)
  every = lambda tree: jax.tree.map(lambda _: per_client, tree)
  multiple = math.lcm(chunk or 1, primitives.clients_axis_size(mesh))
  ids, client_block = next(iter(exp.data.client_test_blocks(multiple=multiple)))
  plans = {
    "clients": plan.plan_program(
      evaluation.client_accuracy, (state, frozen, ids, client_block),
      (state_shardings, frozen_shardings, per_client, every(client_block)), target,
    ),
  }  # fmt: skip
  if exp.method.has_global_model:
    global_block = next(iter(exp.data.global_test_blocks()))
    plans["global"] = plan.plan_program(
      evaluation.global_counts, (state, frozen, global_block),
      (state_shardings, frozen_shardings, every(global_block)), target,
    )  # fmt: skip
  return plans


@dataclasses.dataclass(frozen=True)
class Way:
  """One way to run the round that the plan costs.

  Attributes:
    chunk: `fed.clients_per_chunk` (0: all of the round's clients at once).
    per_device: clients each device holds at once.
    attention: `model.recompute_attention` (None: the model has no such option).
    report: its `plan.Plan`.
  """

  chunk: int
  per_device: int
  attention: bool | None
  report: plan.Plan

  def flags(self) -> str:
    """The run's flags that select this way."""
    recomputed = "" if self.attention is None else f" --config.model.recompute_attention={self.attention}"
    return f"--config.fed.clients_per_chunk={self.chunk}{recomputed}"


def fastest(ways: list[Way]) -> Way:
  """The fastest of `ways` that fits, by the TPU cost model's estimated time (each printed): more
  clients at once is not always faster (a TPU's on-chip memory may hold one client's attention
  weights but not two), nor is recomputing the attention's weights always slower (it writes no
  [T, T] weights to HBM): BENCHMARKS.md, "Where the estimated time goes". Ways without an
  estimate or that do not fit are never chosen; of equal times the earlier; where no way has
  an estimate, the first.

  Args:
    ways: the ways planned, the largest chunk that fits as configured first.
  Returns:
    The way chosen.
  """
  timed = [w for w in ways if w.report.estimated_seconds is not None and w.report.fits is not False]
  best = min(timed, key=lambda w: w.report.estimated_seconds) if timed else ways[0]
  print("ways to run the round, by the TPU cost model's estimated time:")
  for way in ways:
    seconds = way.report.estimated_seconds
    shown = plan.format_seconds(seconds) if seconds is not None else "no estimate"
    at_once = "a device at once" if way.per_device > 1 else "a device at a time"
    print(f"  {way.flags()} ({way.per_device} {at_once}): {shown}"
          + ("  DOES NOT FIT" if way.report.fits is False else "") + ("  <- the fastest" if way is best else ""))  # fmt: skip
  return best


def duration(seconds: float) -> str:
  """A run's time for people to read: `plan.format_seconds` under an hour, else hours ('7.38 h')."""
  return plan.format_seconds(seconds) if seconds < 3600 else f"{seconds / 3600:.2f} h"


def device_time(seconds: float, chips: int, lower_bound: bool) -> str:
  """'[at least ]X of device time, [at least ]Y chip-hours' for `seconds` on `chips` chips."""
  at_least = "at least " if lower_bound else ""
  return f"{at_least}{duration(seconds)} of device time, {at_least}{seconds * chips / 3600:.3g} chip-hours"


def run_time_line(round_seconds: float, rounds: int, eval_every: int, chips: int, loops: int = 0) -> str:
  """The whole run's device time for its rounds, from one round's estimate (every round runs
  the same program on a cohort of the same size): what a researcher books the chips for.

  Args:
    round_seconds: one round's estimated time; rounds: `fed.num_rounds`; eval_every: rounds
      between evaluations (the last round is evaluated too); chips: the target's devices;
      loops: loops left in the program costed (`Plan.loops`: their bodies counted once, so the
      time is a lower bound).
  Returns:
    One line, labelled an estimate, naming what it leaves out.
  """
  evaluations = rounds // eval_every + (1 if rounds % eval_every else 0)
  return (
    f"the run's {rounds} rounds: {device_time(round_seconds * rounds, chips, bool(loops))} on {chips} chips "
    f"(TPU cost model estimate of the rounds alone: its {evaluations} "
    f"evaluation(s), the host's input and the compiles not included"
    + (f"; {loops} loop(s) in the round counted once" if loops else "") + ")"
  )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A configured run planned for a target (`plan_run`).

  Attributes:
    flags: the run's flags that the plan recommends ("--config.fed.clients_per_chunk=... ...").
    report: the recommended round's `plan.Plan`.
    rounds: `fed.num_rounds`.
    evaluations: {name: Plan} of its evaluation programs (`plan_evaluation`).
  """

  flags: str
  report: plan.Plan
  rounds: int
  evaluations: dict

  @property
  def run_seconds(self) -> float | None:
    """The run's rounds times its round's estimated time (TPUs; None elsewhere)."""
    seconds = self.report.estimated_seconds
    return None if seconds is None else seconds * self.rounds


class NothingFits(ValueError):
  """No chunk of any memory setting fits the target (the message names the field to lower)."""


def plan_run(
  config,
  target_name: str,
  *,
  model_parallel: int = 0,
  chunks: tuple[str, ...] = (),
  memory_gib: float = 0.0,
  cost: bool = True,
  compare: bool = True,
) -> RunPlan:
  """Plans the run `config` describes for `target_name`'s devices, printing each step (the
  module's docstring says what it tries, in order).

  Args:
    config: the run's ConfigDict (changed in place: its feed, chunk and devices as planned).
    target_name: e.g. "v5e:2x4", "h100", "cpu" (`plan.TARGETS`).
    model_parallel: the model axis (0: the config's, and the plan may split further).
    chunks: the chunks per device to plan, as `--chunks` gives them (empty: the largest that fits).
    memory_gib: plan against this much memory per device (0: the chip's).
    cost: compile the loop-free round for FLOPs and time.
    compare: weigh the other ways to run the round by the cost model (`fastest`).
  Returns:
    The `RunPlan` of the way recommended.
  Raises:
    NothingFits: no setting fits; ValueError: a host feed on devices without host memory.
  """
  feed = "host" if config.data.feed == "host" else "round"  # 'chunk' (a host callback) is planned as 'round'.
  config.data.feed = "round"
  if config.fed.clients_per_chunk < 0:
    config.fed.clients_per_chunk = 0  # Nothing is timed here: the plan compares chunks itself.
  target = plan.target(target_name)
  if memory_gib:
    target = dataclasses.replace(target, memory_bytes=int(memory_gib * plan.GIB), usable_fraction=1.0)
  fixed_model_axis = bool(model_parallel)
  model_parallel = model_parallel or config.fed.get("model_parallel", 1)
  config.fed.num_devices, config.fed.model_parallel = 1, 1  # Built on this machine's one device.
  exp = build_experiment(config, log=lambda line: print(f"  build: {line}"))
  dtype = backbone_dtype(config.compute.backbone_dtype, backend=target.platform)
  inputs = functools.cache(lambda axis: _padded_inputs(exp, axis))  # The round's images, read once per axis.
  frozen_as = functools.cache(  # The backbone quantized once per kind, as the run would hold it.
    lambda kind: dataclasses.replace(exp.settings, backbone_quantization=kind).frozen_tree(exp.backbone, dtype)
  )
  axis = len(target.devices) // model_parallel
  cohort = inputs(axis)[3]
  print(
    f"plan of {config.method} on {target.name}: {cohort} clients a round ({cohort // axis} per device of the "
    f"clients axis), {config.fed.local_steps} local steps of {config.fed.batch_size}, model axis {model_parallel}, "
    f"backbone in {np.dtype(dtype).name}; compiler estimates, nothing ran"
  )
  devices = 0 if fixed_model_axis else len(target.devices)  # --model_parallel fixes the model axis.
  host_memory = primitives.has_host_memory(target.devices[0])
  if feed == "host" and not host_memory:
    raise ValueError(f"data.feed: 'host' cannot be planned on {target.name}: its devices list no pinned host memory "
                     f"(compile-only GPU devices do not); plan data.feed='round'")  # fmt: skip
  host_memory = host_memory and target.platform != "cpu"  # The CPU's host memory is its own: never tried there.
  model = exp.task.model
  settings = memory.settings_to_try(
    getattr(model, "remat", None), exp.settings.backbone_quantization, model_parallel, devices,
    feed, host_memory, getattr(model, "recompute_attention", None),
  )  # fmt: skip
  best = None
  for feed, attention, remat, model_axis, quantization in settings:
    task, fed_round = _round_for(exp, dtype, remat, attention)
    frozen = frozen_as(quantization)
    axis = len(target.devices) // model_axis
    block, ids, weights, cohort = inputs(axis)
    storage = quantization if quantization != "none" else np.dtype(dtype).name
    recomputed = "" if attention is None else f"model.recompute_attention={attention}, "
    print(f" data.feed={feed}, {recomputed}model.remat={remat}, model axis {model_axis}, frozen backbone in {storage}: "
          f"{plan.format_bytes(quantize.tree_bytes(frozen))} in all")  # fmt: skip
    per_device = cohort // axis

    def fits(chunk: int) -> bool | None:  # Chunk per device; all of them at once is clients_per_chunk=0.
      setting = 0 if chunk == per_device else chunk
      report = plan.plan_round(
        fed_round, exp.initial_trainable, frozen, block, ids, weights, target,
        signatures=exp.signatures, model_parallel=model_axis, clients_per_chunk=setting * axis, cost=False,
        host_feed=feed == "host",
      )  # fmt: skip
      total = plan.format_bytes(report.memory["total"])
      print(f"  clients_per_chunk={setting * axis} ({chunk} per device): {total} per device"
            + {True: "", False: "  DOES NOT FIT", None: ""}[report.fits])  # fmt: skip
      return report.fits

    if chunks:  # The chunks given, each planned; the first that fits is taken.
      verdicts = [(c, fits(int(c) or per_device)) for c in chunks]
      chunk = next((int(c) or per_device for c, verdict in verdicts if verdict is not False), None)
    else:  # All at once, then 16, 4, 1 per device, then bisection between the first fit and the last misfit.
      chunk, _ = plan.largest_fitting_chunk(per_device, fits)
    if chunk is not None:
      setting = 0 if chunk == per_device else chunk
      best = (setting * axis, feed, attention, remat, model_axis, quantization, task, fed_round, frozen,
              (block, ids, weights))  # fmt: skip
      break
  if best is None:
    raise NothingFits(f"fed.clients_per_chunk: no candidate fits {target.name}, the backbone recomputed and in 4 "
                     f"bits and split over every model axis the devices allow included; lower "
                     f"fed.clients_per_round, fed.batch_size or the model")  # fmt: skip
  chunk, feed, attention, remat, model_parallel, quantization, task, fed_round, frozen, (block, ids, weights) = best
  axis = len(target.devices) // model_parallel

  def planned(round_: federated.FederatedRound, chunk_: int) -> plan.Plan:
    return plan.plan_round(
      round_, exp.initial_trainable, frozen, block, ids, weights, target, signatures=exp.signatures,
      model_parallel=model_parallel, clients_per_chunk=chunk_, cost=cost, host_feed=feed == "host",
    )  # fmt: skip

  at_once = lambda chunk_: (chunk_ or len(ids)) // axis
  ways = [Way(chunk, at_once(chunk), attention, planned(fed_round, chunk))]
  if ways[0].report.estimated_seconds and compare and not chunks:
    tried = [chunk]
    if at_once(chunk) > 1:  # Several a device: one at a time too.
      tried.append(axis)
      ways.append(Way(axis, 1, attention, planned(fed_round, axis)))
    if attention is False:  # A decoder's attention weights recomputed: less memory, maybe faster.
      _, recomputing = _round_for(exp, dtype, remat, True)
      ways += [Way(c, at_once(c), True, planned(recomputing, c)) for c in tried]
  way = fastest(ways) if len(ways) > 1 else ways[0]
  chunk, report = way.chunk, way.report
  if way.attention != attention:
    attention = way.attention
    task, fed_round = _round_for(exp, dtype, remat, attention)
  flags_line = (
    f"--config.fed.clients_per_chunk={chunk} --config.fed.model_parallel={model_parallel} "
    f"--config.compute.backbone_quantization={quantization}"
  )
  best_flags = (
    flags_line + ("" if remat is None else f" --config.model.remat={remat}")
    + ("" if attention is None else f" --config.model.recompute_attention={attention}")
    + f" --config.data.feed={feed}"
  )  # fmt: skip
  print("best fitting: " + best_flags)
  print("\n".join(report.lines()))
  if report.estimated_seconds:
    chips = len(target.devices)
    print(run_time_line(report.estimated_seconds, config.fed.num_rounds, config.eval_every, chips, report.loops))
  evaluations = plan_evaluation(exp, task, fed_round, frozen, target, model_parallel, chunk)
  for name, evaluated in evaluations.items():
    used = evaluated.memory
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[evaluated.fits]
    hint = "" if evaluated.fits is not False else "; lower eval_batch (or data.stream_chunk_examples)"
    print(f"evaluation ({name}, eval_batch={config.eval_batch}): {plan.format_bytes(used['total'])} per "
          f"device ({verdict}): arguments {plan.format_bytes(used.get('arguments', 0))}, temporaries "
          f"{plan.format_bytes(used.get('temporaries', 0))}{hint}")  # fmt: skip
  return RunPlan(best_flags, report, config.fed.num_rounds, evaluations)


def define_flags() -> dict:
  """The command's flags, defined when it runs as a program (not on import: `experiments.sweep`
  and the tests import `plan_run` beside other modules' flags, e.g. another `--chunks`).

  Returns:
    {name: absl flag holder}.
  """
  return {
    "config": config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.", lock_config=False),
    "target": flags.DEFINE_string("target", "cpu", f"Devices to plan for: {', '.join(plan.TARGETS)}."),
    "model_parallel": flags.DEFINE_integer("model_parallel", 0, "Size of the model mesh axis (0: the config's)."),
    "chunks": flags.DEFINE_list(
      "chunks",
      [],
      "Chunks per device to plan, each (0: all at once); default: the largest that fits, found by "
      "all at once, 16, 4, 1, then bisection (hl.plan.largest_fitting_chunk).",
    ),
    "memory_gib": flags.DEFINE_float(
      "memory_gib", 0.0, "Plan against this much memory per device (GiB) instead of the chip's (0: the chip's)."
    ),
    "cost": flags.DEFINE_bool("cost", True, "Also compile the loop-free round for FLOPs and time."),
    "compare": flags.DEFINE_bool(
      "compare",
      True,
      "Where the cost model gives a time (TPUs) and --chunks is not given: also cost one client per device "
      "at a time and a decoder's attention weights recomputed, and recommend the fastest that fits.",
    ),
  }


def main(argv, defined: dict) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  value = {name: holder.value for name, holder in defined.items()}
  try:
    plan_run(
      value["config"], value["target"], model_parallel=value["model_parallel"], chunks=tuple(value["chunks"]),
      memory_gib=value["memory_gib"], cost=value["cost"], compare=value["compare"],
    )  # fmt: skip
  except NothingFits as e:
    raise SystemExit(str(e)) from None


if __name__ == "__main__":
  cli.run(functools.partial(main, defined=define_flags()), absl_app=True, load_config=cli.load_config_file)
