"""The embedded image backbone: pretrained on the embedded source distribution and cached with
orbax (a run with a real checkpoint loads it instead: `backbone`).

The federated clients never see the pretraining data: `digits_domains`' `pretrain` split
holds other handwritten digits, rendered only in the `source` domain. Classifiers (ViT,
Mixer) are pretrained with cross-entropy; the CLIP dual encoder contrastively on captions
(`CAPTION_TEMPLATES` filled with the class name), never with the zero-shot prompt template it
is evaluated with. The cache key hashes everything that determines the weights
(architecture, data, objective, schedule, seed), so every federated run with the same
backbone config reuses one file. A cache is built under a temporary name, a manifest of its
files' sha256 written last (`hyperlora_jax.files`), then renamed into place; each restore
verifies it, and a cache that does not match or cannot be read is reported by name, never
silently replaced.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments.runner.settings import BackboneSettings
from experiments.runner.data.loader import ImageDataset, load_image_dataset
from hyperlora_jax import files, models
from hyperlora_jax.models import clip as clip_lib

PRETRAIN_SEED = 0
CACHE_FORMAT = 2  # In the key: 2 has a manifest of checksums (caches without one are not read).
# Captions of the contrastive (CLIP) pretraining; the zero-shot prompt template is not one of them.
CAPTION_TEMPLATES = (
  "a picture of the number {}",
  "a drawing of a {}",
  "the handwritten digit {}",
  "an image showing {}",
  "{}",
  "a grey {} on a dark background",
)


def _key_fields(backbone: BackboneSettings) -> dict:
  model = {k: v for k, v in backbone.model.items() if k != "remat"}  # Compute only.
  pretraining = backbone.pretrain
  fields = {
    "model": model,
    "data_name": pretraining.data_name,
    "split": pretraining.split,
    "image_size": backbone.image_size,
    "steps": pretraining.steps,
    "batch_size": pretraining.batch_size,
    "learning_rate": pretraining.learning_rate,
    "seed": PRETRAIN_SEED,
    "cache_format": CACHE_FORMAT,
  }
  if not models.has_head(backbone.model["name"]):
    fields["captions"] = CAPTION_TEMPLATES
  return fields


def supervised_loss(model) -> Callable:
  """(variables, images, labels, captions) -> mean cross-entropy of the classifier."""

  def loss(variables, images, labels, captions):
    del captions
    logits = model.apply(variables, models.preprocess_images(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


def contrastive_loss(model) -> Callable:
  """(variables, images [B,...], labels [B], captions [B, L]) -> symmetric CLIP loss.

  Captions of the same class are positives of each other: the targets of image i are
  uniform over the captions j with label_j = label_i (and likewise for each caption), so
  the many same-class pairs of a 10-class batch are not pushed apart.
  """

  def loss(variables, images, labels, captions):
    logits = model.apply(variables, models.preprocess_images(images), captions)  # [B, B]
    same = (labels[:, None] == labels[None, :]).astype(logits.dtype)
    targets = same / same.sum(axis=1, keepdims=True)
    return 0.5 * (
      optax.softmax_cross_entropy(logits, targets).mean() + optax.softmax_cross_entropy(logits.T, targets).mean()
    )

  return loss


def caption_tokens(model, class_names: tuple[str, ...]) -> np.ndarray:
  """[len(CAPTION_TEMPLATES), K, max_len] tokens of every (template, class) caption."""
  return np.stack(
    [
      clip_lib.tokenize(clip_lib.class_prompts(class_names, t), model.vocab_size, model.max_len)
      for t in CAPTION_TEMPLATES
    ]
  )


def cache_path(backbone: BackboneSettings) -> str:
  """The cache directory of the embedded backbone `backbone` describes: named by the model and a
  hash of everything that determines its weights.

  Args:
    backbone: `settings.backbone_settings(config)` of an image run.
  Returns:
    The directory (it may not exist yet).
  """
  return backbone.cache_directory(backbone.model["name"], _key_fields(backbone))


def pretrain(
  model,
  data: ImageDataset,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float,
  seed: int = PRETRAIN_SEED,
  log: Callable[[str], None] = print,
) -> tuple[Any, dict]:
  """Full training of `model` on `data` (90% train, 10% held out): cross-entropy for a
  classifier, the contrastive caption loss for CLIP.

  Returns:
    (variables, {"holdout_accuracy" (zero-shot for CLIP), "seconds"}).
  """
  is_clip = isinstance(model, clip_lib.CLIP)
  loss_fn = contrastive_loss(model) if is_clip else supervised_loss(model)
  captions = caption_tokens(model, model.class_names) if is_clip else None
  no_captions = np.zeros((batch_size, 1), np.int32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(data))
  n_hold = max(1, len(data) // 10)
  hold, train = data.subset(order[:n_hold]), data.subset(order[n_hold:])
  variables = model.init(jax.random.key(seed), models.preprocess_images(train.images[:1]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), max(steps, 1))
  optimizer = optax.adamw(schedule, weight_decay=1e-4)

  @jax.jit
  def step(variables, opt_state, images, labels, batch_captions):
    loss, grads = jax.value_and_grad(loss_fn)(variables, images, labels, batch_captions)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    variables = optax.apply_updates(variables, updates)
    return (clip_lib.clamp_logit_scale(variables) if is_clip else variables), opt_state, loss

  @jax.jit
  def correct(variables, images, labels):
    return jnp.sum(jnp.argmax(model.apply(variables, models.preprocess_images(images)), -1) == labels)

  start = time.time()
  opt_state = optimizer.init(variables)
  for i in range(steps):
    batch = rng.choice(len(train), size=batch_size, replace=False)
    labels = train.labels[batch]
    # Only CLIP draws caption templates, so a classifier's batch stream is that of plain supervised training.
    batch_captions = captions[rng.integers(len(captions), size=batch_size), labels] if is_clip else no_captions
    variables, opt_state, loss = step(variables, opt_state, train.images[batch], labels, batch_captions)
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"  pretrain step {i + 1}/{steps}: loss {float(loss):.3f}")
  hits = sum(
    int(correct(variables, hold.images[i : i + 512], hold.labels[i : i + 512])) for i in range(0, len(hold), 512)
  )
  return variables, {"holdout_accuracy": hits / len(hold), "seconds": time.time() - start}


def abstract_backbone(backbone: BackboneSettings, num_classes: int) -> Any:
  """The image model's variables as `jax.ShapeDtypeStruct`s on this process's device (what a
  cache or a checkpoint is restored into).

  Args:
    backbone: its `model` block and `image_size`.
    num_classes: the head's classes.
  Returns:
    {"params": ...} of ShapeDtypeStructs.
  """
  model = models.model_from_config(backbone.model, num_classes)
  shape = (1, backbone.image_size, backbone.image_size, 3)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # This process's own device.
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=local),
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32)),
  )


def _local_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer for this process alone: the backbone cache is a local file, read (and, in a
  multi-process run, written by the main process) without synchronizing with other processes."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
    multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  )


def load_or_pretrain(backbone: BackboneSettings, log: Callable[[str], None] = print) -> tuple[Any, dict]:
  """The embedded backbone's variables (without the pretraining head) and its info: pretrained
  and cached on first use; later calls restore the cache after verifying its manifest.

  Args:
    backbone: `settings.backbone_settings(config)` of an image run.
    log: progress lines.
  Returns:
    ({"params": ...}, {"holdout_accuracy", "seconds", "num_classes"}).
  Raises:
    RuntimeError: the cache exists but is not what was written or cannot be restored (it is
      left in place).
  """
  path, pretraining = cache_path(backbone), backbone.pretrain
  info_path = os.path.join(path, "info.json")
  if os.path.exists(path):
    try:
      files.verify_manifest(path)
    except files.IntegrityError as e:
      raise RuntimeError(
        f"backbone cache {path} is not what was written ({e}); it was left in place. Remove "
        f"that directory to pretrain again."
      ) from None
    with open(info_path) as f:
      info = json.load(f)
    abstract = abstract_backbone(backbone, info["num_classes"])
    try:
      variables = _local_checkpointer().restore(os.path.abspath(os.path.join(path, "variables")), abstract)
    except Exception as e:  # Orbax raises several types for unreadable files.
      raise RuntimeError(
        f"backbone cache {path} is corrupt or incompatible ({type(e).__name__}: "
        f"{e}). Remove that directory to pretrain again."
      ) from e
    log(f"backbone: restored from {path} (pretrain holdout accuracy {info['holdout_accuracy']:.3f})")
  else:
    data = load_image_dataset(pretraining.data_name, pretraining.split, backbone.data_dir or None, backbone.image_size)
    model = models.model_from_config(backbone.model, data.num_classes, data.class_names)
    log(
      f"backbone: pretraining {backbone.model['name']} on {pretraining.data_name}:"
      f"{pretraining.split} ({len(data)} images, {pretraining.steps} steps)"
    )
    variables, info = pretrain(
      model,
      data,
      steps=pretraining.steps,
      batch_size=pretraining.batch_size,
      learning_rate=pretraining.learning_rate,
      log=log,
    )
    info["num_classes"] = data.num_classes
    bad = [
      jax.tree_util.keystr(k)
      for k, v in jax.tree_util.tree_leaves_with_path(variables)
      if not np.all(np.isfinite(np.asarray(v)))
    ]
    if bad:  # A diverged backbone is never cached (nor used).
      raise FloatingPointError(
        f"pretraining diverged: {len(bad)} non-finite variable(s), e.g. {bad[0]}; "
        f"nothing was cached. Lower pretrain.learning_rate "
        f"(={pretraining.learning_rate})."
      )

    def write(partial):
      checkpointer = _local_checkpointer()
      checkpointer.save(os.path.join(os.path.abspath(partial), "variables"), variables)
      checkpointer.wait_until_finished()
      with open(os.path.join(partial, "info.json"), "w") as f:
        json.dump(info, f)

    files.build_directory(path, write)  # Whole or not at all; a concurrent run's identical cache may win.
    log(
      f"backbone: pretrained in {info['seconds']:.0f}s, holdout accuracy "
      f"{info['holdout_accuracy']:.3f}; cached at {path}"
    )
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  return {"params": params}, info
