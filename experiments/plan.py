"""Plans a configured run's round for a TPU or GPU before renting one (`hyperlora_jax.plan`).

  python -m experiments.plan --config configs/default.py --target v5e:2x4
  python -m experiments.plan --config configs/instruction_tuning.py:smoke --target h100 --model_parallel 1
  python -m experiments.plan --config configs/default.py --target cpu --chunks 0,2,4

The run is built here as it would start (data, backbone, method: on this machine's CPU), then
its first round is compiled for the target's devices, nothing attached: for each candidate
`fed.clients_per_chunk`, the memory per device against the chip's (where none fits, again with
the backbone's blocks recomputed, `model.remat`, then its kernels in int8, then nf4:
`compute.backbone_quantization`); then, for the largest
chunk that fits, FLOPs, the TPU cost model's time and MFU, and the collectives. Every compiler
figure is an estimate. The frozen backbone runs in `compute.backbone_dtype` as on the target
('auto': bfloat16); images are planned with the whole round's block on the device
(`data.feed='round'`). TPU targets need libtpu (`pip install -e '.[tpu-plan]'`), GPU targets
jax-cuda12-plugin (run with JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.runner.data import blocks
from experiments.runner.experiment import build_experiment
from experiments.runner.feeding import round_inputs
from hyperlora_jax import autotune, plan, quantize
from hyperlora_jax.tasks.common import backbone_dtype, frozen_tree

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.", lock_config=False)
_TARGET = flags.DEFINE_string("target", "cpu", f"Devices to plan for: {', '.join(plan.TARGETS)}.")
_MODEL_PARALLEL = flags.DEFINE_integer("model_parallel", 0, "Size of the model mesh axis (0: the config's).")
_CHUNKS = flags.DEFINE_list("chunks", [], "Candidate clients_per_chunk values (default: divisors up to 64, and 0).")
_MEMORY_GIB = flags.DEFINE_float(
  "memory_gib", 0.0, "Plan against this much memory per device (GiB) instead of the chip's (0: the chip's)."
)
_COST = flags.DEFINE_bool("cost", True, "Also compile the loop-free round for FLOPs and time.")


def padded(tree, size: int):
  """`tree` ([C, ...] NumPy leaves) padded with zero rows to `size` rows along the first axis."""
  return jax.tree.map(
    lambda x: np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if size > len(x) else x,
    tree,
  )


def candidate_chunks(cohort_per_device: int, given: list[str]) -> list[int]:
  """The chunk sizes to plan: `given`, or every chunk `autotune.chunk_candidates` would time
  plus 0 (all at once).

  Args:
    cohort_per_device: clients of the round on one device of the clients axis.
    given: --chunks values.
  Returns:
    Distinct ints, largest first (0 first: all at once).
  """
  if given:
    return [int(c) for c in given]
  return [0] + sorted(
    set(autotune.chunk_candidates(cohort_per_device, (1, 4, 16, 64))) - {cohort_per_device}, reverse=True
  )


def memory_settings(remat: bool | None, quantization: str) -> list[tuple[bool | None, str]]:
  """The (model.remat, compute.backbone_quantization) settings to plan, in order: the configured
  ones, then (each only if no chunk fits with the one before) the backbone's blocks recomputed in
  the backward pass, then its kernels in int8, then in nf4. Recomputing costs time (about a third
  more FLOPs), quantizing costs accuracy: the plan tries the first before the second.

  Args:
    remat: `model.remat`, or None where the model has no such option.
    quantization: `compute.backbone_quantization`.
  Returns:
    E.g. [(False, "none"), (True, "none"), (True, "int8"), (True, "nf4")].
  """
  order = ["none", "int8", "nf4"]
  settings = [(remat, quantization)]
  if remat is False:
    settings.append((True, quantization))
    remat = True
  settings += [(remat, smaller) for smaller in order[order.index(quantization) + 1 :]]
  return settings


def _round_for(exp, dtype, remat: bool | None):
  """The run's round with the backbone in `dtype` and its blocks recomputed as `remat` says."""
  task = dataclasses.replace(exp.task, compute_dtype=dtype)
  if remat is not None:
    task = dataclasses.replace(task, model=task.model.clone(remat=remat))
  return dataclasses.replace(
    exp.fed_round, client_update=dataclasses.replace(exp.fed_round.client_update, loss_fn=task.loss_fn)
  )


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.data.feed = "round"
  if config.fed.clients_per_chunk < 0:
    config.fed.clients_per_chunk = 0  # Nothing is timed here: the plan compares chunks itself.
  target = plan.target(_TARGET.value)
  if _MEMORY_GIB.value:
    target = dataclasses.replace(target, memory_bytes=int(_MEMORY_GIB.value * plan.GIB), usable_fraction=1.0)
  model_parallel = _MODEL_PARALLEL.value or config.fed.get("model_parallel", 1)
  config.fed.num_devices, config.fed.model_parallel = 1, 1  # Built on this machine's one device.
  exp = build_experiment(config, log=lambda line: print(f"  build: {line}"))
  dtype = backbone_dtype(config.compute.backbone_dtype, backend=target.platform)
  block, ids, weights = round_inputs(exp, 0)
  axis = len(target.devices) // model_parallel
  ids = blocks.pad_client_ids(ids, axis)  # A multiple of the clients axis, as the runner pads.
  cohort = len(ids)
  block, weights = padded(block, cohort), padded(weights, cohort)  # Padding clients: no example, weight 0.
  print(
    f"plan of {config.method} on {target.name}: {cohort} clients a round ({cohort // axis} per device of the "
    f"clients axis), {config.fed.local_steps} local steps of {config.fed.batch_size}, model axis {model_parallel}, "
    f"backbone in {np.dtype(dtype).name}; compiler estimates, nothing ran"
  )
  configured = (getattr(exp.task.model, "remat", None), config.compute.get("backbone_quantization", "none"))
  block_size = config.compute.get("quantization_block", 0)
  best = None
  for remat, quantization in memory_settings(*configured):
    fed_round = _round_for(exp, dtype, remat)
    frozen = frozen_tree(exp.backbone, dtype=dtype, quantization=quantization, quantization_block=block_size)
    storage = quantization if quantization != "none" else np.dtype(dtype).name
    print(f" model.remat={remat}, frozen backbone in {storage}: {plan.format_bytes(quantize.tree_bytes(frozen))} "
          "in all")  # fmt: skip
    for chunk in candidate_chunks(cohort // axis, _CHUNKS.value):
      report = plan.plan_round(
        fed_round, exp.initial_trainable, frozen, block, ids, weights, target,
        signatures=exp.signatures, model_parallel=model_parallel, clients_per_chunk=chunk * axis, cost=False,
      )  # fmt: skip
      total = plan.format_bytes(report.memory["total"])
      print(f"  clients_per_chunk={chunk * axis} ({chunk or cohort // axis} per device): {total} per device"
            + {True: "", False: "  DOES NOT FIT", None: ""}[report.fits])  # fmt: skip
      if best is None and report.fits is not False:
        best = (chunk * axis, remat, quantization, fed_round, frozen)
    if best is not None:
      break
  if best is None:
    raise SystemExit(f"fed.clients_per_chunk: no candidate fits {target.name}, the backbone recomputed and in 4 "
                     f"bits included; lower fed.clients_per_round, fed.batch_size or the model, or raise "
                     f"--model_parallel")  # fmt: skip
  chunk, remat, quantization, fed_round, frozen = best
  report = plan.plan_round(
    fed_round, exp.initial_trainable, frozen, block, ids, weights, target,
    signatures=exp.signatures, model_parallel=model_parallel, clients_per_chunk=chunk, cost=_COST.value,
  )  # fmt: skip
  flags_line = f"--config.fed.clients_per_chunk={chunk} --config.compute.backbone_quantization={quantization}"
  print("best fitting: " + flags_line + ("" if remat is None else f" --config.model.remat={remat}"))
  print("\n".join(report.lines()))


if __name__ == "__main__":
  cli.run(main, absl_app=True, load_config=cli.load_config_file)
