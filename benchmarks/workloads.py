"""The client update the benchmarks time: the default config's model on random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from configs import benchmarks, blocks, default
from hyperlora_jax import lora, models
from hyperlora_jax.client import local_update
from experiments.runner.optimizers import build_optimizer
from hyperlora_jax.tasks.image_classification import ImageClassification, backbone_dtype, frozen_tree
from experiments.runner.chunking import random_token_block
from experiments.runner.image_experiment import initial_trainable


def client_update_fn(
  width: int = 0, depth: int = 0, image_size: int = 0, base_model: bool = False, base_clip: bool = False
):
  """(one_client(start, block) -> trained, round-0 trainable, config) for the default config's
  model (or one with the given width/depth/image size; 0: the default's), random weights.
  The frozen backbone runs in `config.compute.backbone_dtype` ('auto': bfloat16 on GPU/TPU,
  float32 on CPU), as in training.
  base_model: ViT-B/16 at 224 px with LoRA r = 16 instead (`configs/domainnet.py`'s backbone).
  base_clip: OpenAI CLIP ViT-B/32 at 224 px (both towers; LoRA r = 16 on both towers' query and
    value; zero-shot over 10 class prompts of 77 tokens, the text tower run every step)."""
  config = default.get_config()
  if base_model or base_clip:
    benchmarks.set_model(config, benchmarks.BASE_MODELS["clip" if base_clip else "vit"])
    config.data.image_size, config.lora.rank, config.lora.alpha = 224, 16, 32.0
  for field, value in (("width", width), ("depth", depth)):
    if value:
      config.model[field] = value
  if image_size:
    config.data.image_size = image_size
  model = models.model_from_config(config.model, 10)
  size = config.data.image_size
  example = jnp.zeros((1, size, size, 3), jnp.uint8)
  variables = model.init(jax.random.key(0), models.preprocess_images(example))
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  trainable, _ = initial_trainable(
    model, backbone, example, config.lora.target_regex, config.lora.rank, jax.random.key(1)
  )
  dtype = backbone_dtype(config.compute.backbone_dtype)  # 'auto': bfloat16 on GPU/TPU, float32 on CPU.
  task = ImageClassification(
    model, lora.lora_scale(config.lora.alpha, config.lora.rank), models.preprocess_images, compute_dtype=dtype
  )
  client_update = local_update(
    task.loss_fn, build_optimizer(blocks.from_config(blocks.Optimizer, config.client_optimizer))
  )
  frozen = frozen_tree(backbone, dtype=dtype)
  ones = jax.tree.map(lambda _: jnp.float32(1.0), trainable)

  def one_client(start, block):
    return client_update(start, frozen, block, jax.random.key(0), ones)[0]

  return one_client, trainable, config


def random_block(num_clients: int, steps: int, batch_size: int, image_size: int) -> dict:
  """A round's block of random uint8 images and labels (seeded by the cohort size):
  {"image": [C, S, B, H, W, 3], "label": [C, S, B], "mask": ones [C, S, B]}."""
  rng = np.random.default_rng(num_clients)
  shape = (num_clients, steps, batch_size)
  return {
    "image": jnp.asarray(rng.integers(0, 256, shape + (image_size, image_size, 3), dtype=np.uint8)),
    "label": jnp.asarray(rng.integers(0, 10, shape, dtype=np.int32)),
    "mask": jnp.ones(shape, jnp.float32),
  }


# Llama-family decoders for the text benchmark (`benchmarks.text_round_speed`): the embedded
# default's size (configs/instruction_tuning.py), and two published checkpoints' architectures
# (random weights; their config.json values): HuggingFaceTB/SmolLM-135M and TinyLlama-1.1B.
DECODERS = {
  "tiny": {"vocab_size": 2048, "width": 64, "depth": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 172},
  "smollm_135m": {
    "vocab_size": 49152,
    "width": 576,
    "depth": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "mlp_dim": 1536,
    "rms_norm_eps": 1e-5,
    "tie_embeddings": True,
  },
  "tinyllama_1b": {
    "vocab_size": 32000,
    "width": 2048,
    "depth": 22,
    "num_heads": 32,
    "num_kv_heads": 4,
    "mlp_dim": 5632,
    "rms_norm_eps": 1e-5,
  },
  "llama2_7b": {
    "vocab_size": 32000,
    "width": 4096,
    "depth": 32,
    "num_heads": 32,
    "mlp_dim": 11008,
    "rms_norm_eps": 1e-5,
  },
}


def text_client_update_fn(size: str = "tiny", remat: bool = False, recompute_attention: bool = False):
  """(one_client(frozen, start, block) -> trained, frozen, round-0 trainable, DecoderLM, config)
  for the `DECODERS[size]` architecture on random weights, with configs/instruction_tuning.py's
  LoRA (r = 4, α = 8 on attention query/value) and client optimizer (Adam); the frozen decoder
  (an argument, so that a jitted round does not embed it) in `config.compute.backbone_dtype`
  ('auto': bfloat16 on GPU/TPU, float32 on CPU), as in training. A block is
  `random_text_block`'s; `remat`, `recompute_attention`: `DecoderLM`'s."""
  from configs import instruction_tuning
  from hyperlora_jax.models.llama import DecoderLM
  from hyperlora_jax.tasks.causal_lm import CausalLM

  config = instruction_tuning.get_config()
  dtype = backbone_dtype(config.compute.backbone_dtype)
  model = DecoderLM(**DECODERS[size], remat=remat, recompute_attention=recompute_attention, dtype=dtype)
  example = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda key: frozen_tree(model.init(key, example), dtype=dtype))  # Cast on the device.
  frozen = init(jax.random.key(0))
  targets = lora.find_targets(
    model, frozen["variables"], example, jnp.ones_like(example), target_regex=config.lora.target_regex
  )
  trainable = {"lora": lora.init_lora(jax.random.key(1), targets, config.lora.rank), "head": {}}
  task = CausalLM(model, lora.lora_scale(config.lora.alpha, config.lora.rank), dtype)
  client_update = local_update(
    task.loss_fn, build_optimizer(blocks.from_config(blocks.Optimizer, config.client_optimizer))
  )
  ones = jax.tree.map(lambda _: jnp.float32(1.0), trainable)

  def one_client(frozen, start, block):
    return client_update(start, frozen, block, jax.random.key(0), ones)[0]

  return one_client, frozen, trainable, model, config


def random_text_block(num_clients: int, steps: int, batch_size: int, seq_len: int, vocab_size: int) -> dict:
  """A round's block of random full-length token sequences, seeded by the cohort size, on the
  device: `chunking.random_token_block`'s {"input_ids": int32 [C, S, B, T], "attention_mask",
  "loss_mask" (the second half of each sequence), "mask": [C, S, B]}."""
  block = random_token_block(num_clients, steps, batch_size, seq_len, vocab_size, seed=num_clients)
  return jax.tree.map(jnp.asarray, block)
