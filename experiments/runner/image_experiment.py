"""`build_image_experiment(config)`: an image run's `Experiment` (configs/default.py and the image
benchmarks): the federated images, the frozen backbone (pretrained and cached, or a
checkpoint), the image-classification task and its signatures; `assembly` builds the round."""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from experiments.runner.backbone import image_backbone
from experiments.runner.settings import backbone_settings, data_block, run_settings
from experiments.runner.assembly import Experiment, assemble, checked_method, every_client_signature, sharded_backbone
from experiments.runner.federated_data import build_federated_data
from experiments.runner.feeding import chunk_image_loader
from hyperlora_jax import lora, models, primitives
from hyperlora_jax.models import clip as clip_lib
from hyperlora_jax.tasks import image_classification as task_lib


def initial_trainable(
  model, backbone: Any, example_images: jax.Array, target_regex: str, rank: int, rng: jax.Array
) -> tuple[dict, dict]:
  """The round-0 trainable pytree and the LoRA targets.

  Args:
    example_images: [1, H, W, 3] uint8, for shapes only.
  Returns:
    ({"lora": fresh LoRA (b = 0), "head": zero head shaped like the model's ({} for a model
     without one, e.g. CLIP)}, targets {path: (d_in, d_out)}).
  """
  inputs = models.preprocess_images(example_images)
  abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["params"].get("head", {}))
  params = {**backbone["params"], **({"head": head} if head else {})}
  targets = lora.find_targets(model, {"params": params}, inputs, target_regex=target_regex)
  return {"lora": lora.init_lora(rng, targets, rank), "head": head}, targets


def build_image_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """An image run's `Experiment` from a config whose `model.*` is final
  (`backbone.with_checkpoint_architecture`): every config check first, then the data, the
  backbone, the task and the clients' signatures, then `assembly.assemble` (no compilation)."""
  mesh, method, server_optimizer = checked_method(config)
  settings, data_settings = run_settings(config), data_block(config)
  data = build_federated_data(data_settings, settings.seed, settings.eval_batch)
  if data_settings.validation_fraction:
    log(
      f"evaluating on a validation split: {data_settings.validation_fraction:g} of each client's training "
      f"examples, held out (the test split is not read)"
    )
  frozen = image_backbone(backbone_settings(config), log)
  backbone, preprocess = sharded_backbone(frozen.variables, mesh, log), frozen.preprocess
  model = build_model(settings.model, data.num_classes, data.train_pool.class_names, frozen.tokenizer)
  trainable, targets = initial_trainable(
    model,
    backbone,
    data.train_pool.images[:1],
    settings.lora.target_regex,
    settings.lora.rank,
    jax.random.fold_in(jax.random.key(settings.seed), 1),
  )
  task = task_lib.ImageClassification(
    model,
    lora.lora_scale(settings.lora.alpha, settings.lora.rank, settings.lora.rslora),
    preprocess,
    "head" if trainable["head"] else None,  # CLIP has no head.
    task_lib.backbone_dtype(settings.backbone_dtype),
  )
  signatures = (
    every_client_signature(settings, method, data, model, backbone, preprocess)
    if method.signature_kinds
    else (None, None)
  )
  return assemble(
    settings,
    log,
    mesh=mesh,
    method=method,
    server_optimizer=server_optimizer,
    data=data,
    task=task,
    backbone=backbone,
    targets=targets,
    trainable=trainable,
    signatures=signatures,
    load_batches=chunk_image_loader(data.train_pool) if settings.feed == "chunk" else None,
    byte_shapes=image_byte_shapes(data.train_pool),
  )


def image_byte_shapes(pool: Any) -> tuple:
  """`primitives.HostFeed.byte_shapes` of the round's block {"image": [C, S, B, H, W, 3] uint8, ...}."""
  example = {"image": jax.ShapeDtypeStruct((1, 1, 1) + tuple(pool.images.shape[1:]), jnp.uint8)}
  return primitives.HostFeed.of(example, None).byte_shapes


def build_model(model: dict, num_classes: int, class_names, tokenizer=None) -> Any:
  """The `model` block's image model; with a CLIP checkpoint's `tokenizer`, its class prompts
  (`model.prompt_template` filled with each class name) tokenized by it to `model.max_len` ids.

  Args:
    model: the `model` block (`RunSettings.model`).
    num_classes, class_names: the classes.
    tokenizer: a CLIP checkpoint's tokenizer, or None.
  Returns:
    The Flax module.
  """
  if tokenizer is None or model["name"] != "clip":
    return models.model_from_config(model, num_classes, class_names)
  prompts = clip_lib.class_prompts(class_names, model.get("prompt_template", "a photo of a {}."))
  prompt_ids = tuple(tuple(int(i) for i in row) for row in tokenizer(prompts, model["max_len"]))
  arch = {k: v for k, v in model.items() if k not in ("name", "prompt_ids")}
  return models.build_model(model["name"], num_classes, class_names, **arch, prompt_ids=prompt_ids)
