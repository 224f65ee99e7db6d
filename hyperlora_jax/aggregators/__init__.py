"""Pure (init, aggregate) pairs; one file per family."""
from hyperlora_jax.aggregators.averaging import fedit, head_only, identity
from hyperlora_jax.aggregators.base import Aggregator, weighted_mean
from hyperlora_jax.aggregators.exact import fedex_lora, flora
from hyperlora_jax.aggregators.fair import lora_fair
from hyperlora_jax.aggregators.hetero import hetlora
from hyperlora_jax.aggregators.svd import flexlora
from hyperlora_jax.aggregators.synthesis import LearnedAggregator, SynthesisConfig, hyperlora_synthesizer
