"""Pure (init, aggregate) pairs; one file per family."""
from hyperlora_jax.aggregators.averaging import fedit, identity
from hyperlora_jax.aggregators.base import Aggregator, weighted_mean
