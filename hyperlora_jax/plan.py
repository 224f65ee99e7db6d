"""Plan a jitted computation for accelerators you do not have: compile it for compile-only TPU or
GPU devices (or this machine's), then read what XLA planned, per device: memory against the
chip's, FLOPs, the TPU cost model's time, and the collectives it moves. Nothing runs.

    target = plan.target("v5e:2x4")                    # compile-only devices and the chip's facts
    report = plan.plan_round(fed_round, state, frozen, batches, ids, weights, target)
    print("\\n".join(report.lines()))

Targets (`TARGETS`): TPU topologies ("v4:2x2x1", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v6e:2x4";
any `get_topology_desc` name of those generations) need `libtpu` (`pip install
hyperlora_jax[tpu-plan]`); GPUs ("h100", "h100x8", "h200", "h200x8") need `jax-cuda12-plugin`
(`[gpu-plan]`, run with JAX_PLATFORMS=cpu) and XLA's target config of the chip (shipped in
`plan_targets/`); "cpu" / "cpu:N" plans for this
machine's devices (with `XLA_FLAGS=--xla_force_host_platform_device_count=N`, N of them).

What the figures are: memory is the compiled program's own plan (`memory_analysis`: arguments,
outputs less what they alias, temporaries, code), exact for that compiler. FLOPs and the TPU
time are compiler estimates (`cost_analysis`), corrected for two traps found in them: a loop
body is counted once (so `plan_round` reads the cost from the round compiled without those
loops, one chunk's clients at once and the local steps unrolled, at 2 and 3 steps, extrapolated
to the run's S and multiplied by its chunks; loops left, e.g. an aggregator's own iterations, are reported), and the TPU's `optimal_seconds` is lowered by 1.0 s
for each `ConcatBitcast` / `ZeroCrop` custom call (added back). Where the TPU time goes is read
from the cycles its cost model writes for each fused op (`cycles_by_op`, `Plan.time_shares`),
with the ops it could not price counted (`Plan.unpriced`). The GPU compiler gives no cost
analysis and refuses no program for its size: `fits` is this module's comparison with the chip's
memory. Label every such figure an estimate; measure on a device when one is lent.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from hyperlora_jax import autotune, federated, primitives
from hyperlora_jax.pytree import Tree

GIB = 2**30


def format_seconds(seconds: float) -> str:
  """A time for people to read.

  Args:
    seconds: >= 0.
  Returns:
    '1.50 s', '12.3 ms' or '45.6 µs'.
  """
  if seconds >= 1:
    return f"{seconds:.2f} s"
  return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def format_bytes(count: float) -> str:
  """A size for people to read.

  Args:
    count: bytes.
  Returns:
    '1.25 GiB', or MiB below a tenth of a GiB ('0.818 MiB').
  """
  return f"{count / GIB:.2f} GiB" if count >= GIB // 10 else f"{count / 2**20:.3f} MiB"


def format_shares(shares: tuple[tuple[str, float], ...]) -> str:
  """`Plan.time_shares` for people to read.

  Args:
    shares: ((op label, share), ...).
  Returns:
    'backward attn/dot_general 18%, forward mlp/up/dot_general 7%'.
  """
  return ", ".join(f"{label} {share:.0%}" for label, share in shares)


@dataclasses.dataclass(frozen=True)
class Chip:
  """What a plan needs of a chip: its memory per device and its peak dense bf16 FLOP/s."""

  memory_bytes: int
  peak_flops: float


# Per compile-only device. HBM as the TPU compiler states it when it refuses a program; a v4
# compile-only device is one TensorCore (half a chip). Peak bf16 FLOP/s from the vendors' sheets.
TPU_CHIPS = {
  "v4": Chip(int(15.25 * GIB), 137.5e12),
  "v5e": Chip(int(15.75 * GIB), 197e12),
  "v5p": Chip(int(95.74 * GIB), 459e12),
  "v6e": Chip(int(31.25 * GIB), 918e12),
}
# GPU name -> (target config file in plan_targets/, peak dense bf16 FLOP/s).
GPU_CHIPS = {"h100": ("h100_sxm.txtpb", 989e12), "h200": ("h200.txtpb", 989e12)}
TARGETS = ("v4:2x2x1", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v6e:2x4", "h100", "h100x8", "h200", "h200x8", "cpu", "cpu:N")
# Custom calls each of which lowers the TPU's `optimal_seconds` by exactly 1.0 s (libtpu 0.0.42:
# ConcatBitcast and ZeroCrop on every TPU; PrepareAsyncCallStart / -Done on v6e, whose TinyLlama
# round read -9.6 s without them). A time still not positive after them is reported as none.
_SECOND_LOWERING_CALLS = ("ConcatBitcast", "ZeroCrop", "PrepareAsyncCallStart", "PrepareAsyncCallDone")
# The TPU's linear-algebra custom calls (QR, Cholesky, LU, eigh, triangular inverses: what
# `jnp.linalg.svd` / `qr` / `cholesky` / `inv` / `eigh` become on a TPU) also lower it by exactly
# 1.0 s each, and carry no estimate of their own: their time is in no estimate, and the plan
# counts them as unpriced (a HyperLoRA round's SVDs read -36 s for 36 such calls, libtpu 0.0.42).
# Checked one by one (QR, Cholesky, eigh, SVD, triangular solve, inverse, each alone and two at
# once), inside loops (1 s each at any depth) and conditionals (the dearest branch counts).
_UNPRICED_CALLS = (
  "QrDecompositionBlock", "CompactWyHelper", "Cholesky", "EighTpu", "LuDecompositionBlock",
  "InvertDiagBlocksLowerTriangular", "InvertDiagBlocksUpperTriangular",
)  # fmt: skip
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_DTYPE_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1})


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for and the facts of their chip.

  Attributes:
    name: as given to `target`.
    platform: "tpu", "gpu" or "cpu".
    devices: the (compile-only, for TPU and GPU) devices.
    memory_bytes: per device (None: unknown, no fit check).
    peak_flops: per device, dense bf16 (None: unknown, no MFU).
    usable_fraction: of the memory a run may use: JAX's GPU allocator takes 75% unless
      XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (1 elsewhere).
    compiler_options: XLA options every compile for it needs (GPU: no Triton GEMMs, whose
      autotuning needs a device).
  """

  name: str
  platform: str
  devices: tuple
  memory_bytes: int | None
  peak_flops: float | None
  usable_fraction: float = 1.0
  compiler_options: dict = dataclasses.field(default_factory=dict)

  @property
  def usable_bytes(self) -> int | None:
    """The bytes per device a program may plan for (what `Plan.fits` compares with)."""
    return None if self.memory_bytes is None else int(self.memory_bytes * self.usable_fraction)

  def mesh(self, model_parallel: int = 1) -> Mesh:
    """A mesh over the target's devices: ("clients",), or ("clients", "model") with a `model`
    axis of `model_parallel` devices (as `primitives.make_mesh`).

    Args:
      model_parallel: M, dividing the number of devices.
    Returns:
      A `Mesh`.
    """
    count = len(self.devices)
    if model_parallel < 1 or count % model_parallel:
      raise ValueError(f"model_parallel={model_parallel} must be >= 1 and divide the {count} devices of {self.name}")
    grid = np.array(self.devices)
    if model_parallel == 1:
      return Mesh(grid, (primitives.CLIENTS_AXIS,))
    return Mesh(grid.reshape(count // model_parallel, model_parallel), (primitives.CLIENTS_AXIS, primitives.MODEL_AXIS))


def target(name: str) -> Target:
  """The devices and chip facts of a target name (`TARGETS`).

  Args:
    name: a TPU topology ("v5e:2x4"), a GPU ("h100", "h100x8": 8 of them), or "cpu" / "cpu:N".
  Returns:
    A `Target`.
  Raises:
    ValueError: an unknown name, or a missing compiler (naming what to install).
  """
  generation = name.split(":")[0]
  if generation in TPU_CHIPS and ":" in name:
    return _tpu_target(name, TPU_CHIPS[generation])
  gpu = re.fullmatch(r"(h100|h200)(?:x(\d+))?", name)
  if gpu:
    return _gpu_target(name, gpu.group(1), int(gpu.group(2) or 1))
  cpu = re.fullmatch(r"cpu(?::(\d+))?", name)
  if cpu:
    devices = jax.devices("cpu")
    count = int(cpu.group(1) or len(devices))
    if count > len(devices):
      raise ValueError(
        f"target {name!r}: {len(devices)} CPU device(s) here; set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts"
      )
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return Target(name, "cpu", tuple(devices[:count]), pages * page_size // count, None)
  raise ValueError(f"target {name!r}; known: {', '.join(TARGETS)} (TPU: any topology of {', '.join(TPU_CHIPS)})")


def _tpu_target(name: str, chip: Chip) -> Target:
  from jax.experimental import topologies

  # libtpu lets one process at a time use it (a lockfile in /tmp), for TPUs attached; compiling
  # for compile-only devices touches none, so several planning processes may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # No libtpu, or a topology it does not know.
    raise ValueError(
      f"target {name!r}: no compile-only TPU devices ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
      f"planning for TPUs needs libtpu: pip install 'hyperlora_jax[tpu-plan]'"
    ) from None
  return Target(name, "tpu", tuple(topology.devices), chip.memory_bytes, chip.peak_flops)


def _gpu_target(name: str, chip: str, count: int) -> Target:
  from jax.experimental import topologies

  config_file, peak = GPU_CHIPS[chip]
  with open(os.path.join(os.path.dirname(__file__), "plan_targets", config_file)) as f:
    config_text = f.read()
  memory = int(re.search(r"device_memory_size:\s*(\d+)", config_text).group(1))  # type: ignore[union-attr]
  try:
    topology = topologies.get_topology_desc("plan", platform="cuda", target_config=config_text, topology=f"1x1x{count}")
  except Exception as e:  # No CUDA plugin.
    raise ValueError(
      f"target {name!r}: no compile-only GPUs ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
      f"planning for GPUs needs jax-cuda12-plugin and jax-cuda12-pjrt of jax's version "
      f"(pip install -e '.[gpu-plan]') and JAX_PLATFORMS=cpu"
    ) from None
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
  return Target(name, "gpu", tuple(topology.devices), memory, peak, fraction, {"xla_gpu_enable_triton_gemm": False})


@dataclasses.dataclass(frozen=True)
class Plan:
  """What XLA planned for one program on one target, per device.

  Attributes:
    target: the `Target`.
    memory: bytes per device: {"arguments", "outputs", "aliased", "temporaries", "code", "total"}
      (total = arguments + outputs - aliased + temporaries + code).
    fits: total <= the target's usable memory (`Target.usable_bytes`; None: unknown).
    flops: the program's FLOPs per device (estimate; None: no cost analysis, GPU).
    estimated_seconds: the TPU cost model's time (corrected; None elsewhere).
    loops: while loops left in the program the cost was read from (their bodies counted once).
    collectives: {kind: (count, bytes of their results)} in the program, each counted once
      where it appears (inside a loop it runs once per iteration).
    refused: the compiler's message when it refused the program for its size (the TPU's
      RESOURCE_EXHAUSTED; memory then holds only its "total", the figure it states); "" else.
    time_shares: where the TPU cost model's time goes: the largest shares of the cycles it gives
      the program's ops, by op (`cycles_by_op`), largest first; () elsewhere.
    unpriced: {kind: ops run} the TPU cost model gave no cycles (their time is in no estimate).
  """

  target: Target
  memory: dict[str, int]
  fits: bool | None
  flops: float | None
  estimated_seconds: float | None
  loops: int
  collectives: dict[str, tuple[int, int]]
  refused: str = ""
  time_shares: tuple[tuple[str, float], ...] = ()
  unpriced: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def mfu(self) -> float | None:
    """Estimated model-FLOPs utilization: flops / (estimated seconds x peak), or None."""
    if self.flops is None or not self.estimated_seconds or not self.target.peak_flops:
      return None
    return self.flops / (self.estimated_seconds * self.target.peak_flops)

  def lines(self) -> list[str]:
    """The plan as text, every compiler figure labelled an estimate where it is one.

    Returns:
      Lines without newlines.
    """
    gib = format_bytes
    m, t = self.memory, self.target
    if self.refused:
      return [
        f"target {t.name} ({t.platform}, {len(t.devices)} devices); per device:",
        f"  memory: DOES NOT FIT: the compiler refused it ({self.refused})",
      ]
    capacity = f" of {gib(t.usable_bytes)}" if t.usable_bytes else ""
    if t.usable_fraction < 1 and t.memory_bytes:
      capacity += f" usable ({t.usable_fraction:.0%} of {gib(t.memory_bytes)}: XLA_PYTHON_CLIENT_MEM_FRACTION)"
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[self.fits]
    out = [
      f"target {t.name} ({t.platform}, {len(t.devices)} devices); per device:",
      f"  memory: {gib(m['total'])}{capacity} ({verdict}): arguments {gib(m['arguments'])}, outputs "
      f"{gib(m['outputs'])} ({gib(m['aliased'])} aliased to arguments), temporaries {gib(m['temporaries'])}"
      + (
        f"; in host memory: {gib(m['host_arguments'])} of arguments (data.feed='host')" if "host_arguments" in m else ""
      ),
    ]
    if self.flops is not None:
      out.append(
        f"  FLOPs (compiler estimate): {self.flops:.3e}"
        + (f"; {self.loops} loop(s) counted once" if self.loops else "")
      )
    if self.estimated_seconds is not None:
      mfu = f", estimated MFU {self.mfu:.1%}" if self.mfu is not None else ""
      counted_once = f"; {self.loops} loop(s) counted once: at least this" if self.loops else ""
      out.append(f"  time (TPU cost model estimate): {format_seconds(self.estimated_seconds)}{mfu}{counted_once}")
    if self.time_shares:
      out.append(
        f"  where the estimated time goes (share of the cost model's cycles, by op): {format_shares(self.time_shares)}"
      )
    if self.unpriced:
      kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.unpriced.items()))
      out.append(f"  ops the TPU cost model could not price (not in the time estimate): {kinds}")
    for kind, (count, size) in sorted(self.collectives.items()):
      out.append(f"  {kind}: {count} op(s) moving {size / 2**20:.2f} MiB")
    if not self.collectives:
      out.append("  collectives: none")
    return out


def memory_of(compiled: Any) -> dict[str, int]:
  """Bytes per device a compiled program plans.

  Args:
    compiled: `jax.jit(f).lower(...).compile()`.
  Returns:
    {"arguments", "outputs", "aliased", "temporaries", "code", "total"}: device memory; and, where
    the program reads arguments held in host memory (`primitives.HostFeed`), "host_arguments",
    not in the total.
  """
  stats = compiled.memory_analysis()
  memory = {
    "arguments": int(stats.argument_size_in_bytes),
    "outputs": int(stats.output_size_in_bytes),
    "aliased": int(stats.alias_size_in_bytes),
    "temporaries": int(stats.temp_size_in_bytes),
    "code": int(stats.generated_code_size_in_bytes),
  }
  memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + memory["code"]
  host_arguments = int(getattr(stats, "host_argument_size_in_bytes", 0) or 0)
  if host_arguments:
    memory["host_arguments"] = host_arguments
  return memory


def _shape_bytes(text: str) -> int:
  """Bytes of the HLO result shapes in `text` ("f32[8,16]{1,0}", or a tuple of them)."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its lines} of an HLO module's text ("" for lines outside any header)."""
  computations: dict[str, list[str]] = {"": []}
  current = ""
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = "ENTRY" if line.startswith("ENTRY") else header.group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = ""
    else:
      computations[current].append(line)
  return computations


def _trip_count(while_line: str, computations: dict[str, list[str]], condition: str) -> int | None:
  """A while loop's trip count: the compiler's `known_trip_count` where it wrote one (XLA:CPU,
  XLA:GPU), else read from its condition: `counter < N` with one integer constant N (how JAX
  lowers scan and fori_loop, the counter from 0; the TPU compiler's text); None otherwise."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_line)
  if known:
    return int(known.group(1))
  lines = computations.get(condition, [])
  called = [c for line in lines for c in re.findall(r"calls=%?([\w.\-]+)", line)]
  text = "\n".join(lines + [line for c in called for line in computations.get(c, [])])
  constants = re.findall(r"=\s*s32\[\][^=]*\bconstant\((\d+)\)", "\n".join(lines))
  if len(constants) == 1 and "direction=LT" in text:
    return int(constants[0])
  return None


def loop_multipliers(hlo_text: str) -> dict[str, int]:
  """How many times each computation of an HLO module runs per run of the module: summed over its
  call sites, each site's caller's runs times the trip count of the while loop it is the body of
  (`_trip_count`; a loop whose count cannot be read counts once). Computations not reached from
  ENTRY (or lines without a header) count once.

  Args:
    hlo_text: the module's text.
  Returns:
    {computation name: runs}.
  """
  computations = _computations(hlo_text)
  sites = {name: _call_sites(lines, computations) for name, lines in computations.items()}
  reached = ["ENTRY"] if "ENTRY" in computations else []
  seen = set(reached)
  for name in reached:  # Grows while it is read: every computation reachable from ENTRY.
    fresh = list(dict.fromkeys(child for child, _ in sites[name] if child not in seen))
    reached += fresh
    seen.update(fresh)
  callers = dict.fromkeys(reached, 0)
  for name in reached:
    for child, _ in sites[name]:
      callers[child] += 1
  runs = dict.fromkeys(computations, 1)
  runs.update({name: int(name == "ENTRY") for name in reached})
  ready = reached[:1]  # ENTRY, the one reached computation no other calls (HLO calls no cycles).
  while ready:
    name = ready.pop()
    for child, factor in sites[name]:
      runs[child] += runs[name] * factor
      callers[child] -= 1
      if callers[child] == 0:
        ready.append(child)
  return runs


def _outside_conditionals(hlo_text: str) -> dict[str, list[str]]:
  """{name: lines} of the computations an HLO module's ENTRY reaches without entering a branch of
  a conditional (loop bodies included): those whose unpriced calls lower the TPU cost model's
  time (a conditional costs the most expensive of its branches, so a branch's sentinels drop out)."""
  computations = _computations(hlo_text)
  reached = ["ENTRY"] if "ENTRY" in computations else [""]  # "": lines under no header.
  for name in reached:  # Grows while it is read.
    for line in computations[name]:
      if re.search(r"\sconditional\(", line):
        continue
      for child, _ in _call_sites([line], computations):
        if child not in reached:
          reached.append(child)
  return {name: computations[name] for name in reached}


def _call_sites(lines: list[str], computations: dict[str, list[str]]) -> list[tuple[str, int]]:
  """(callee, runs per run of the caller) of each call site in a computation's lines: a while
  loop's body runs its trip count, its condition one more; any other callee once."""
  sites: list[tuple[str, int]] = []
  for line in lines:
    loop = re.search(r"\swhile\(.*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)", line)
    if loop:
      trips = _trip_count(line, computations, loop.group(1)) or 1
      sites += [(loop.group(1), trips + 1), (loop.group(2), trips)]
      continue
    for group in re.findall(r"(?:calls|to_apply|branch_computations)=\{?([^}\s]*(?:,\s*%[\w.\-]+)*)\}?", line):
      sites += [(child.strip().lstrip("%"), 1) for child in group.split(",") if child.strip()]
  return [(child, factor) for child, factor in sites if child in computations]


def collectives_of(hlo_text: str) -> dict[str, tuple[int, int]]:
  """The collectives a run of an HLO module performs (after SPMD partitioning: `compiled.as_text()`),
  each op counted as many times as the loops around it run (`loop_multipliers`).

  Args:
    hlo_text: the module's text.
  Returns:
    {kind: (ops run, bytes of their results)}; an asynchronous pair (`-start` / `-done`) counts once.
  """
  runs = loop_multipliers(hlo_text)
  found: dict[str, list[int]] = {}
  for name, lines in _computations(hlo_text).items():
    for line in lines:
      match = re.match(r"\s*(?:ROOT\s+)?\S+\s*=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
      if match:
        counts = found.setdefault(match.group(2), [0, 0])
        counts[0] += runs.get(name, 1)
        counts[1] += runs.get(name, 1) * _shape_bytes(match.group(1))
  return {kind: (count, size) for kind, (count, size) in found.items()}


_UNPRICED_CYCLES = 2**62  # The TPU compiler writes INT64_MAX (or -2 unsigned) where it has no estimate.


def op_label(op_name: str) -> str:
  """A short, layer-free label of a JAX op name, for summing an op's cost over layers:
  "jit(step)/vmap()/closed_call/transpose(jvp(DecoderLM))/block_3/attn/value/dot_general" ->
  "backward attn/value/dot_general" (forward where no `transpose(` wraps it).

  Args:
    op_name: an HLO instruction's `metadata={op_name=...}`.
  Returns:
    "forward|backward <the last three scopes, block numbers and JAX's wrappers dropped>".
  """
  scopes = [
    part
    for part in op_name.split("/")
    if part and not re.fullmatch(r"(jit|jvp|transpose|vmap)\(.*\)|closed_call|block_\d+|layers_\d+", part)
  ]
  return ("backward " if "transpose(" in op_name else "forward ") + "/".join(scopes[-3:])


def cycles_by_op(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
  """The TPU cost model's cycles per op of a compiled module, from the `estimated_cycles` the TPU
  compiler writes into each top-level fusion's backend config, times the runs of the loops
  around it (`loop_multipliers`), summed by `op_label`; and the ops it gave no estimate (a
  scatter it offloads, a QR or Cholesky custom call), by kind. Other compilers write none: ({}, {}).

  Args:
    hlo_text: `compiled.as_text()` of a program compiled for TPU devices.
  Returns:
    ({label: cycles}, {kind: ops run without an estimate}).
  """
  computations, runs = _computations(hlo_text), loop_multipliers(hlo_text)
  fused = {
    c
    for lines in computations.values()
    for line in lines
    if " fusion(" in line
    for c in re.findall(r"calls=%?([\w.\-]+)", line)
  }
  cycles: dict[str, int] = {}
  unpriced: dict[str, int] = {}
  for name, lines in computations.items():
    if name in fused:  # Inside a fusion: priced as part of it.
      continue
    for line in lines:
      call = re.search(r'custom_call_target="(\w+)"', line)
      if call and call.group(1) in _UNPRICED_CALLS:  # Linear algebra: no estimate, 1 s off the time.
        unpriced[call.group(1)] = unpriced.get(call.group(1), 0) + runs.get(name, 1)
        continue
      estimate = re.search(r'"estimated_cycles":"(\d+)"', line)
      if not estimate:
        continue
      if int(estimate.group(1)) >= _UNPRICED_CYCLES:
        instruction = re.match(r"\s*(?:ROOT\s+)?%?([\w\-]+?)(?:\.\d+)?\s*=", line)
        kind = instruction.group(1) if instruction else "?"
        unpriced[kind] = unpriced.get(kind, 0) + runs.get(name, 1)
        continue
      op_name = re.search(r'op_name="([^"]*)"', line)
      label = op_label(op_name.group(1)) if op_name else "unnamed"
      cycles[label] = cycles.get(label, 0) + int(estimate.group(1)) * runs.get(name, 1)
  return cycles, unpriced


def time_shares(cycles: dict[str, int], top: int = 8) -> tuple[tuple[str, float], ...]:
  """The `top` largest shares of `cycles_by_op`'s cycles, largest first.

  Args:
    cycles: {label: cycles}.
    top: how many.
  Returns:
    ((label, share of all the cycles), ...).
  """
  total = sum(cycles.values())
  ranked = sorted(cycles.items(), key=lambda item: -item[1])[:top]
  return tuple((label, count / total) for label, count in ranked) if total else ()


def cost_of(compiled: Any) -> tuple[float | None, float | None, int]:
  """(FLOPs, corrected TPU seconds, while loops) of a compiled program, per device.

  Args:
    compiled: a compiled program.
  Returns:
    FLOPs (None without a cost analysis), `optimal_seconds` plus 1.0 s per `ConcatBitcast`,
    `ZeroCrop`, `PrepareAsyncCallStart` or `-Done` custom call and per linear-algebra call
    (QR, Cholesky, LU, eigh: whose own time is then in no estimate; `cycles_by_op` counts them
    unpriced), each outside the branches of conditionals (a conditional costs its dearest
    branch, so a branch's calls take nothing off) (None where the compiler gives none, or where
    that is not positive: a call of the kind not known yet, or one in every branch of a
    conditional), and the number of while loops (whose bodies the analysis counted once).
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  text = compiled.as_text()
  loops = len(re.findall(r"\swhile\(", text))
  if not analysis:
    return None, None, loops
  seconds = analysis.get("optimal_seconds")
  if seconds is not None:
    # Only the calls outside conditionals take their second off (an SVD of [384, 384] on a v5e:
    # 73 such calls, 20 of them outside its conditionals' branches, read -20.0 s).
    straight = "\n".join(line for lines in _outside_conditionals(text).values() for line in lines)
    calls = _SECOND_LOWERING_CALLS + _UNPRICED_CALLS
    lowering = sum(len(re.findall(rf'custom_call_target="{name}"', straight)) for name in calls)
    seconds = float(seconds) + 1.0 * lowering
    seconds = seconds if seconds > 0 else None  # Another call of the kind: no time rather than a wrong one.
  flops = analysis.get("flops")
  return (None if flops is None else float(flops)), seconds, loops


def analyze(compiled: Any, target_: Target, cost_compiled: Any = None) -> Plan:
  """The `Plan` of a program compiled for `target_`'s devices.

  Args:
    compiled: the program as it would run (its memory and collectives).
    target_: the devices it was compiled for.
    cost_compiled: the same arithmetic compiled without its loops, to read the cost from
      (None: `compiled`, loops counted once).
  Returns:
    A `Plan`.
  """
  memory = memory_of(compiled)
  flops, seconds, loops = cost_of(cost_compiled if cost_compiled is not None else compiled)
  seconds = seconds if target_.platform == "tpu" else None  # Only the TPU compiler has a time model.
  fits = None if target_.usable_bytes is None else memory["total"] <= target_.usable_bytes
  return Plan(target_, memory, fits, flops, seconds, loops, collectives_of(compiled.as_text()))


def refused_plan(message: str, target_: Target) -> Plan:
  """The `Plan` of a program the compiler refused for its size.

  Args:
    message: the compiler's error, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total
      memory required for HLO temporaries (28.37G) exceeds available HBM (15.75G)".
    target_: the devices it was compiled for.
  Returns:
    A `Plan` with fits False and memory {"total": the bytes the message states (0 if none)}.
  """
  line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message.splitlines()[0])
  stated = re.search(r"\(([\d.]+)([KMGT])\)", line)
  total = int(float(stated.group(1)) * 1024 ** "KMGT".index(stated.group(2)) * 1024) if stated else 0
  return Plan(target_, {"total": total}, False, None, None, 0, {}, line.strip()[:300])


def abstract(tree: Tree, shardings: Tree) -> Tree:
  """`tree` as `jax.ShapeDtypeStruct`s placed by `shardings` (nothing is copied to a device).

  Args:
    tree: arrays or ShapeDtypeStructs.
    shardings: `tree`'s structure with `Sharding` leaves.
  Returns:
    `tree`'s structure with ShapeDtypeStruct leaves.
  """
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
  dtype = lambda x: x.dtype if hasattr(x, "dtype") else jax.numpy.result_type(x)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(shape(x), dtype(x), sharding=s), tree, shardings)


def plan_program(fn: Callable[..., Any], args: tuple, shardings: tuple, target_: Target) -> Plan:
  """Plans any program for `target_`: `jax.jit(fn)` compiled for its devices with `args` placed by
  `shardings` (e.g. a run's evaluation). Memory and collectives as for a round; FLOPs and time as
  XLA counts them, a loop body once (`Plan.loops` says how many loops there are).

  Args:
    fn: the function, as it would be jitted.
    args: its positional arguments (arrays or ShapeDtypeStructs; pytrees).
    shardings: for each argument, its structure with `Sharding` leaves (e.g.
      `primitives.frozen_shardings(frozen, target_.mesh())`).
    target_: the devices to plan for.
  Returns:
    The `Plan` (a program the TPU compiler refuses for its size: fits False, with its figure).
  """
  inputs = tuple(abstract(a, s) for a, s in zip(args, shardings))
  try:
    compiled = jax.jit(fn).lower(*inputs).compile(compiler_options=target_.compiler_options or None)
  except Exception as e:  # XLA's own error type: the TPU compiler refuses what exceeds HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return refused_plan(str(e), target_)
  return analyze(compiled, target_)


def plan_round(
  fed_round: federated.FederatedRound,
  trainable: Tree,
  frozen: Tree,
  batches: Tree,
  client_ids: Any,
  weights: Any,
  target_: Target,
  *,
  signatures: Any = None,
  model_parallel: int = 1,
  clients_per_chunk: int | None = None,
  cost: bool = True,
  host_feed: bool = False,
) -> Plan:
  """Plans one round (`fed_round.step`) for `target_`: the round compiled as it would run there
  (the per-client store over the `clients` axis, the frozen tree split over a `model` axis of
  `model_parallel` devices, each round input over `clients`), and, for the cost, with every
  client of one chunk at once (all clients without chunks) and the local steps unrolled (same
  arithmetic, no loops), at 2 and 3 local steps: the round's cost is that chunk's, extrapolated
  to S steps (it is affine in S; S unrolled steps would take S times as long to compile), times
  the chunks it runs in turn (the server's own work, small, is counted once per chunk).

  Args:
    fed_round: the round (its mesh and chunk are replaced for the target).
    trainable: the round-0 trainable tree `fed_round.init` takes (arrays or ShapeDtypeStructs).
    frozen: the task's frozen tree.
    batches, client_ids, weights: one round's inputs ([C, S (+ h), B, ...], [C], [C]); C a
      multiple of the target's `clients` axis.
    target_: the devices to plan for.
    signatures: [N, D] client signatures, as `fed_round.init` takes them (None: none).
    model_parallel: M, the `model` axis.
    clients_per_chunk: clients vmapped together (None: `fed_round`'s).
    cost: also compile the loop-free programs for FLOPs and time (two more compiles); without,
      the plan has no FLOPs and no time (the looped program's count each loop body once).
    host_feed: plan `batches` held in pinned host memory and moved to the devices a chunk at a
      time (`primitives.HostFeed`, replacing `fed_round.load_batches`; `data.feed='host'`); their
      bytes then count in `memory["host_arguments"]`, not in the device's total. The cost is
      planned with them on the device (same arithmetic).
  Returns:
    The `Plan` (memory and collectives of the round as it would run; cost of the loop-free one).
  Raises:
    ValueError: a cohort that does not divide; `host_feed` on devices without host memory.
  """
  mesh = target_.mesh(model_parallel)
  chunk = fed_round.clients_per_chunk if clients_per_chunk is None else clients_per_chunk
  cohort, axis = int(client_ids.shape[0]), primitives.clients_axis_size(mesh)
  if cohort % axis or (chunk and cohort % chunk):
    raise ValueError(
      f"plan_round: a cohort of {cohort} clients on {target_.name} must be a multiple of its clients axis "
      f"({axis} devices) and of clients_per_chunk={chunk}; pad it (id -1, weight 0)"
    )
  placed = dataclasses.replace(fed_round, mesh=mesh, clients_per_chunk=chunk)
  per_client = primitives.clients_sharding(mesh)
  device_batches = abstract(batches, jax.tree.map(lambda _: per_client, batches))
  round_batches = device_batches
  if host_feed:
    if not primitives.has_host_memory(target_.devices[0]):
      raise ValueError(f"plan_round: host_feed: {target_.name}'s devices list no pinned host memory to plan it in")
    feed = primitives.HostFeed.of(batches, mesh)
    placed, round_batches = dataclasses.replace(placed, load_batches=feed.load), feed.held(batches)
  state = jax.eval_shape(lambda t, s: placed.init(jax.random.key(0), t, s), trainable, signatures)
  inputs = (
    abstract(state, federated.state_shardings(state, mesh)),
    abstract(frozen, primitives.frozen_shardings(frozen, mesh)),
    round_batches,
    abstract(client_ids, per_client),
    abstract(weights, per_client),
  )

  def compile_round(round_: federated.FederatedRound, args: tuple) -> Any:
    lowered = jax.jit(round_.step, donate_argnums=(0,)).lower(*args)
    return lowered.compile(compiler_options=target_.compiler_options or None)

  try:
    report = analyze(compile_round(placed, inputs), target_)
  except Exception as e:  # XLA's own error type: the TPU compiler refuses what exceeds HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return refused_plan(str(e), target_)
  if not cost:  # The looped program's FLOPs and time count each loop body once: none rather than those.
    return dataclasses.replace(report, flops=None, estimated_seconds=None)
  # The cost without loops: one chunk's clients at once (all of them without chunks), the local
  # steps unrolled, times the chunks the round runs one after the other. A round's cost is
  # affine in its local steps S (the steps are alike), so rounds of 2 and 3 steps give it for any S.
  heldout = fed_round.aggregator.capabilities.heldout_steps
  steps = int(jax.tree.leaves(batches)[0].shape[1]) - heldout
  chunk_clients = chunk or cohort
  unrolled = dataclasses.replace(fed_round.client_update, unroll=True, steps=None)
  cost_round = dataclasses.replace(fed_round, mesh=mesh, clients_per_chunk=0, client_update=unrolled)

  def resized(x: Any, *steps_axis: int) -> jax.ShapeDtypeStruct:  # [chunk_clients, (steps,) ...]
    shape = (chunk_clients, *steps_axis) + tuple(x.shape[1 + len(steps_axis) :])
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)

  costs, by_op = {}, {}
  for short in sorted({min(steps, 2), min(steps, 3)}):
    short_batches = jax.tree.map(lambda x: resized(x, short + heldout), device_batches)
    ids_, weights_ = resized(inputs[3]), resized(inputs[4])
    compiled = compile_round(cost_round, (*inputs[:2], short_batches, ids_, weights_))
    costs[short], by_op[short] = cost_of(compiled), cycles_by_op(compiled.as_text())
  (s0, (f0, t0, loops)), (s1, (f1, t1, _)) = sorted(costs.items())[0], sorted(costs.items())[-1]
  chunks = cohort // chunk_clients

  def extrapolate(at_s0: float | None, at_s1: float | None) -> float | None:
    if at_s0 is None or at_s1 is None:
      return None
    return chunks * (at_s0 + (steps - s0) * ((at_s1 - at_s0) / (s1 - s0) if s1 > s0 else 0.0))

  seconds = extrapolate(t0, t1) if target_.platform == "tpu" else None
  return dataclasses.replace(
    report,
    flops=extrapolate(f0, f1),
    estimated_seconds=seconds,
    loops=loops,
    time_shares=time_shares(by_op[s1][0]),  # The longer program's shares.
    unpriced={kind: round(extrapolate(by_op[s0][1].get(kind, 0), count) or 0) for kind, count in by_op[s1][1].items()},
  )


def largest_fitting_chunk(
  clients_per_device: int, fits: Callable[[int], bool | None], ladder: tuple[int, ...] = (16, 4, 1)
) -> tuple[int | None, list[tuple[int, bool | None]]]:
  """The largest chunk of clients per device (a divisor of `clients_per_device`) for which
  `fits(chunk)` is not False, found with few calls (each is a compile): all of the device's
  clients first, then the divisors nearest `ladder`, largest first; then, between the first
  that fits and the one tried before it, by bisection over the divisors in between. A round's
  memory grows with its chunk, so the bisection finds the largest that fits where the ladder
  alone would stop at e.g. 16 when 32 fits (two calls more for 256 clients a device: 64, then 32).

  Args:
    clients_per_device: the cohort on one device of the clients axis.
    fits: chunk per device -> True (fits), False (does not) or None (unknown: taken as fitting,
      as on the CPU).
    ladder: chunk sizes to try after all at once, each rounded down to a divisor.
  Returns:
    (the largest fitting chunk per device, or None where even 1 does not fit; every (chunk,
    fits) tried, in order).
  """
  divisors = [d for d in range(1, clients_per_device + 1) if clients_per_device % d == 0]
  steps = autotune.chunk_candidates(clients_per_device, ladder)[::-1]  # All at once first.
  tried: list[tuple[int, bool | None]] = []

  def fit(chunk: int) -> bool:
    verdict = fits(chunk)
    tried.append((chunk, verdict))
    return verdict is not False

  refused = None
  for chunk in steps:
    if fit(chunk):
      between: list[int] = [d for d in divisors if chunk < d < refused] if refused else []
      while between:  # Invariant: `chunk` fits, `refused` does not; `between` lies strictly in between.
        middle = between[len(between) // 2]
        if fit(middle):
          chunk, between = middle, [d for d in between if d > middle]
        else:
          between = [d for d in between if d < middle]
      return chunk, tried
    refused = chunk
  return None, tried
