"""Flax backbones. They know nothing of federation or LoRA."""
from hyperlora_jax.models.vit import ViT

ALLOWED_MODELS = ("vit",)


def build_model(name: str, num_classes: int, **kwargs):
  """Builds a backbone by name (`vit`) with its architecture keyword arguments."""
  if name == "vit":
    return ViT(num_classes=num_classes, **kwargs)
  raise ValueError(f"model.name={name!r}; allowed: {ALLOWED_MODELS}")


def preprocess_images(images):
  """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1]."""
  return images.astype("float32") / 127.5 - 1.0
