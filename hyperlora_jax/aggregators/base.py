"""The server-side interface: an aggregator is a pair of pure functions.

    state = aggregator.init(global_trainable)
    new_global, base_delta, state = aggregator.aggregate(state, global_trainable,
                                                         client_trainables, weights)

Shapes: `global_trainable` is the trainable pytree `{"lora": {path: {"a": [d_in, r],
"b": [r, d_out]}}, "head": ...}`; `client_trainables` is the same with a leading
`[clients]` axis; `weights` is `[clients]`, non-negative, summing to 1 (padding and
non-finite clients have weight 0). `base_delta` is `{path: [d_in, d_out]}` (kernel layout),
a full-rank increment the server merges into the frozen weights (`{}` for most methods).
Like optax's `GradientTransformation`, aggregators hold no models, no data and no I/O, and
methods are compositions of them, not subclasses.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Tree = Any


class Aggregator(NamedTuple):
  init: Callable[[Tree], Tree]
  aggregate: Callable[[Tree, Tree, Tree, jax.Array], tuple[Tree, dict, Tree]]


def weighted_mean(client_tree: Tree, weights: jax.Array) -> Tree:
  """Σ_k w_k x_k over the leading clients axis. [C, ...] x [C] -> [...]."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), client_tree)


def no_state(_: Tree) -> Tree:
  """`init` for stateless aggregators."""
  return {}
