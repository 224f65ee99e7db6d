"""The server-side contract: an aggregator is a pair of pure functions plus what it can do.

    state = aggregator.init(global_params, rng=None, signature_dim=0)
    new_params, base_delta, state = aggregator.aggregate(state, global_params, client_params,
                                                         weights, context)

Shapes: `global_params` is any nested-dict pytree; its LoRA layers are the dicts with keys
{"a": [d_in, r], "b": [r, d_out]} (a plain adapter `{path: {"a", "b"}}`, or a larger tree such
as `{"lora": adapter, "head": ...}`). `client_params` is the same with a leading `[C]` clients
axis; `weights` is `[C]`, non-negative, summing to 1 (padding and non-finite clients have
weight 0). `base_delta` is `{layer name: [d_in, d_out]}`, a full-rank increment the server
merges into the frozen weights (`{}` for most aggregators). `context` (`AggregationContext`,
optional) carries what some aggregators read: client signatures, train losses, and a held-out
loss for meta-learned ones. Leaves that are not in a LoRA layer are averaged by every LoRA
rule below; `partition` gives different parts of the tree different aggregators, like optax's
`multi_transform`.

`Capabilities` are data on the aggregator, checked where a round is built
(`hyperlora_jax.federated.FederatedRound`): exact only with a plain server step, heterogeneous
ranks, a full-rank base delta, bytes sent besides the shared leaves, and held-out steps.
Like optax's `GradientTransformation`, aggregators hold no models, no data and no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

import jax
from flax import traverse_util

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.primitives import weighted_mean
from hyperlora_jax.pytree import Tree

# (layer shapes {name: (d_in, d_out)}, participant ranks [r_k]) -> bytes for all participants.
BytesRule = Callable[[Mapping[str, tuple[int, int]], list], int]


def no_bytes(layer_shapes, ranks) -> int:
  """`Capabilities.extra_bytes_down` / `extra_bytes_up` of an aggregator that sends nothing else.

  Args:
    layer_shapes: {layer: (d_in, d_out)}; ranks: the participants' ranks (both unused).
  Returns:
    0.
  """
  del layer_shapes, ranks
  return 0


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What an aggregator can do and needs; the round refuses what does not fit.

  Attributes:
    name: for messages.
    plain_server_step: the aggregate is exact only when the server applies it as is (FedOpt
      with SGD, learning rate 1, no momentum); other server optimizers are refused.
    heterogeneous_ranks: defined for clients of different LoRA ranks (factors at r_max).
    base_delta: returns full-rank residuals the server merges into the frozen weights.
    extra_bytes_down / extra_bytes_up: bytes sent besides the shared leaves, for all
      participants together (FedEx-LoRA's residual, FLoRA's stacks).
    heldout_steps: local steps of each client's block held out for the aggregator's own
      objective (meta-learned aggregators); the round passes their loss in the context.
    metrics: names of scalar entries of the aggregator's state the round reports each round.
  """

  name: str = "aggregator"
  plain_server_step: bool = False
  heterogeneous_ranks: bool = False
  base_delta: bool = False
  extra_bytes_down: BytesRule = no_bytes
  extra_bytes_up: BytesRule = no_bytes
  heldout_steps: int = 0
  metrics: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AggregationContext:
  """What the round knows about this round's participants (all optional).

  Attributes:
    signatures: [C, D] client signatures (D = 0: none).
    client_loss: [C] each client's mean local train loss.
    heldout_loss: candidate new global params -> Σ_k p_k loss of client k's next-round start
      on its held-out batch (only for aggregators with `heldout_steps`).
    client_starts: [C, ...] the params each client started its local steps from (the global
      params ⊕ its local leaves, + plug-in offsets, truncated to its rank); shaped like
      `client_params`. Rules that aggregate the clients' *changes* read it.
  """

  signatures: jax.Array | None = None
  client_loss: jax.Array | None = None
  heldout_loss: Callable[[Tree], jax.Array] | None = None
  client_starts: Tree | None = None


class Aggregator(NamedTuple):
  init: Callable[..., Tree]
  aggregate: Callable[..., tuple[Tree, dict, Tree]]
  capabilities: Capabilities = Capabilities()


def no_state(global_params: Tree, rng: jax.Array | None = None, signature_dim: int = 0) -> Tree:
  """`init` for stateless aggregators.

  Args:
    global_params: the initial trainable tree (unused).
    rng, signature_dim: as `Aggregator.init` (unused).
  Returns:
    {} (no state).
  """
  del global_params, rng, signature_dim
  return {}


def stateless(name: str, rule: Callable[[Tree, Tree, jax.Array], tuple[Tree, dict]], **capabilities) -> Aggregator:
  """An `Aggregator` from `rule(global_params, client_params, weights) -> (new, base_delta)`.

  Args:
    name: the aggregator's name, as errors and reports show it.
    rule: (global_params, client_params [C, ...], weights [C]) -> (new global params, base
      delta {layer: [d_in, d_out]} or {}).
    capabilities: `Capabilities` fields (e.g. plain_average=True).
  Returns:
    An `Aggregator` whose state is {}.
  """

  def aggregate(state, global_params, client_params, weights, context=None):
    del context
    new_params, base_delta = rule(global_params, client_params, weights)
    return new_params, base_delta, state

  return Aggregator(no_state, aggregate, Capabilities(name=name, **capabilities))


def aggregate_layers(
  rule: Callable[..., Any], global_params: Tree, client_params: Tree, weights: jax.Array, **per_layer: Mapping[str, Any]
) -> tuple[Tree, dict]:
  """The per-layer combinator: `rule` on every LoRA layer, the weighted mean elsewhere.

  Args:
    rule: (client layer {"a": [C, d_in, r], "b": [C, r, d_out]}, global layer {"a", "b"},
      weights [C], **{key: per_layer[key][name]}) -> new layer, or (new layer, base delta
      [d_in, d_out]).
    per_layer: extra per-layer arguments, each {layer name: value}.
  Returns:
    (new params shaped like `global_params`, base delta {layer name: [d_in, d_out]}).
  """
  new_params = weighted_mean(client_params, weights)
  global_layers = lora_lib.layers(global_params) if global_params is not None else {}
  deltas = {}

  def visit(new_node, client_node):
    for key, child in client_node.items():
      if lora_lib.is_layer(child):
        out = rule(child, global_layers.get(key), weights, **{k: v[key] for k, v in per_layer.items()})
        if isinstance(out, tuple):
          out, deltas[key] = out
        new_node[key] = out
      elif isinstance(child, Mapping):
        visit(new_node[key], child)

  visit(new_params, client_params)
  return new_params, deltas


def layerwise(name: str, rule: Callable[..., Any], **capabilities) -> Aggregator:
  """A stateless `Aggregator` applying `rule` per LoRA layer (see `aggregate_layers`).

  Args:
    name: the aggregator's name.
    rule: per layer, as `aggregate_layers` calls it.
    capabilities: `Capabilities` fields.
  Returns:
    An `Aggregator` whose state is {}.
  """
  return stateless(name, lambda g, c, w: aggregate_layers(rule, g, c, w), **capabilities)


def leaf_labels(params: Tree, regexes: Mapping[str, str]) -> Tree:
  """A label per leaf: the first label whose regex fullmatches the leaf's '/'-joined key path.

  Args:
    params: the trainable tree.
    regexes: {label: regex}, tried in order.
  Returns:
    `params`' structure with str leaves (for `partition`, like optax.multi_transform's labels).
  Raises:
    ValueError: a leaf matches no regex.
  """

  def label(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for lab, regex in regexes.items():
      if re.fullmatch(regex, name):
        return lab
    raise ValueError(f"leaf {name!r} matches none of the labels' regexes {dict(regexes)}")

  return jax.tree_util.tree_map_with_path(label, params)


def _split(tree: Tree, labels: Tree) -> dict[str, Tree]:
  flat = traverse_util.flatten_dict(tree)
  flat_labels = traverse_util.flatten_dict(labels)
  parts: dict[str, dict] = {}
  for key, value in flat.items():
    parts.setdefault(flat_labels[key], {})[key] = value
  return {lab: traverse_util.unflatten_dict(part) for lab, part in parts.items()}


def _merge(parts: Mapping[str, Tree]) -> Tree:
  flat = {}
  for part in parts.values():
    flat.update(traverse_util.flatten_dict(part))
  return traverse_util.unflatten_dict(flat)


def partition(rules: Mapping[str, Aggregator], labels: Mapping[str, str] | Callable[[Tree], Tree]) -> Aggregator:
  """Different aggregators for different parts of the tree (optax's `multi_transform`).

  Args:
    rules: {label: Aggregator}.
    labels: {label: regex on '/'-joined leaf names} (first match wins), or a function
      params -> a tree of labels shaped like params. Both factors of a LoRA layer must get
      the same label.
  Example:
    partition({"adapter": flexlora(s), "head": fedit()}, {"adapter": r"lora/.*", "head": r"head/.*"})
  """
  label_fn = labels if callable(labels) else (lambda params: leaf_labels(params, labels))

  def labelled(params):
    return _split(params, label_fn(params))

  def init(global_params, rng=None, signature_dim=0):
    parts = labelled(global_params)
    keys = dict(zip(sorted(parts), jax.random.split(rng, len(parts)))) if rng is not None else {}
    return {lab: rules[lab].init(part, keys.get(lab), signature_dim) for lab, part in parts.items()}

  def aggregate(state, global_params, client_params, weights, context=None):
    global_parts, client_parts = labelled(global_params), _split(client_params, label_fn(global_params))
    new_parts, deltas, new_state = {}, {}, {}
    for lab in global_parts:
      new_parts[lab], delta, new_state[lab] = rules[lab].aggregate(
        state[lab], global_parts[lab], client_parts[lab], weights, context
      )
      deltas.update(delta)
    return _merge(new_parts), deltas, new_state

  caps = [r.capabilities for r in rules.values()]
  combined = Capabilities(
    name="+".join(f"{lab}:{r.capabilities.name}" for lab, r in rules.items()),
    plain_server_step=any(c.plain_server_step for c in caps),
    heterogeneous_ranks=all(c.heterogeneous_ranks for c in caps),
    base_delta=any(c.base_delta for c in caps),
    extra_bytes_down=lambda shapes, ranks: sum(c.extra_bytes_down(shapes, ranks) for c in caps),
    extra_bytes_up=lambda shapes, ranks: sum(c.extra_bytes_up(shapes, ranks) for c in caps),
    heldout_steps=max(c.heldout_steps for c in caps),
  )
  if any(c.metrics for c in caps):
    raise ValueError("partition: an aggregator that reports metrics cannot be a part (its state is nested)")
  return Aggregator(init, aggregate, combined)


def layer_shapes(params: Tree) -> dict[str, tuple[int, int]]:
  """{layer name: (d_in, d_out)} of the LoRA layers of `params` (no clients axis).

  Args:
    params: the trainable tree, without a clients axis.
  Returns:
    {layer name: (d_in, d_out)}.
  """
  return {name: (f["a"].shape[-2], f["b"].shape[-1]) for name, f in lora_lib.layers(params).items()}


__all__ = [
  "Aggregator",
  "AggregationContext",
  "Capabilities",
  "aggregate_layers",
  "layerwise",
  "layer_shapes",
  "leaf_labels",
  "no_state",
  "partition",
  "stateless",
  "weighted_mean",
]
