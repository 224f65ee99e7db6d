"""Times one round of federated instruction tuning of a Llama-family decoder, several ways, side by side.

  vmapped (chunk k): the library's client update (LoRA on attention query/value, Adam, the loss
           on the response tokens) mapped over clients with `primitives.map_clients`, k clients
           per chunk (0: all at once; auto: what fed.clients_per_chunk=-1 measures and picks),
           as the round runs it: one jit-compiled function for the cohort;
  loop:    a Python loop over clients of the same jit-compiled single-client update;
  peft:    when the `bench` extra is installed, transformers' own LlamaForCausalLM (or Qwen2 /
           Mistral) under `peft` LoRA, the per-client loop OpenFedLLM, FlowerTune and the
           other PEFT-based federated LLM repositories run (adapter reset, fresh Adam, S steps
           per client), and `--peft_vmap` torch.func.vmap over clients
           (`peft_baselines.text_round`).

All run the same architecture (`--model`: `benchmarks.workloads.DECODERS`, the embedded default's
size or SmolLM-135M's or TinyLlama-1.1B's config on random weights), LoRA, optimizer and
token shapes (random full-length sequences of `--seq_len` tokens, the loss on their second
half), in one process, each after a warm-up, best of `--repeats` rounds in which every way
runs once in turn (`benchmarks.timing.interleaved_times`: a drift of the machine's speed meets
every way alike), every framework on the same number of threads (`--threads`); the PEFT rows' speed-up is given both as the ratio of best times and as the
median over rounds of the ratio of the two times taken moments apart (`paired_speedup`).
Reported per cohort size:
tokens per second (C x S x B x T tokens of the round over its wall time), the FLOPs of one
client step from XLA's cost analysis and each way's model FLOP utilization against the
device's measured matmul peak in the backbone's dtype (bfloat16 on accelerators), and the
device memory XLA plans for each jitted way (arguments + outputs + temporaries): with the
frozen decoder one argument, it grows with the clients per chunk, not with a backbone per
client. Prints ratios and writes JSON.

  python -m benchmarks.text_round_speed --model tiny --clients 8,16 --out benchmarks/text_round_speed_tiny_cpu.json
"""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import peft_baselines, torch_baselines
from benchmarks.workloads import DECODERS, random_text_block, text_client_update_fn
from benchmarks.timing import (
  confine_threads,
  define_threads_flag,
  interleaved_times,
  matmul_peak_flops,
  paired_ratio,
  planned_memory_bytes,
  update_flops,
)
from hyperlora_jax import autotune, primitives
from hyperlora_jax.models import hf

_MODEL = flags.DEFINE_enum("model", "tiny", list(DECODERS), "The decoder's architecture (random weights).")
_CLIENTS = flags.DEFINE_string("clients", "8,16", "Comma-separated cohort sizes C.")
_STEPS = flags.DEFINE_integer("local_steps", 5, "Local steps per client (configs/instruction_tuning.py's).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per local step (configs/instruction_tuning.py's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 176, "Tokens per sequence (configs/instruction_tuning.py's max_len).")
_CHUNKS = flags.DEFINE_string(
  "chunks",
  "0,4",
  "Comma-separated clients_per_chunk values (0 = all at once; "
  "auto = what fed.clients_per_chunk=-1 measures and picks).",
)
_REMAT = flags.DEFINE_bool("remat", False, "Recompute each decoder block in the backward pass (model.remat).")
_RECOMPUTE_ATTENTION = flags.DEFINE_bool(
  "recompute_attention", False, "Recompute the attention weights in the backward pass (model.recompute_attention)."
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 2, "Timed rounds, in each of which every way runs once in turn (the best is reported)."
)
_THREADS = define_threads_flag()
_LOOP = flags.DEFINE_bool("loop", True, "Time the project's jitted per-client loop.")
_PEFT = flags.DEFINE_bool("peft", True, "Time transformers + peft's per-client loop when installed (`bench` extra).")
_PEFT_VMAP = flags.DEFINE_bool(
  "peft_vmap", False, "Also time transformers + peft under torch.func.vmap (16 clients per chunk)."
)
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.")


def parameter_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _way(seconds: float, tokens: int, flops: float, peak: float, memory: int = 0) -> dict:
  return {
    "seconds": seconds,
    "tokens_per_s": tokens / seconds,
    "mfu": flops / seconds / peak,
    **({"planned_memory_gb": memory / 1e9} if memory else {}),
  }


def main(argv):
  del argv
  threads = confine_threads(_THREADS.value)  # Before JAX's backend starts.
  one_client, frozen, trainable, model, config = text_client_update_fn(
    _MODEL.value, _REMAT.value, _RECOMPUTE_ATTENTION.value
  )
  steps, batch, seq_len = _STEPS.value, _BATCH.value, _SEQ_LEN.value
  single = jax.jit(one_client)
  chunks = [autotune.AUTO if c.strip() == "auto" else int(c) for c in _CHUNKS.value.split(",")]
  vmap_chunk = lambda chunk: jax.jit(
    lambda frozen, starts, block: primitives.map_clients(
      lambda xs: one_client(frozen, *xs), (starts, block), chunk, None
    )
  )
  vmapped = {chunk: vmap_chunk(chunk) for chunk in chunks if chunk != autotune.AUTO}
  _, peft_reason = peft_baselines.available()
  peft_reason = "--nopeft" if not _PEFT.value else peft_reason
  if peft_reason and _PEFT.value:
    print(f"transformers + peft rows skipped: {peft_reason}", flush=True)
  compute_dtype = model.dtype
  config_json = hf.decoder_config(model)  # The same architecture for transformers.
  peak = matmul_peak_flops(dtype=compute_dtype)
  backbone_params = parameter_count(frozen["variables"])
  print(
    f"{_MODEL.value}: {backbone_params / 1e6:.1f}M frozen parameters ({jnp.dtype(compute_dtype).name}), "
    f"{parameter_count(trainable) / 1e6:.3f}M LoRA; {jnp.dtype(compute_dtype).name} matmul peak "
    f"{peak / 1e9:.1f} GFLOP/s",
    flush=True,
  )
  results = []
  for num in (int(c) for c in _CLIENTS.value.split(",")):
    block = random_text_block(num, steps, batch, seq_len, model.vocab_size)
    starts = primitives.broadcast(trainable, num)
    tokens = num * steps * batch * seq_len
    one_step = jax.tree.map(lambda x: x[0, :1], block)
    flops = num * steps * update_flops(single, frozen, trainable, one_step)  # A scan body counts once.
    row = {"clients": num, "tokens": tokens, "round_flops": flops, "vmapped": []}
    ways, memory = {}, {}  # Every way of this cohort, timed interleaved.
    if _LOOP.value:
      client_blocks = [jax.tree.map(lambda x, i=i: x[i], block) for i in range(num)]
      ways["loop"] = lambda: jax.block_until_ready([single(frozen, trainable, b) for b in client_blocks])
      memory["loop"] = planned_memory_bytes(single, frozen, trainable, client_blocks[0])
    labels = {}
    for chunk in chunks:
      label = chunk or "all"
      if chunk == autotune.AUTO:
        choice = autotune.measure_clients_per_chunk(lambda xs: one_client(frozen, *xs), (starts, block))
        chunk, label = choice.clients_per_chunk, f"auto={choice.clients_per_chunk}"
        vmapped.setdefault(chunk, vmap_chunk(chunk))
      if chunk > 0 and num % chunk:
        continue
      labels[f"chunk {label}"] = chunk
      ways[f"chunk {label}"] = lambda chunk=chunk: jax.block_until_ready(vmapped[chunk](frozen, starts, block))
    peft_ways = ("loop", "vmap") if _PEFT_VMAP.value else ("loop",)
    peak_bytes = {}  # The PEFT ways' peak CUDA memory, read after they are timed.
    if not peft_reason:
      ids, loss_mask = np.asarray(block["input_ids"]), np.asarray(block["loss_mask"])
      for way in peft_ways:
        ways[f"peft {way}"], peak_bytes[way] = peft_baselines.text_round(
          ids,
          loss_mask,
          config_json=config_json,
          rank=config.lora.rank,
          alpha=config.lora.alpha,
          learning_rate=config.client_optimizer.learning_rate,
          way=way,
          chunk=16,
        )
    times = interleaved_times(ways, _REPEATS.value)
    seconds = {name: None if t is None else min(t) for name, t in times.items()}
    line = f"C={num:4d}:"
    if _LOOP.value:
      row["loop"] = _way(seconds["loop"], tokens, flops, peak, memory["loop"])
      line += (
        f" loop {row['loop']['tokens_per_s']:9.0f} tokens/s (MFU {row['loop']['mfu']:.0%}, "
        f"{row['loop'].get('planned_memory_gb', 0):.2f} GB)"
      )
    for name, chunk in labels.items():
      label = name.split(" ", 1)[1]
      if seconds[name] is None:
        row["vmapped"].append({"clients_per_chunk": chunk, "label": label, "out_of_memory": True})
        line += f"; chunk {label}: out of memory"
        continue
      way = _way(seconds[name], tokens, flops, peak, planned_memory_bytes(vmapped[chunk], frozen, starts, block))
      row["vmapped"].append({"clients_per_chunk": chunk, "label": label, **way})
      line += (
        f"; chunk {label}: {way['tokens_per_s']:9.0f} (MFU {way['mfu']:.0%}, {way.get('planned_memory_gb', 0):.2f} GB)"
      )
    jax_ways = [name for name in ways if not name.startswith("peft") and seconds[name] is not None]
    best_name = min(jax_ways, key=seconds.get)
    best_jax = seconds[best_name]
    if "loop" in row:
      row["best_jax_over_loop"] = row["loop"]["seconds"] / best_jax
      line += f" (best {row['best_jax_over_loop']:.2f}x the jitted loop)"
    if peft_reason:
      row["peft"] = {"skipped": peft_reason}
    else:
      row["peft"] = {"device": torch_baselines.device_name()}
      for way in peft_ways:
        way_seconds = seconds[f"peft {way}"]
        paired = paired_ratio(times[f"peft {way}"], times[best_name])
        row["peft"][way] = {
          "seconds": way_seconds,
          "tokens_per_s": tokens / way_seconds,
          "best_jax_speedup": way_seconds / best_jax,
          "paired_speedup": paired,
          **({"peak_memory_gb": peak_bytes[way]() / 1e9} if peak_bytes[way]() else {}),
        }
        line += (
          f"; peft {way} {tokens / way_seconds:9.0f} (best JAX {way_seconds / best_jax:.2f}x; "
          f"median paired {paired:.2f}x)"
        )
    results.append(row)
    print(line, flush=True)
  report = {
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "threads": threads,
    "jax": jax.__version__,
    "machine": platform.machine(),
    "model": _MODEL.value,
    "architecture": config_json,
    "frozen_parameters": backbone_params,
    "lora_parameters": parameter_count(trainable),
    "lora_rank": config.lora.rank,
    "lora_targets": config.lora.target_regex,
    "remat": _REMAT.value,
    "recompute_attention": _RECOMPUTE_ATTENTION.value,
    "local_steps": steps,
    "batch_size": batch,
    "seq_len": seq_len,
    "chunks": [str(c) for c in chunks],
    "backbone_dtype": jnp.dtype(compute_dtype).name,
    "matmul_peak_flops": peak,
    "results": results,
  }
  stats = jax.devices()[0].memory_stats() or {}  # None on the CPU.
  if "peak_bytes_in_use" in stats:  # The process's high-water mark over every way timed above.
    report["device_peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
  if not peft_reason:
    import peft
    import torch
    import transformers

    report["torch"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, absl_app=True)
