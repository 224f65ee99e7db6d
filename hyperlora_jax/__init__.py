"""hyperlora_jax: federated LoRA fine-tuning of foundation models in JAX/Flax.

Layout: `models/` (Flax backbones), `lora.py` (LoRA on any Flax model), `data/` (offline
TFDS data, partitions, padded blocks), `client.py` (one client's local steps),
`aggregators/` (pure server rules), `methods.py` (compositions), `engine.py` (the
jit-compiled vmapped round), `train.py` (the run loop).
"""
__version__ = "0.1.0"
