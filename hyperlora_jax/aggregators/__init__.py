"""Server rules: pure (init, aggregate) pairs with declared capabilities; one file per family.

See `base` for the contract, the per-layer combinator (`aggregate_layers`, `layerwise`) and
`partition` (different rules for different parts of the tree); `robust` has robust
(median, trimmed mean, geometric median; on factors or products), clipped and DP-FedAvg rules. HyperLoRA's learned
synthesizer follows the same contract: `hyperlora_jax.hyper.hyperlora_synthesizer`.
"""

from hyperlora_jax.aggregators.averaging import fedit, head_only, identity
from hyperlora_jax.aggregators.base import (
  AggregationContext,
  Aggregator,
  Capabilities,
  aggregate_layers,
  layer_shapes,
  layerwise,
  leaf_labels,
  no_state,
  partition,
  stateless,
  weighted_mean,
)
from hyperlora_jax.aggregators.exact import fedex_lora, flora
from hyperlora_jax.aggregators.fair import lora_fair
from hyperlora_jax.aggregators.hetero import hetlora
from hyperlora_jax.aggregators.robust import ROBUST_RULES, clip_updates, dp_fedavg, robust_factors, robust_products
from hyperlora_jax.aggregators.svd import flexlora

__all__ = [
  "AggregationContext",
  "Aggregator",
  "Capabilities",
  "ROBUST_RULES",
  "aggregate_layers",
  "clip_updates",
  "dp_fedavg",
  "fedex_lora",
  "fedit",
  "flexlora",
  "flora",
  "head_only",
  "hetlora",
  "identity",
  "layer_shapes",
  "layerwise",
  "leaf_labels",
  "lora_fair",
  "no_state",
  "partition",
  "robust_factors",
  "robust_products",
  "stateless",
  "weighted_mean",
]
