"""Profiles one round of local training with `jax.profiler`, per `clients_per_chunk`, and says
where the time goes.

For each chunk size it runs the benchmark's vmapped round (`benchmarks/workloads.py`: the
default model, C clients x 10 local Adam steps of batch 32, random weights and images) once to
compile, then once inside `jax.profiler.trace(..., create_perfetto_trace=True)`. It reads the
trace's executed XLA operations back (`perfetto_trace.json.gz`: one complete event per
operation run) and sums their time by operation and by kind (matmul, convolution, elementwise
fusion, copy/transpose, reduce, ...). From the optimized HLO it counts the instructions of each
kind and the bytes of the largest temporaries. Prints a table per chunk and writes JSON; the
raw traces stay under `--trace_dir` for TensorBoard / Perfetto.

  python -m benchmarks.profile_round --clients 256 --chunks 0,4 --out benchmarks/profile_round.json
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

import jax
from absl import flags

from benchmarks.workloads import client_update_fn, random_block
from hyperlora_jax import primitives

_CLIENTS = flags.DEFINE_integer("clients", 256, "Clients in the round, C.")
_CHUNKS = flags.DEFINE_string("chunks", "0,4", "Comma-separated clients_per_chunk values (0 = all at once).")
_STEPS = flags.DEFINE_integer("local_steps", 10, "Local steps per client.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Local batch size.")
_WIDTH = flags.DEFINE_integer("width", 0, "ViT width (0: the default config's).")
_DEPTH = flags.DEFINE_integer("depth", 0, "ViT depth (0: the default config's).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Image size (0: the default config's).")
_BASE_MODEL = flags.DEFINE_bool(
  "base_model",
  False,
  "ViT-B/16 at 224 px, LoRA r=16 (configs/domainnet.py's backbone) instead of the default model; for accelerators.",
)
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/hyperlora_profile", "Where the raw traces go.")
_TOP = flags.DEFINE_integer("top", 8, "Operations listed per chunk size.")
_OUT = flags.DEFINE_string("out", "", "JSON file for the summary.")

KINDS = (  # (kind, pattern on an operation's name), first match wins.
  ("matmul", re.compile(r"dot|gemm|matmul")),
  ("convolution", re.compile(r"conv")),
  ("copy/transpose", re.compile(r"copy|transpose")),
  ("reduce", re.compile(r"reduce")),
  ("elementwise fusion", re.compile(r"fusion")),
  ("control flow", re.compile(r"while|call|conditional")),
)


def operation_kind(name: str, fused: dict[str, set[str]] | None = None) -> str:
  """The kind of an XLA operation: from the operations its fused computation holds when
  `fused` ({instruction: opcodes}, `fused_opcodes`) knows it (XLA's CPU backend puts most dots
  in YNNPACK fusions, "ynn_fusion.N"), else from its name ("dot.12" -> "matmul")."""
  opcodes = (fused or {}).get(name)
  if opcodes:
    for kind, opcode in (("matmul", "dot"), ("convolution", "convolution"), ("reduce", "reduce")):
      if opcode in opcodes:
        return kind
    if opcodes <= {"copy", "transpose", "bitcast", "broadcast"}:
      return "copy/transpose"
    return "elementwise fusion"
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other"


def fused_opcodes(hlo_text: str) -> dict[str, set[str]]:
  """{fusion instruction name: the opcodes of the computation it calls} from optimized HLO."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      current = computations.setdefault(header.group(1), set())
    elif line.strip() == "}":
      current = None
    elif current is not None:
      opcode = re.search(r"= \S+ ([a-z][\w\-]*)\(", line)
      if opcode and opcode.group(1) not in ("parameter", "constant"):
        current.add(opcode.group(1))
  calls = re.finditer(r"%([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.\-]+)", hlo_text)
  return {m.group(1): computations.get(m.group(2), set()) for m in calls}


def base_name(name: str) -> str:
  """An operation's name without XLA's numeric suffix: "fusion.123" -> "fusion"."""
  return re.sub(r"(\.\d+)+$", "", name)


def read_operation_events(trace_dir: str) -> list[tuple[str, float]]:
  """(operation name, microseconds) for every XLA operation run in the newest Perfetto trace
  under `trace_dir`: its complete events ("ph": "X") on the threads that execute XLA code,
  where the host's Python and runtime events (TraceMe) are left out."""
  paths = sorted(
    glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime
  )
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [(e["name"], float(e["dur"])) for e in events if e.get("ph") == "X" and "dur" in e and _is_xla_operation(e)]


def _is_xla_operation(event: dict) -> bool:
  args = event.get("args") or {}
  return "hlo_op" in args or "hlo_module" in args or "long_name" in args


def summarize(events: list[tuple[str, float]], top: int, fused: dict[str, set[str]] | None = None) -> dict:
  """Seconds by kind and by operation (top `top`), over the events of one profiled round."""
  by_kind, by_op = collections.Counter(), collections.Counter()
  for name, micros in events:
    by_kind[operation_kind(name, fused)] += micros / 1e6
    by_op[base_name(name)] += micros / 1e6
  return {
    "seconds_by_kind": dict(by_kind.most_common()),
    "top_operations": dict(by_op.most_common(top)),
    "operations_run": len(events),
  }


def hlo_summary(compiled) -> dict:
  """Instruction counts by kind in the optimized HLO, and the compiled temporary bytes."""
  text = compiled.as_text()
  counts = collections.Counter()
  for match in re.finditer(r"=\s*[^=]*?\s(dot|convolution|transpose|copy|fusion|reduce|while)\(", text):
    counts[match.group(1)] += 1
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  return {"instructions": dict(counts), "temp_bytes": temp}


def main(argv):
  del argv
  one_client, trainable, config = client_update_fn(_WIDTH.value, _DEPTH.value, _IMAGE_SIZE.value, _BASE_MODEL.value)
  size, num = config.data.image_size, _CLIENTS.value
  block = random_block(num, _STEPS.value, _BATCH.value, size)
  starts = primitives.broadcast(trainable, num)
  report = {
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "clients": num,
    "local_steps": _STEPS.value,
    "batch_size": _BATCH.value,
    "model": config.model.to_dict(),
    "chunks": {},
  }
  for chunk in (int(c) for c in _CHUNKS.value.split(",")):
    round_fn = jax.jit(lambda s, b, chunk=chunk: primitives.map_clients(lambda xs: one_client(*xs), (s, b), chunk))
    compiled = round_fn.lower(starts, block).compile()
    jax.block_until_ready(compiled(starts, block))  # Warm-up.
    trace_dir = os.path.join(_TRACE_DIR.value, f"chunk{chunk}")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(compiled(starts, block))
    wall = time.perf_counter() - start
    events = read_operation_events(trace_dir)
    summary = {
      "wall_seconds_profiled": wall,
      "operation_seconds": sum(d for _, d in events) / 1e6,
      **summarize(events, _TOP.value, fused_opcodes(compiled.as_text())),
      **hlo_summary(compiled),
    }
    report["chunks"][str(chunk)] = summary
    label = chunk or "all"
    print(
      f"\nchunk {label}: {wall:.2f} s profiled wall, {summary['operation_seconds']:.2f} s in "
      f"{summary['operations_run']} operations, "
      f"temporaries {summary['temp_bytes'] / 2**20 if summary['temp_bytes'] else float('nan'):.0f} MiB",
      flush=True,
    )
    for kind, seconds in summary["seconds_by_kind"].items():
      print(f"  {kind:20s} {seconds:8.3f} s", flush=True)
    print("  top operations: " + ", ".join(f"{k} {v:.3f} s" for k, v in summary["top_operations"].items()), flush=True)
    print(f"  HLO instructions: {summary['instructions']}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, absl_app=True)
