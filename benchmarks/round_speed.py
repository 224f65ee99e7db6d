"""Times one round of local LoRA training for C clients, several ways, side by side.

  vmapped (chunk k): the library's client update mapped over clients with
           `primitives.map_clients` (vmap over clients of a lax.scan over local steps, k
           clients per chunk; k = 0: all at once), as the round runs it;
  loop:    a Python loop over clients of a jit-compiled single-client update, as fedjax
           and most federated-LoRA repositories run clients.

Beside them, when the `bench` extra is installed, PyTorch on the same device: `torch_baselines`
(a hand-written ViT; loop and torch.func.vmap) and `peft_baselines` (transformers' own ViT or
CLIP with `peft` LoRA: the per-client loop PEFT-based repositories run, and torch.func.vmap).

All run the same model (the default config's ViT, or `--width/--depth/--image_size`), LoRA,
optimizer and data shapes, on random weights and random uint8 images (speed does not depend on
their values), in one process on the same number of threads (`--threads`: XLA:CPU's pool and
torch's), each after a warm-up, interleaved: in each of `--repeats` rounds every way runs once,
in turn (`timing.interleaved_times`), so a drift of the machine's speed meets every way alike;
the best time of each is reported, and the PyTorch rows' speed-up also as the median of the
per-round ratios (`paired_speedup`). Also reported: the
FLOPs of one client update from XLA's cost analysis, the achieved FLOP/s of each way, and the
device's measured float32 matmul peak (best of several `jnp.dot`s), so that achieved / peak is
the model FLOP utilization. Prints client-steps per second and ratios, and writes JSON.

  python -m benchmarks.round_speed --clients 16,64,256 --chunks 0,16 --out benchmarks/round_speed.json
"""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import peft_baselines, torch_baselines
from benchmarks.workloads import client_update_fn, random_block
from benchmarks.timing import (
  confine_threads,
  define_threads_flag,
  interleaved_times,
  matmul_peak_flops,
  paired_ratio,
  update_flops,
)
from hyperlora_jax import autotune, primitives
from hyperlora_jax.tasks.image_classification import backbone_dtype

_CLIENTS = flags.DEFINE_string("clients", "16,64,256", "Comma-separated cohort sizes C.")
_STEPS = flags.DEFINE_integer("local_steps", 10, "Local steps per client.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Local batch size.")
_CHUNKS = flags.DEFINE_string(
  "chunks",
  "0,16,auto",
  "Comma-separated clients_per_chunk values (0 = all at "
  "once; auto = what fed.clients_per_chunk=-1 measures and picks).",
)
_WIDTH = flags.DEFINE_integer("width", 0, "ViT width (0: the default config's).")
_DEPTH = flags.DEFINE_integer("depth", 0, "ViT depth (0: the default config's).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Image size (0: the default config's).")
_BASE_MODEL = flags.DEFINE_bool(
  "base_model",
  False,
  "ViT-B/16 at 224 px, LoRA r=16 (configs/domainnet.py's backbone) instead of the default model; for accelerators.",
)
_BASE_CLIP = flags.DEFINE_bool(
  "base_clip",
  False,
  "OpenAI CLIP ViT-B/32 at 224 px (both towers, LoRA r=16 on "
  "their query/value) instead of the default model; no PyTorch rows.",
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Timed rounds, in each of which every way runs once in turn (the best is reported)."
)
_THREADS = define_threads_flag()
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.")
_TORCH = flags.DEFINE_bool(
  "torch",
  True,
  "Also time the PyTorch per-client loop and torch.func.vmap "
  "round (16 clients per chunk) when torch is installed (the `bench` extra).",
)
_PEFT = flags.DEFINE_bool(
  "peft",
  True,
  "Also time transformers + peft (loop and torch.func.vmap, 16 clients "
  "per chunk) when they are installed (the `bench` extra).",
)


def _baseline_row(times: dict, label: str, steps: int, best_jax: float, best_jax_times: list) -> tuple[dict, str]:
  """({way: seconds, client-steps/s, best JAX speedup (best times), paired speedup} plus the
  device, the printed text) of a PyTorch baseline's "loop" and "vmap" ways, timed interleaved
  with the JAX ways (`times[f"{label} {way}"]`: seconds per round)."""
  row, text = {}, ""
  for way in ("loop", "vmap"):
    seconds = min(times[f"{label} {way}"])
    row[way] = {
      "seconds": seconds,
      "client_steps_per_s": steps / seconds,
      "best_jax_speedup": seconds / best_jax,
      "paired_speedup": paired_ratio(times[f"{label} {way}"], best_jax_times),
    }
    text += f"; {label} {way}: {steps / seconds:8.1f}"
  text += (
    f" (best JAX {row['loop']['best_jax_speedup']:.2f}x the {label} loop, paired "
    f"{row['loop']['paired_speedup']:.2f}x; {row['vmap']['best_jax_speedup']:.2f}x {label} vmap)"
  )
  return {**row, "device": torch_baselines.device_name()}, text


def _prompt_ids(model_config) -> np.ndarray:
  """Random class prompts for the PyTorch CLIP: int [10, max_len], end of text (the largest id)
  last (speed does not depend on the ids)."""
  ids = np.random.default_rng(0).integers(1, model_config.vocab_size - 2, (10, model_config.max_len))
  ids[:, -1] = model_config.vocab_size - 1
  return ids


def main(argv):
  del argv
  threads = confine_threads(_THREADS.value)  # Before JAX's backend starts.
  one_client, trainable, config = client_update_fn(
    _WIDTH.value, _DEPTH.value, _IMAGE_SIZE.value, _BASE_MODEL.value, _BASE_CLIP.value
  )
  size = config.data.image_size
  single = jax.jit(one_client)
  chunks = [autotune.AUTO if c.strip() == "auto" else int(c) for c in _CHUNKS.value.split(",")]
  vmap_chunks = lambda chunk: jax.jit(
    lambda starts, block: primitives.map_clients(lambda xs: one_client(*xs), (starts, block), chunk, None)
  )
  vmapped = {chunk: vmap_chunks(chunk) for chunk in chunks if chunk != autotune.AUTO}
  torch_ok, torch_reason = torch_baselines.available()
  if not torch_ok and _TORCH.value:
    print(f"PyTorch rows skipped: {torch_reason}", flush=True)
  torch_reason = torch_reason if _TORCH.value else "--notorch"
  if _BASE_CLIP.value and not torch_reason:  # torch_baselines mirrors the ViT classifier only.
    torch_reason = "--base_clip (the hand-written PyTorch baseline is a ViT classifier; see the peft rows)"
  peft_ok, peft_reason = peft_baselines.available()
  if not peft_ok and _PEFT.value:
    print(f"transformers + peft rows skipped: {peft_reason}", flush=True)
  peft_reason = peft_reason if _PEFT.value else "--nopeft"
  compute_dtype = backbone_dtype(config.compute.backbone_dtype)  # The backbone's matmuls run in it.
  peak = matmul_peak_flops(dtype=compute_dtype)
  print(f"{jnp.dtype(compute_dtype).name} matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
  results = []
  for num in (int(c) for c in _CLIENTS.value.split(",")):
    block = random_block(num, _STEPS.value, _BATCH.value, size)
    starts = primitives.broadcast(trainable, num)
    client_blocks = [jax.tree.map(lambda x, i=i: x[i], block) for i in range(num)]
    # XLA's cost analysis counts a loop body once: cost one step, times the steps.
    flops = num * _STEPS.value * update_flops(single, trainable, jax.tree.map(lambda x: x[:1], client_blocks[0]))
    steps = num * _STEPS.value
    ways = {"loop": lambda: jax.block_until_ready([single(trainable, b) for b in client_blocks])}  # Timed interleaved.
    labels, row = {}, {"clients": num, "client_steps": steps, "round_flops": flops, "vmapped": []}
    for chunk in chunks:
      label = chunk or "all"
      if chunk == autotune.AUTO:  # What fed.clients_per_chunk=-1 picks for this C, then timed again.
        choice = autotune.measure_clients_per_chunk(lambda xs: one_client(*xs), (starts, block))
        chunk, label = choice.clients_per_chunk, f"auto={choice.clients_per_chunk}"
        row["auto_out_of_memory"] = list(choice.out_of_memory)
        vmapped.setdefault(chunk, vmap_chunks(chunk))
      if chunk > 0 and num % chunk:
        continue
      labels[f"chunk {label}"] = chunk
      ways[f"chunk {label}"] = lambda chunk=chunk: jax.block_until_ready(vmapped[chunk](starts, block))
    images, labels_np = np.asarray(block["image"]), np.asarray(block["label"])
    if not torch_reason:
      arch = {
        "width": config.model.width,
        "depth": config.model.depth,
        "heads": config.model.num_heads,
        "patch": config.model.patch_size,
        "mlp_ratio": config.model.mlp_ratio,
        "rank": config.lora.rank,
        "scale": config.lora.alpha / config.lora.rank,
        "learning_rate": config.client_optimizer.learning_rate,
      }
      for way in ("loop", "vmap"):
        ways[f"torch {way}"] = torch_baselines.round_fn(images, labels_np, way=way, chunk=16, **arch)
    if not peft_reason:
      model_fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
      prompts = _prompt_ids(config.model) if _BASE_CLIP.value else None
      for way in ("loop", "vmap"):
        ways[f"peft {way}"] = peft_baselines.round_fn(
          images,
          labels_np,
          model_name=config.model.name,
          arch=model_fields,
          rank=config.lora.rank,
          alpha=config.lora.alpha,
          learning_rate=config.client_optimizer.learning_rate,
          way=way,
          chunk=16,
          prompt_ids=prompts,
        )
    times = interleaved_times(ways, _REPEATS.value)
    seconds = {name: None if t is None else min(t) for name, t in times.items()}
    t_loop = seconds["loop"]
    row.update(loop_s=t_loop, loop_client_steps_per_s=steps / t_loop, loop_mfu=flops / t_loop / peak)
    line = f"C={num:5d}: loop {steps / t_loop:8.1f} client-steps/s (MFU {row['loop_mfu']:.0%})"
    for name, chunk in labels.items():
      label = name.split(" ", 1)[1]
      t_vmap = seconds[name]
      if t_vmap is None:
        row["vmapped"].append({"clients_per_chunk": chunk, "label": label, "out_of_memory": True})
        line += f"; chunk {label}: out of memory"
        continue
      row["vmapped"].append(
        {
          "clients_per_chunk": chunk,
          "label": label,
          "seconds": t_vmap,
          "client_steps_per_s": steps / t_vmap,
          "mfu": flops / t_vmap / peak,
          "speedup_over_loop": t_loop / t_vmap,
          "paired_speedup_over_loop": paired_ratio(times["loop"], times[name]),
        }
      )
      line += f"; chunk {label}: {steps / t_vmap:8.1f} (MFU {flops / t_vmap / peak:.0%}, ratio {t_loop / t_vmap:.2f}x)"
    jax_ways = ["loop", *(name for name in labels if seconds[name] is not None)]
    best_name = min(jax_ways, key=seconds.get)
    for label, reason in (("torch", torch_reason), ("peft", peft_reason)):
      if reason:
        row[label] = {"skipped": reason}
      else:
        row[label], text = _baseline_row(times, label, steps, seconds[best_name], times[best_name])
        line += text
    results.append(row)
    print(line, flush=True)
  report = {
    "device": str(jax.devices()[0].device_kind),
    "num_devices": jax.device_count(),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "machine": platform.machine(),
    "model": config.model.to_dict(),
    "lora_rank": config.lora.rank,
    "local_steps": _STEPS.value,
    "image_size": size,
    "batch_size": _BATCH.value,
    "chunks": chunks,
    "backbone_dtype": config.compute.backbone_dtype + " -> " + jnp.dtype(compute_dtype).name,
    "matmul_peak_flops": peak,
    "threads": threads,
    "timing": f"interleaved, best of {_REPEATS.value} rounds",
    "results": results,
  }
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, absl_app=True)
