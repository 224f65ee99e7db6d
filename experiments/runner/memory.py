"""Will a run fit in memory? Asked twice, before the hours it could cost.

  1. Before anything is prepared (`config_validation.preflight`): a decoder's training step is
     dominated by terms the config alone gives (`decoder_step_bytes`: the logits B x T x vocab
     and the attention probabilities B x heads x T²). A local step of one client, or a
     pretraining step, larger than the device's memory is refused naming the field to lower,
     before records are tokenized or a decoder is pretrained.
  2. After the round is compiled and before it runs (`train`): the compiled round's own
     memory analysis (arguments, outputs and temporaries XLA plans) against the device's
     memory (`check_compiled_round`).

And, for `experiments.plan`, what to try where nothing fits (`settings_to_try`).

The device's memory is `memory_stats()["bytes_limit"]` on an accelerator, and the memory the
operating system reports available on the CPU (Linux: /proc/meminfo's MemAvailable).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from configs import blocks
from experiments.runner.config_facts import ConfigError

GiB = float(1 << 30)


def device_memory_bytes(device: Any = None) -> int | None:
  """Bytes one device can hold: an accelerator's `bytes_limit`, or the host's available memory
  for a CPU device (None where neither is known)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # Backends without memory statistics raise various errors.
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    return _available_host_bytes()
  return None


def _available_host_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def decoder_step_bytes(
  batch: int, length: int, vocab: int, width: int, depth: int, heads: int, bytes_per_value: int = 4
) -> int:
  """A lower bound on one training step of a decoder (forward and backward, float32): the
  logits and their gradient (2 B T V), each layer's attention probabilities kept for the
  backward (depth B H T²), and its hidden states (about 12 depth B T D). Weights and the
  optimizer are left out: this is what sequence length and batch drive."""
  logits = 2 * batch * length * vocab
  attention = depth * batch * heads * length * length
  hidden = 12 * depth * batch * length * width
  return (logits + attention + hidden) * bytes_per_value


def compiled_bytes(compiled: Any) -> int | None:
  """Peak bytes XLA plans for a compiled function (arguments + outputs + temporaries, less what
  donated arguments alias), or None when the backend does not say."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if analysis is None:
    return None
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def too_large(needed: int, available: int | None) -> bool:
  return available is not None and needed > available


def describe(needed: int, available: int) -> str:
  device = jax.local_devices()[0]
  where = "available host memory" if device.platform == "cpu" else f"memory of one {device.device_kind}"
  return f"about {needed / GiB:.1f} GiB, more than the {available / GiB:.1f} GiB {where}"


def check_compiled_round(compiled: Any, fed: blocks.Fed, input_size: tuple[str, int]) -> int | None:
  """Raises ConfigError, naming the fields that size the round, when the compiled round's
  planned memory (`compiled_bytes`) exceeds the device's; returns the planned bytes.

  Args:
    compiled: the compiled round (`jax.stages.Compiled`).
    fed: the run's `fed` block (its chunk, batch and cohort are named).
    input_size: `RunSettings.input_size`, e.g. ("data.image_size", 16).
  Returns:
    The planned bytes, or None where the backend reports none.
  """
  needed, available = compiled_bytes(compiled), device_memory_bytes()
  if needed is not None and too_large(needed, available):
    shape = f"{input_size[0]}={input_size[1]}"
    raise ConfigError(
      f"fed.clients_per_chunk: the compiled round needs {describe(needed, available)}; lower "
      f"fed.clients_per_chunk (now {fed.clients_per_chunk}: clients trained at once; 0 = all, -1 = measured), "
      f"fed.batch_size={fed.batch_size}, {shape}, or fed.clients_per_round={fed.clients_per_round} (the "
      f"round's inputs stay on the device), or hold the frozen backbone in 8 or 4 bits "
      f"(compute.backbone_quantization=int8 or nf4)"
    )
  return needed


class MemorySetting(NamedTuple):
  """One setting `experiments.plan` plans: `data.feed`, `model.recompute_attention` and
  `model.remat` (None: the model has no such option), `fed.model_parallel`,
  `compute.backbone_quantization`."""

  feed: str
  recompute_attention: bool | None
  remat: bool | None
  model_parallel: int
  quantization: str


def settings_to_try(
  remat: bool | None,
  quantization: str,
  model_parallel: int = 1,
  devices: int = 1,
  feed: str = "round",
  host_memory: bool = False,
  recompute_attention: bool | None = None,
) -> list[MemorySetting]:
  """The settings to plan, in order, each tried only if no chunk fits with the ones before: the
  configured ones; the round's inputs held in host memory (`data.feed='host'`, where the devices
  have it); the attention's weights recomputed in the backward pass (a decoder's
  `model.recompute_attention`); the backbone's blocks recomputed; the backbone split over a model
  axis twice, four times, ... as large, as long as it divides the devices; then, on the
  configured model axis, its kernels in int8, then in nf4. Host memory costs a copy of each chunk
  to the devices (no FLOPs), recomputing the attention's weights one q kᵀ product a layer (under
  1% of a 1B decoder's FLOPs at 512 tokens), recomputing the blocks about a third more FLOPs, a
  model axis collectives, quantizing accuracy: the plan tries them in that order.

  Args:
    remat: `model.remat`, or None where the model has no such option.
    quantization: `compute.backbone_quantization`.
    model_parallel: the model axis to start from.
    devices: the target's devices (0: the model axis is fixed).
    feed: `data.feed` to start from ("round" or "host").
    host_memory: whether the target's devices have pinned host memory to hold inputs in.
    recompute_attention: `model.recompute_attention`, or None where the model has no such option.
  Returns:
    E.g. [("round", False, False, 1, "none"), ("host", False, False, 1, "none"), ("host", True,
    False, 1, "none"), ("host", True, True, 1, "none"), ("host", True, True, 2, "none"), ...,
    ("host", True, True, 1, "int8"), ("host", True, True, 1, "nf4")].
  """
  order = ["none", "int8", "nf4"]
  attention = recompute_attention
  settings = [MemorySetting(feed, attention, remat, model_parallel, quantization)]
  if feed == "round" and host_memory:
    feed = "host"
    settings.append(MemorySetting(feed, attention, remat, model_parallel, quantization))
  if attention is False:
    attention = True
    settings.append(MemorySetting(feed, attention, remat, model_parallel, quantization))
  if remat is False:
    remat = True
    settings.append(MemorySetting(feed, attention, remat, model_parallel, quantization))
  axis = model_parallel * 2
  while devices and axis <= devices and devices % axis == 0:
    settings.append(MemorySetting(feed, attention, remat, axis, quantization))
    axis *= 2
  settings += [
    MemorySetting(feed, attention, remat, model_parallel, smaller) for smaller in order[order.index(quantization) + 1 :]
  ]
  return settings
