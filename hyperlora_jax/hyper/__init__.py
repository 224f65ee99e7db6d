"""HyperLoRA's learned parts, each usable on its own.

signatures   client distribution signatures (label histogram, frozen-feature statistics)
generator    `LoraGenerator` G_φ (signature / client embedding -> LoRA offsets) and its
             server updates (`make_generator`: the pFedHN VJP rule, product distillation)
synthesis    the product-space synthesizer S_ψ and residual corrector C_ω, as one
             meta-learned `Aggregator` (`hyperlora_synthesizer`)
plugins      `generator_plugin`: the generator as a round plug-in (client-start offset,
             post-aggregation update)
"""

from hyperlora_jax.hyper.generator import NEW_CLIENT, Generator, LoraGenerator, make_generator
from hyperlora_jax.hyper.plugins import generator_plugin
from hyperlora_jax.hyper.signatures import compute_signatures, make_signature_fn
from hyperlora_jax.hyper.synthesis import (
  CrossRoundDerivativeWarning,
  SynthesisConfig,
  aligned_basis,
  hyperlora_synthesizer,
  synthesize,
)

__all__ = [
  "NEW_CLIENT",
  "CrossRoundDerivativeWarning",
  "Generator",
  "LoraGenerator",
  "SynthesisConfig",
  "aligned_basis",
  "compute_signatures",
  "generator_plugin",
  "hyperlora_synthesizer",
  "make_generator",
  "make_signature_fn",
  "synthesize",
]
