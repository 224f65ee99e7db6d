"""Tasks built on the library: what a model, its data and its loss are (the round knows none)."""

from hyperlora_jax.tasks import causal_lm, common, image_classification

__all__ = ["causal_lm", "common", "image_classification"]
