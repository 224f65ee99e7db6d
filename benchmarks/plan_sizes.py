"""Compiler estimates of a FedIT round at real sizes on TPU / GPU targets (`hyperlora_jax.plan`),
nothing materialized: every weight and input is a `jax.ShapeDtypeStruct`.

  .venv-plan/bin/python -m benchmarks.plan_sizes --targets v5e:2x4,v6e:2x4 --out benchmarks/plan_sizes.json

(`make test-plan` makes .venv-plan: libtpu beside .venv.) Workloads: ViT-B/16 at 224 px, LoRA r = 16 on
q/v, 10 Adam steps of 32 images (`configs/domainnet.py`'s backbone and round); TinyLlama-1.1B's
and Llama-2-7B's architectures, LoRA r = 4 on q/v, 5 Adam steps of 4 sequences of 512 tokens;
`--quantization int8|nf4` holds the frozen kernels in 8 or 4 bits (`hyperlora_jax.quantize`,
computed in bfloat16); `--feed host` holds the round's inputs in host memory (TPU targets). For each cohort C, the
largest per-device chunk that fits is planned in full, beside the per-client loop in the same
cost model: C / D rounds of one client per device (D the clients axis). Figures are compiler
estimates (labelled so), not measurements.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks.workloads import DECODERS
from configs import benchmarks as bench_configs
from hyperlora_jax import aggregators, lora, models, plan
from hyperlora_jax.client import local_update
from hyperlora_jax.federated import FederatedRound
from hyperlora_jax.tasks.common import frozen_tree

BF16 = jnp.bfloat16


def _abstract_init(model, *example):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *example))


def vit_b16(quantization: str = "none", steps: int = 10, batch: int = 32, depth: int | None = None):
  """(fed_round factory, trainable, frozen, block(C)) of ViT-B/16 at 224 px, r = 16 on q/v
  (`depth` blocks instead of 12 where given)."""
  from hyperlora_jax.tasks.image_classification import ImageClassification

  arch = {k: v for k, v in bench_configs.BASE_MODELS["vit"].items() if k != "name"}
  arch["depth"] = depth or arch["depth"]
  model = models.build_model("vit", 345, **arch)  # DomainNet's 345 classes.
  example = jnp.zeros((1, 224, 224, 3), jnp.float32)
  variables = _abstract_init(model, example)
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  targets = lora.find_targets(model, variables, example, target_regex=lora.DEFAULT_TARGET_REGEX)
  trainable = jax.eval_shape(
    lambda: {"lora": lora.init_lora(jax.random.key(1), targets, 16), "head": jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), variables["params"]["head"])}
  )  # fmt: skip
  task = ImageClassification(model, lora.lora_scale(32.0, 16), models.preprocess_images, "head", BF16)
  update = local_update(task.loss_fn, optax.adam(1e-3), steps=steps)
  frozen = jax.eval_shape(lambda b: frozen_tree(b, dtype=BF16, quantization=quantization), backbone)

  def block(clients):
    shape = (clients, steps, batch)
    return {
      "image": jax.ShapeDtypeStruct(shape + (224, 224, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct(shape, jnp.int32),
      "mask": jax.ShapeDtypeStruct(shape, jnp.float32),
    }

  return update, trainable, frozen, block


def decoder(
  arch: str,
  quantization: str = "none",
  steps: int = 5,
  batch: int = 4,
  seq_len: int = 512,
  depth: int | None = None,
  recompute_attention: bool = False,
):
  """(client update, trainable, frozen, block(C)) of a `DECODERS[arch]` architecture, r = 4 on q/v
  (`depth` blocks instead of its own where given; `recompute_attention`: `DecoderLM`'s)."""
  from hyperlora_jax.models.llama import DecoderLM
  from hyperlora_jax.tasks.causal_lm import CausalLM

  arch_fields = dict(DECODERS[arch], depth=depth or DECODERS[arch]["depth"], recompute_attention=recompute_attention)
  model = DecoderLM(**arch_fields, dtype=BF16)
  example = jnp.zeros((1, 8), jnp.int32)
  variables = _abstract_init(model, example)
  targets = lora.find_targets(model, variables, example, jnp.ones_like(example), target_regex=r".*attn/(query|value)")
  trainable = jax.eval_shape(lambda: {"lora": lora.init_lora(jax.random.key(1), targets, 4), "head": {}})
  task = CausalLM(model, lora.lora_scale(8.0, 4), BF16)
  update = local_update(task.loss_fn, optax.adam(1e-4), steps=steps)
  frozen = jax.eval_shape(lambda v: frozen_tree(v, dtype=BF16, quantization=quantization), variables)

  def block(clients):
    shape = (clients, steps, batch)
    tokens = jax.ShapeDtypeStruct(shape + (seq_len,), jnp.int32)
    return {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens,
            "mask": jax.ShapeDtypeStruct(shape, jnp.float32)}  # fmt: skip

  return update, trainable, frozen, block


WORKLOADS = {
  "vit_b16": (vit_b16, (16, 64, 256)),
  "tinyllama_1b": (functools.partial(decoder, "tinyllama_1b"), (8, 16, 64)),
  "llama2_7b": (functools.partial(decoder, "llama2_7b"), (8, 16, 64)),
}


def plan_one(
  workload: str,
  clients: int,
  target: plan.Target,
  cost: bool = True,
  quantization: str = "none",
  model_parallel: int = 1,
  feed: str = "round",
  chunks: tuple[int, ...] = (),
  depth: int | None = None,
  recompute_attention: bool = False,
) -> dict:
  """The largest fitting chunk's plan of a C-client round, and the per-client loop's estimate,
  the frozen kernels held as `quantization` says ("none": bfloat16), the backbone split over a
  `model` axis of `model_parallel` devices, the round's inputs on the devices (feed "round") or
  in their host memory ("host": `primitives.HostFeed`), the chunks per device tried largest first
  (`chunks`; default: the largest that fits, `plan.largest_fitting_chunk`: all of the device's
  clients, 16, 4, 1, then bisection between the first that fits and the misfit before it); `depth`:
  the model's blocks, where given (a shallower model, to see how a figure grows with depth);
  `recompute_attention`: a decoder's backward recomputes its attention weights (`DecoderLM`)."""
  options = {"recompute_attention": True} if recompute_attention else {}  # Decoders only.
  update, trainable, frozen, block = WORKLOADS[workload][0](quantization=quantization, depth=depth, **options)
  axis = len(target.devices) // model_parallel
  fed = FederatedRound(update, aggregators.fedit(), num_clients=max(clients, axis))
  ids = jax.ShapeDtypeStruct((clients,), jnp.int32)
  weights = jax.ShapeDtypeStruct((clients,), jnp.float32)
  per_device = clients // axis
  row = {
    "workload": workload,
    "clients": clients,
    "target": target.name,
    "quantization": quantization,
    "model_parallel": model_parallel,
    "feed": feed,
    "depth": depth,
    "recompute_attention": recompute_attention,
  }
  start = time.time()
  reports = {}

  def fits(chunk: int) -> bool | None:
    chunk_all = 0 if chunk == per_device else chunk * axis
    reports[chunk] = plan.plan_round(
      fed, trainable, frozen, block(clients), ids, weights, target,
      clients_per_chunk=chunk_all, cost=False, model_parallel=model_parallel, host_feed=feed == "host",
    )  # fmt: skip
    row.setdefault("tried", []).append({"chunk_per_device": chunk, "gib": reports[chunk].memory["total"] / plan.GIB})
    return reports[chunk].fits

  if chunks:  # The given ones, largest first; the first that fits is taken.
    given = sorted({c for c in chunks if 1 <= c <= per_device and per_device % c == 0}, reverse=True)
    best = next((c for c in given if fits(c) is not False), None)
  else:  # All at once, 16, 4, 1, then bisection between the first fit and the misfit before it.
    best, _ = plan.largest_fitting_chunk(per_device, fits)
  if best is not None:
    report = reports[best]
    if cost:
      chunk_all = 0 if best == per_device else best * axis
      report = plan.plan_round(
        fed, trainable, frozen, block(clients), ids, weights, target,
        clients_per_chunk=chunk_all, cost=True, model_parallel=model_parallel, host_feed=feed == "host",
      )  # fmt: skip
    row.update(chunk_per_device=best, memory=report.memory, flops=report.flops,
               seconds=report.estimated_seconds, mfu=report.mfu, loops=report.loops,
               collectives=report.collectives, time_shares=report.time_shares,
               unpriced=report.unpriced)  # fmt: skip
  if cost and row.get("seconds"):
    one = plan.plan_round(
      fed, trainable, frozen, block(axis), jax.ShapeDtypeStruct((axis,), jnp.int32),
      jax.ShapeDtypeStruct((axis,), jnp.float32), target, model_parallel=model_parallel,
    )  # fmt: skip
    row["loop_seconds"] = one.estimated_seconds * per_device
    row["loop_flops"] = one.flops * per_device
  row["compile_seconds"] = time.time() - start
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="v5e:2x4,v6e:2x4")
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--clients", default="", help="Cohorts to plan (default: each workload's).")
  parser.add_argument("--out", default="benchmarks/plan_sizes.json")
  parser.add_argument("--no-cost", action="store_true", help="Memory only (no loop-free compile).")
  parser.add_argument("--quantization", default="none", help="The frozen kernels: none (bf16), int8 or nf4.")
  parser.add_argument("--model_parallel", type=int, default=1, help="Devices of the model mesh axis.")
  parser.add_argument(
    "--chunks",
    default="",
    help="Chunks per device to try, largest first (default: the largest that fits, by bisection).",
  )
  parser.add_argument(
    "--feed", default="round", help="The round's inputs on the devices (round) or host memory (host)."
  )
  parser.add_argument("--depth", type=int, default=None, help="The model's blocks (default: the workload's own).")
  parser.add_argument(
    "--recompute_attention",
    action="store_true",
    help="Decoders: the backward recomputes the attention weights (DecoderLM.recompute_attention).",
  )
  args = parser.parse_args()
  if args.recompute_attention and "vit_b16" in args.workloads.split(","):
    parser.error("--recompute_attention is a decoder's option (DecoderLM); vit_b16 has none")
  rows = []
  for name in args.targets.split(","):
    target = plan.target(name)
    for workload in args.workloads.split(","):
      cohorts = [int(c) for c in args.clients.split(",")] if args.clients else WORKLOADS[workload][1]
      for clients in cohorts:
        chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else ()
        row = plan_one(
          workload,
          clients,
          target,
          not args.no_cost,
          args.quantization,
          args.model_parallel,
          args.feed,
          chunks,
          args.depth,
          args.recompute_attention,
        )
        rows.append(row)
        fit = (
          f"chunk {row['chunk_per_device']}/device, {row['memory']['total'] / plan.GIB:.2f} GiB"
          if "memory" in row
          else "nothing fits"
        )
        est = (f", {row['seconds'] * 1e3:.1f} ms (loop {row['loop_seconds'] * 1e3:.1f} ms), MFU {row['mfu']:.0%}"
               if row.get("seconds") else "")  # fmt: skip
        variant = (f", depth {args.depth}" if args.depth else "") + (
          ", attention recomputed" if args.recompute_attention else ""
        )
        shares = plan.format_shares(row.get("time_shares", ())[:5])
        print(
          f"{name} {workload} ({args.quantization}, model axis {args.model_parallel}, feed {args.feed}{variant}) "
          f"C={clients}: {fit}{est} "
          f"[compiled in {row['compile_seconds']:.0f} s]" + (f"\n  cycles (cost model): {shares}" if shares else ""),
          flush=True,
        )
        with open(args.out, "w") as f:
          json.dump({"jax": jax.__version__, "rows": rows, "note": "compiler estimates, not measurements"}, f,
                    indent=1, default=float)  # fmt: skip


if __name__ == "__main__":
  main()
