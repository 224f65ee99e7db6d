"""`fed.clients_per_chunk=-1`: the chunk size measured for this machine (`hyperlora_jax.autotune`)."""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from experiments.runner.settings import RunSettings
from hyperlora_jax import autotune, distributed, primitives
from hyperlora_jax.client import ClientUpdate


def random_token_block(clients: int, steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Random full-length token sequences for timing a text round (speed does not depend on the
  values), the loss on the second half of each (the "response"): NumPy {"input_ids": int32
  [C, S, B, T], "attention_mask": ones [C, S, B, T], "loss_mask": [C, S, B, T] (0 on the first
  T // 2 tokens, 1 after), "mask": ones [C, S, B]}."""
  shape = (clients, steps, batch_size)
  tokens = shape + (seq_len,)
  rng = np.random.default_rng(seed)
  return {
    "input_ids": rng.integers(0, vocab_size, tokens, dtype=np.int32),
    "attention_mask": np.ones(tokens, np.int32),
    "loss_mask": np.broadcast_to((np.arange(seq_len) >= seq_len // 2).astype(np.int32), tokens).copy(),
    "mask": np.ones(shape, np.float32),
  }


def sample_block(settings: RunSettings, task: Any, clients: int) -> dict:
  """A round's block for `clients` clients to time chunk sizes on (speed does not depend on
  the values): random uint8 images {"image": [c, S, B, H, W, 3], "label", "mask"}, or for a
  text run `random_token_block`'s sequences of data.max_len tokens."""
  shape = (clients, settings.fed.local_steps, settings.fed.batch_size)
  _, size = settings.input_size
  if settings.text:
    pairs = getattr(task, "sequences_per_example", 1)  # A preference task's chosen and rejected.
    block = random_token_block(shape[0], shape[1], shape[2] * pairs, size, task.model.vocab_size)
    if pairs == 1:
      return block
    tokens = {k: block[k].reshape(shape + (pairs, size)) for k in ("input_ids", "attention_mask", "loss_mask")}
    return {**tokens, "mask": np.ones(shape, np.float32)}
  rng = np.random.default_rng(0)
  return {
    "image": rng.integers(0, 256, shape + (size, size, 3), dtype=np.uint8),
    "label": np.zeros(shape, np.int32),
    "mask": np.ones(shape, np.float32),
  }


def auto_clients_per_chunk(
  settings: RunSettings,
  task: Any,
  backbone: Any,
  trainable: Any,
  client_update: ClientUpdate,
  mesh: Any,
  pooled_data: bool,
  log: Callable[[str], None],
) -> int:
  """`fed.clients_per_chunk=-1`: the fastest chunk for this backend, model and round shape.

  Measured once (`autotune.measure_clients_per_chunk` on one device's share of a round: the
  client update on a random `sample_block`) and cached next to the backbones, keyed by everything the
  timing depends on. With several processes the main process decides and tells the others.
  A pooled-data learner (one client) has nothing to chunk: 0.
  """
  per_device = (
    1 if pooled_data else -(-settings.fed.clients_per_round // primitives.clients_axis_size(mesh))
  )  # Padded cohort / D.
  if per_device == 1:
    return 0
  fields = {
    "backend": jax.default_backend(),
    "device": jax.local_devices()[0].device_kind,
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "model": settings.model,
    "lora": [settings.lora.target_regex, settings.lora.rank],
    settings.input_size[0].removeprefix("data."): settings.input_size[1],
    "clients_per_device": per_device,
    "local_steps": settings.fed.local_steps,
    "batch_size": settings.fed.batch_size,
    "client_optimizer": dataclasses.asdict(settings.client_optimizer),
    "backbone_dtype": str(jnp.dtype(task.compute_dtype)),
  }
  if settings.backbone_quantization != "none":  # Keys of float runs as before.
    fields["backbone_quantization"] = [settings.backbone_quantization, settings.quantization_block]
  path = os.path.join(settings.cache_dir, "clients_per_chunk.json")

  def measure() -> autotune.ChunkChoice:
    log(
      f"fed.clients_per_chunk=-1: timing chunk sizes for {per_device} clients per device "
      f"(once per backend, model and round shape; cached in {path})"
    )
    block = sample_block(settings, task, per_device)
    frozen = settings.frozen_tree(backbone, task.compute_dtype)
    every_leaf = jax.tree.map(lambda _: jnp.float32(1.0), trainable)
    one_client = lambda xs: client_update(xs[0], frozen, xs[1], jax.random.key(0), every_leaf)[0]
    return autotune.measure_clients_per_chunk(one_client, (primitives.broadcast(trainable, per_device), block))

  chunk = 0
  if distributed.is_main_process():
    choice = autotune.cached_choice(path, fields, measure)
    times = ", ".join(f"{k}: {s * 1e3:.0f} ms" for k, s in sorted(choice.seconds.items()))
    log(
      f"fed.clients_per_chunk: {choice.clients_per_chunk * primitives.clients_axis_size(mesh)} "
      f"({'cached' if choice.cached else 'measured'}; per device {times})"
    )
    chunk = choice.clients_per_chunk * primitives.clients_axis_size(mesh)
  if jax.process_count() > 1:
    chunk = int(multihost_utils.broadcast_one_to_all(np.int32(chunk)))
  return chunk
