"""The client update the benchmarks time: the default config's model on random weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from configs import benchmarks, default
from hyperlora_jax import lora, models
from hyperlora_jax.client import local_update
from experiments.runner.optimizers import build_optimizer
from hyperlora_jax.tasks.image_classification import ImageClassification, backbone_dtype, frozen_tree
from experiments.runner.experiment import initial_trainable


def client_update_fn(width: int = 0, depth: int = 0, image_size: int = 0, base_model: bool = False,
                     base_clip: bool = False):
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
  trainable, _ = initial_trainable(model, backbone, example, config.lora.target_regex, config.lora.rank,
                                   jax.random.key(1))
  dtype = backbone_dtype(config.compute.backbone_dtype)  # 'auto': bfloat16 on GPU/TPU, float32 on CPU.
  task = ImageClassification(model, lora.lora_scale(config.lora.alpha, config.lora.rank),
                              models.preprocess_images, compute_dtype=dtype)
  client_update = local_update(task.loss_fn, build_optimizer(config.client_optimizer))
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
  return {"image": jnp.asarray(rng.integers(0, 256, shape + (image_size, image_size, 3), dtype=np.uint8)),
          "label": jnp.asarray(rng.integers(0, 10, shape, dtype=np.int32)),
          "mask": jnp.ones(shape, jnp.float32)}
