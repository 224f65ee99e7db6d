"""Flax backbones. They know nothing of federation or LoRA."""

from __future__ import annotations

import dataclasses

from hyperlora_jax.models.clip import CLIP
from hyperlora_jax.models.errors import CheckpointError  # noqa: F401 (every checkpoint reader raises it)
from hyperlora_jax.models.mixer import Mixer
from hyperlora_jax.models.vit import ViT

MODELS = {"vit": ViT, "mixer": Mixer, "clip": CLIP}
ALLOWED_MODELS = tuple(MODELS)
# Attributes a config does not set: they come from the data.
_DATA_FIELDS = ("num_classes", "class_names", "parent", "name")


def arch_fields(name: str) -> dict[str, object]:
  """{field: default} of the architecture attributes `model.<field>` may set for a model.

  Args:
    name: "vit", "mixer" or "clip".
  Returns:
    {field: default}.
  """
  return {f.name: f.default for f in dataclasses.fields(MODELS[name]) if f.name not in _DATA_FIELDS and f.init}


def build_model(name: str, num_classes: int, class_names: tuple[str, ...] | None = None, **arch):
  """Builds a backbone by name with its architecture keyword arguments.

  Args:
    class_names: used by models that classify from text (`clip`); default 'class 0', ...
  """
  if name not in MODELS:
    raise ValueError(f"model.name={name!r}; allowed: {ALLOWED_MODELS}")
  if name == "clip":
    names = tuple(class_names) if class_names else tuple(f"class {i}" for i in range(num_classes))
    return CLIP(num_classes=num_classes, class_names=names, **arch)
  return MODELS[name](num_classes=num_classes, **arch)


def model_from_config(model_config, num_classes: int, class_names: tuple[str, ...] | None = None):
  """`build_model` from a config's `model` block (`name` plus architecture fields).

  Args:
    model_config: a config's `model` block (`name` and architecture fields): a `ConfigDict`
      or any mapping.
    num_classes: K; class_names: for CLIP's prompts.
  Returns:
    The Flax module.
  """
  arch = {k: v for k, v in model_config.items() if k != "name"}
  return build_model(model_config["name"], num_classes, class_names, **arch)


def has_head(name: str) -> bool:
  """Whether the model ends in a trainable `head` classifier (CLIP classifies from text).

  Args:
    name: the model's name.
  Returns:
    A bool.
  """
  return name != "clip"


def preprocess_images(images):
  """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1].

  Args:
    images: uint8 [..., H, W, 3].
  Returns:
    float32, the same shape.
  """
  return images.astype("float32") / 127.5 - 1.0
