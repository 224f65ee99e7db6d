"""Times one round of local LoRA training for C clients, two ways, side by side.

  vmapped: the engine's jit-compiled round body (vmap over clients of a lax.scan over
           local steps, `clients_per_chunk` at a time), as `train.py` runs it;
  loop:    a Python loop over clients of a jit-compiled single-client update, as fedjax
           and most federated-LoRA repositories run clients.

Both run the same model (the default config's ViT), LoRA, optimizer and data shapes, on
random weights and random uint8 images (speed does not depend on their values). Prints
client-steps per second and the vmapped/loop ratio for each C, and writes them as JSON.

  python -m experiments.benchmark --clients 16,64,256 --out benchmarks/round_speed.json
"""
from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import default
from hyperlora_jax import lora, models, primitives
from hyperlora_jax.client import local_update
from hyperlora_jax.optimizers import build_optimizer
from hyperlora_jax.tasks.image_classification import ImageClassification, frozen_tree
from hyperlora_jax.train import initial_trainable

_CLIENTS = flags.DEFINE_string("clients", "16,64,256", "Comma-separated cohort sizes C.")
_STEPS = flags.DEFINE_integer("local_steps", 10, "Local steps per client.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Local batch size.")
_CHUNK = flags.DEFINE_integer("clients_per_chunk", 0, "Vmapped clients per chunk (0 = all).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.")


def _best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  config = default.get_config()
  model = models.model_from_config(config.model, 10)
  size = config.data.image_size
  example = jnp.zeros((1, size, size, 3), jnp.uint8)
  variables = model.init(jax.random.key(0), models.preprocess_images(example))
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  trainable, _ = initial_trainable(model, backbone, example, config.lora.target_regex, config.lora.rank,
                                   jax.random.key(1))
  task = ImageClassification(model, lora.lora_scale(config.lora.alpha, config.lora.rank))
  client_update = local_update(task.loss_fn, build_optimizer(config.client_optimizer))
  frozen = frozen_tree(backbone)
  ones = jax.tree.map(lambda _: jnp.float32(1.0), trainable)

  def one_client(start, block):
    return client_update(start, frozen, block, jax.random.key(0), ones)[0]

  single = jax.jit(one_client)
  vmapped = jax.jit(lambda starts, block: primitives.map_clients(
      lambda xs: one_client(*xs), (starts, block), _CHUNK.value, None))
  results = []
  for num in (int(c) for c in _CLIENTS.value.split(",")):
    rng = np.random.default_rng(num)
    shape = (num, _STEPS.value, _BATCH.value)
    block = {"image": jnp.asarray(rng.integers(0, 256, shape + (size, size, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, shape, dtype=np.int32)),
             "mask": jnp.ones(shape, jnp.float32)}
    starts = primitives.broadcast(trainable, num)
    client_blocks = [jax.tree.map(lambda x, i=i: x[i], block) for i in range(num)]
    t_vmap = _best_time(lambda: vmapped(starts, block), _REPEATS.value)
    t_loop = _best_time(lambda: [single(trainable, b) for b in client_blocks], _REPEATS.value)
    steps = num * _STEPS.value
    row = {"clients": num, "client_steps": steps, "vmapped_s": t_vmap, "loop_s": t_loop,
           "vmapped_client_steps_per_s": steps / t_vmap, "loop_client_steps_per_s": steps / t_loop,
           "speedup_vmapped_over_loop": t_loop / t_vmap}
    results.append(row)
    print(f"C={num:4d}: vmapped {row['vmapped_client_steps_per_s']:8.1f} client-steps/s, "
          f"loop {row['loop_client_steps_per_s']:8.1f} client-steps/s, ratio {row['speedup_vmapped_over_loop']:.2f}x",
          flush=True)
  report = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.machine(),
            "model": config.model.to_dict(), "lora_rank": config.lora.rank, "local_steps": _STEPS.value,
            "batch_size": _BATCH.value, "clients_per_chunk": _CHUNK.value, "results": results}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
