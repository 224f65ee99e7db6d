"""The federated round: one jit-compilable pure function for every sampled client.

    fed_round = FederatedRound(client_update, aggregator, num_clients=N, ...)
    state = fed_round.init(rng, params)
    state, metrics = jax.jit(fed_round.step)(state, frozen, batches, client_ids, weights)

A round gathers the sampled clients' persistent local leaves, builds each client's start
(global ⊕ its local leaves, + every plug-in's offset, truncated to its rank), runs the client
update for all clients with `primitives.map_clients` (vmap of a `lax.scan`, chunked, sharded),
injects the configured faults (`faults`), leaves non-finite clients out, aggregates (the
aggregator sees each client's start too), applies the server optimizer (FedOpt) to the
pseudo-gradient, runs the plug-ins' post-aggregation hooks and scatters local leaves back.
Each server part (aggregate, server step, every plug-in) whose output is non-finite or blows
up is rejected and keeps its previous state (`max_server_value`; `rejected_*` metrics).
It knows nothing of models, tasks or methods: those are the loss, the aggregator and the
plug-ins. Block shapes are fixed, so it compiles once per run.

Server state, a `ServerState` (a pytree, checkpointed whole as `ServerState.as_dict()`):
  round          int32 scalar, rounds done
  rng            uint32 [2], the server's PRNG key data
  global_params  the global params (any nested-dict tree holding LoRA layers); "global" in the dict
  server_opt     optax state of the server optimizer over `global_params`
  clients        {leaf name: [N', ...]} the leaves each client keeps locally
  agg            the aggregator's state
  base_delta     {layer: [d_in, d_out]} full-rank residuals merged into frozen weights ({} if unused)
  plugins        {plug-in name: its state}
  signatures     [N', D] per-client signatures (None when D = 0)

The per-client store has N' = `store_rows` rows: N rounded up to a multiple of the mesh's
devices (rows past N are never read), so that `state_shardings` can shard it over the
`clients` mesh axis: each device then holds the state of N'/D clients, not of all N.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hyperlora_jax import diagnostics as diagnostics_lib
from hyperlora_jax import faults as faults_lib
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import params as params_lib
from hyperlora_jax import primitives
from hyperlora_jax import states
from hyperlora_jax.aggregators.base import AggregationContext, Aggregator, layer_shapes
from hyperlora_jax.client import ClientUpdate
from hyperlora_jax.pytree import Tree

NEW_CLIENT = -1  # Client id of a client with no learned state (the global model, new clients).
FAULT_STREAM = 1 << 30  # fold_in index of the round key that draws injected faults.


@states.typed_state
@dataclasses.dataclass(frozen=True)
class ServerState(states.TypedState):
  """The server state of a `FederatedRound` (module docstring), typed like optax's states.

  `state["global"]`, `state["clients"]`, ... and `"signatures" in state` read it as the dict
  it is checkpointed as (`as_dict`: the layout of every checkpoint, old ones included, nested
  typed states such as the aggregator's as dicts too); `states.like(state, tree)` restores a
  checkpoint's dict into a state shaped like `state`.
  """

  round: jax.Array
  rng: jax.Array
  global_params: Tree
  server_opt: Tree
  clients: dict
  agg: Tree
  base_delta: dict
  plugins: dict
  signatures: jax.Array | None = None

  DICT_KEYS = {"global_params": "global"}

  @classmethod
  def from_dict(cls, tree: dict) -> ServerState:
    """The state of a dict in `as_dict`'s layout, its parts as given (`states.like` rebuilds
    the typed parts too).

    Args:
      tree: {"params", "clients", "signatures", "aggregator", "plugins", "round", ...} as
        `as_dict` writes it (e.g. restored from a checkpoint).
    Returns:
      A `ServerState`.
    """
    return cls(**{"global_params" if key == "global" else key: value for key, value in tree.items()})


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
  """What post-aggregation hooks see. Shapes: C sampled clients (padding included).

  Attributes:
    new_global: the global params after the server step.
    client_params: [C, ...] each client's trained params (its start if non-finite).
    weights: [C] aggregation weights (sum 1; 0 for padding and non-finite clients).
    client_ids: [C] ids (padding clients read as client 0, with weight 0).
    signatures: [C, D] their signatures (D = 0: none).
    rank_masks: [C, r_max] {0, 1}.
    previous_global: the global params the round started from.
    client_starts: [C, ...] where each client started (`FederatedRound.client_start`).
  """

  new_global: Tree
  client_params: Tree
  weights: jax.Array
  client_ids: jax.Array
  signatures: jax.Array
  rank_masks: jax.Array
  previous_global: Tree = None
  client_starts: Tree = None


class Plugin(NamedTuple):
  """A server component with state and two hooks (HyperLoRA's generator is one).

  Attributes:
    name: key of its state in `state.plugins`.
    init: rng -> state.
    client_offsets: (state, signatures [C, D], client_ids [C]) -> offsets {layer: {"a", "b"}}
      with a leading [C] axis, added to each client's starting LoRA layers (client id
      `NEW_CLIENT`: a client with no learned state).
    after_aggregation: (state, RoundOutcome) -> state.
    signature_dim: D of the signatures [C, D] its hooks read (None: not declared, unchecked);
      `FederatedRound.init` checks the signatures it is given against it.
  """

  name: str
  init: Callable[[jax.Array], Tree]
  client_offsets: Callable[[Tree, jax.Array, jax.Array], dict]
  after_aggregation: Callable[[Tree, RoundOutcome], Tree]
  signature_dim: int | None = None


def is_plain_step(optimizer: optax.GradientTransformation) -> bool:
  """Whether `optimizer` applies an update as is (u = -g, every step): SGD, lr 1, no momentum.

  Args:
    optimizer: an optax optimizer, probed on two steps of a 3-element gradient.
  Returns:
    True when both updates are -g.
  """
  params = {"x": jnp.arange(3.0)}
  state = optimizer.init(params)
  for g in (jnp.array([1.0, -2.0, 0.5]), jnp.array([-3.0, 0.25, 2.0])):
    updates, state = optimizer.update({"x": g}, state, params)
    if not np.allclose(np.asarray(updates["x"]), -np.asarray(g), rtol=0, atol=1e-7):
      return False
  return True


def round_update_mask(frozen_leaves: Sequence[str], params: Tree, round_index: jax.Array) -> Tree:
  """Float scalar per leaf: 0 where `frozen_leaves[round % len]` (a regex on leaf names)
  freezes it this round, else 1.

  Args:
    frozen_leaves: regexes on leaf names, cycled over rounds (empty: nothing frozen).
    params: the trainable tree.
    round_index: scalar int.
  Returns:
    `params`' structure with float32 scalar leaves in {0, 1}.
  """
  phases = [params_lib.regex_mask(params, r) for r in frozen_leaves]
  phase = round_index % len(phases)
  return jax.tree.map(lambda *frozen: jnp.array([0.0 if f else 1.0 for f in frozen], jnp.float32)[phase], *phases)


def rank_update_mask(update_mask: Tree, rank_mask: jax.Array) -> Tree:
  """The round's per-leaf update mask times the client's rank mask on the LoRA layers.

  Args:
    update_mask: `round_update_mask`'s tree.
    rank_mask: [r_max] in {0, 1}, one client's.
  Returns:
    The tree with each LoRA layer's masks multiplied: {"a": [1, r_max], "b": [r_max, 1]}.
  """
  return lora_lib.map_layers(
    lambda m: {"a": m["a"] * rank_mask[None, :], "b": m["b"] * rank_mask[:, None]}, update_mask
  )


@dataclasses.dataclass(frozen=True)
class FederatedRound:
  """A federated round over N registered clients (see the module docstring).

  Attributes:
    client_update: `client.local_update(loss_fn, optimizer)`.
    aggregator: the server rule (`hyperlora_jax.aggregators`); its capabilities are checked
      here, when the round is built.
    num_clients: N, clients with persistent state (local leaves, signatures).
    server_optimizer: FedOpt's optimizer on the pseudo-gradient (global − aggregate);
      sgd(1.0) is plain aggregation.
    local_leaves: regex on leaf names ('/'-joined key paths, e.g. `lora/enc/query/b`): leaves
      each client keeps across rounds and never sends.
    frozen_leaves: regexes of leaves clients do not update; round r uses entry r % len
      (RoLoRA alternates); frozen shared leaves are not sent up.
    client_ranks: [N] LoRA rank of each client (None: all at the adapter's rank r_max).
    clients_per_chunk: clients vmapped together (0: all sampled clients at once).
    mesh: shard the clients axis over this mesh's `clients` axis (None: one device).
    plugins: server components with client-start and post-aggregation hooks.
    load_batches: maps one chunk of the `batches` given to `step` ([k, S + h, ...] leaves) to
      the batches the loss reads, inside the chunk loop (e.g. `primitives.host_loader` turning
      example indices into images): `step` then takes light batches and only one chunk of
      the full ones exists at a time. None: `batches` are the full batches.
    apply_base_delta: (frozen, base_delta {layer: [d_in, d_out]}) -> the frozen tree the
      loss sees; required by aggregators that return a base delta (FedEx-LoRA, FLoRA).
    max_server_value: server outputs are checked inside the step: an aggregate (with its
      base delta and aggregator state), a server step (new global params and optimizer
      state) or a plug-in's new state that is non-finite, or a global param entry larger
      than this in magnitude (None: no bound), is rejected; that part keeps its previous
      state and the round reports it (`rejected_*` metrics).
    faults: injected client faults (`hyperlora_jax.faults`; None: none); their per-round
      counts are reported as `faults_<kind>` metrics.
  """

  client_update: ClientUpdate
  aggregator: Aggregator
  num_clients: int
  server_optimizer: optax.GradientTransformation = optax.sgd(1.0)
  local_leaves: str = ""
  frozen_leaves: tuple[str, ...] = ("",)
  client_ranks: Any = None
  clients_per_chunk: int = 0
  mesh: Mesh | None = None
  plugins: tuple[Plugin, ...] = ()
  apply_base_delta: Callable[[Tree, dict], Tree] | None = None
  load_batches: Callable[[Tree], Tree] | None = None
  max_server_value: float | None = 1e6
  faults: faults_lib.Faults | None = None

  def __post_init__(self):
    for argument, problem in capability_problems(self.aggregator, self.server_optimizer, self.client_ranks):
      raise ValueError(f"{argument}: {problem}")
    caps = self.aggregator.capabilities
    if caps.base_delta and self.apply_base_delta is None:
      raise ValueError(
        f"aggregator {caps.name!r} merges a full-rank base delta into the frozen "
        f"weights: give FederatedRound(apply_base_delta=...)"
      )
    try:
      re.compile(self.local_leaves)
      [re.compile(r) for r in self.frozen_leaves]
    except re.error as e:
      raise ValueError(f"local_leaves / frozen_leaves: not a valid regex ({e})") from None

  # ---------------------------------------------------------------- state

  @property
  def store_rows(self) -> int:
    """N': rows of the per-client store, N rounded up to a multiple of the mesh's devices.

    Returns:
      N', an int >= num_clients.
    """
    devices = primitives.clients_axis_size(self.mesh)
    return -(-self.num_clients // devices) * devices

  def init(self, rng: jax.Array, params: Tree, signatures: jax.Array | None = None) -> ServerState:
    """The round-0 server state; every client's local leaves start from `params`.

    Args:
      params: the initial global params (with LoRA layers).
      signatures: [N, D] per-client signatures (None or D = 0: none); D must be what each
        plug-in declares (`Plugin.signature_dim`, e.g. `make_generator(signature_dim=D)`).
    Raises:
      ValueError: signatures not [N, D], or D not the plug-ins' declared width; LoRA layers of
        rank 0, or client ranks outside [1, r].
    """
    self.check_signatures(signatures)
    self.check_ranks(params)
    local_mask = params_lib.regex_mask(params, self.local_leaves)
    clients = params_lib.select(primitives.broadcast(params, self.store_rows), local_mask)
    key = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
    signature_dim = 0 if signatures is None else signatures.shape[-1]
    padding = ((0, self.store_rows - self.num_clients), (0, 0))
    return ServerState(
      round=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(key),
      global_params=jax.tree.map(jnp.array, params),  # A copy: donating the state keeps `params`.
      server_opt=self.server_optimizer.init(params),
      clients=jax.tree.map(jnp.asarray, clients),
      agg=self.aggregator.init(params, jax.random.fold_in(key, 8), signature_dim),
      base_delta=lora_lib.zero_deltas(params) if self.aggregator.capabilities.base_delta else {},
      plugins={p.name: p.init(jax.random.fold_in(key, 7)) for p in self.plugins},
      signatures=jnp.pad(jnp.asarray(signatures, jnp.float32), padding) if signature_dim else None,
    )

  # ---------------------------------------------------------------- client starts

  def signatures_of(self, state: ServerState, client_ids: jax.Array) -> jax.Array:
    """[C, D] signatures of `client_ids` ([C, 0] when the run has none).

    Args:
      state: the server state.
      client_ids: [C] ints in [0, N).
    Returns:
      [C, D] float32.
    """
    if state.signatures is None:
      return jnp.zeros((client_ids.shape[0], 0), jnp.float32)
    return state.signatures[client_ids]

  def rank_masks(self, params: Tree) -> jax.Array:
    """[N, r_max] {0, 1} rank mask of every registered client.

    Args:
      params: the trainable tree (for r_max).
    Returns:
      [N, r_max] float32.
    """
    return lora_lib.rank_masks(self.client_ranks, self.num_clients, lora_lib.rank_of(params))

  def offsets(self, state: ServerState, signatures: jax.Array, client_ids: jax.Array) -> dict | None:
    """The plug-ins' summed client-start offsets {layer: {"a", "b"}} [C, ...] (None: no plug-in).

    Args:
      state: the server state.
      signatures: [C, D].
      client_ids: [C].
    Returns:
      {layer name: {"a": [C, d_in, r], "b": [C, r, d_out]}}, or None without a plug-in.
    """
    total = None
    for plugin in self.plugins:
      offset = plugin.client_offsets(state.plugins[plugin.name], signatures, client_ids)
      total = offset if total is None else jax.tree.map(jnp.add, total, offset)
    return total

  @staticmethod
  def client_start(global_params: Tree, client_local: dict, offset: dict | None, rank_mask: jax.Array) -> Tree:
    """One client's start: global ⊕ its local leaves, + offsets, truncated to its rank.

    Args:
      client_local: {leaf name: leaf} the client keeps.
      offset: {layer: {"a", "b"}} added to the LoRA layers (None: nothing).
      rank_mask: [r_max] float {0, 1}.
    """
    start = params_lib.combine(global_params, client_local)
    if offset is not None:
      start = lora_lib.add_to_layers(start, offset)
    return lora_lib.truncate(start, rank_mask)

  def client_inputs(self, state: ServerState, client_ids: jax.Array) -> tuple[dict, jax.Array, dict | None, jax.Array]:
    """(local leaves [C, ...], signatures [C, D], offsets [C, ...] or None, rank masks [C, r])
    for `client_ids` (valid ids in [0, N)); with `client_start` they give each client's model.

    Args:
      state: the server state.
      client_ids: [C] ints in [0, N).
    Returns:
      (local leaves {name: [C, ...]}, signatures [C, D], offsets or None, rank masks [C, r_max]).
    """
    local = primitives.gather_clients(state.clients, client_ids)
    signatures = self.signatures_of(state, client_ids)
    offsets = self.offsets(state, signatures, client_ids) if self.plugins else None
    return local, signatures, offsets, self.rank_masks(state.global_params)[client_ids]

  def client_params(self, state: ServerState, client_ids: jax.Array) -> Tree:
    """[C, ...] the personalized params of `client_ids` ([C] ids in [0, N)): global ⊕ each
    client's local leaves, + the plug-ins' offsets for it, truncated to its rank. This is the
    model a client starts its next round from, and the one personalized evaluation scores.
    For many clients, map `client_start` over `client_inputs` in chunks instead
    (`primitives.map_clients`): this materializes all C copies.

    Args:
      state: the server state.
      client_ids: [C] ints in [0, N).
    Returns:
      The trainable tree with [C, ...] leaves.
    """
    local, _, offsets, masks = self.client_inputs(state, client_ids)
    return self.client_starts(state.global_params, local, offsets, masks)

  def client_starts(self, global_params: Tree, local: dict, offsets: dict | None, rank_masks: jax.Array) -> Tree:
    """[C, ...] `client_start` of each client from `client_inputs`' (local, offsets, rank masks).

    Args:
      global_params: the server's trainable tree.
      local, offsets, rank_masks: `client_inputs`' first, third and fourth values.
    Returns:
      The trainable tree with [C, ...] leaves.
    """
    return jax.vmap(lambda l, o, m: self.client_start(global_params, l, o, m))(local, offsets, rank_masks)

  def global_params(self, state: ServerState) -> Tree:
    """The model evaluated as *global*: the server's params plus the plug-ins' offsets for a
    client with no learned state and the mean signature (generator methods).

    Args:
      state: the server state.
    Returns:
      The trainable tree (no clients axis).
    """
    if not self.plugins:
      return state.global_params
    if state.signatures is not None:
      signature = jnp.mean(state.signatures[: self.num_clients], axis=0, keepdims=True)
    else:
      signature = jnp.zeros((1, 0), jnp.float32)
    offset = jax.tree.map(lambda x: x[0], self.offsets(state, signature, jnp.full((1,), NEW_CLIENT, jnp.int32)))
    return lora_lib.add_to_layers(state.global_params, offset)

  def _chunk_loader(self) -> Callable | None:
    """`map_clients`' load_chunk for the round's (local, batches, ...) inputs: `load_batches`
    on the batches (second entry) only."""
    load_batches = self.load_batches
    if load_batches is None:
      return None
    return lambda inputs: (inputs[0], load_batches(inputs[1]), *inputs[2:])

  # ---------------------------------------------------------------- the round

  def step(
    self, state: ServerState, frozen: Tree, batches: Tree, client_ids: jax.Array, weights: jax.Array
  ) -> tuple[ServerState, dict]:
    """One round (pure; jit it). Its inputs are checked when it is traced (`check_step_inputs`).

    Args:
      state: server state (module docstring).
      frozen: the frozen tree the loss reads (e.g. the backbone's variables).
      batches: pytree with leaves [C, S + h, B, ...]: each sampled client's S local steps of B
        examples, plus the aggregator's h = `capabilities.heldout_steps` held-out steps at the
        end (light batches with `load_batches`).
      client_ids: [C] int32 distinct sampled client ids in [0, N), -1 for padding clients. An
        id >= N, or an id given a second time (its later copies), is refused when the ids are
        concrete; under jit it cannot be, and it is left out like padding and counted in the
        `invalid_client_ids` metric.
      weights: [C] float32 relative aggregation weights w_k >= 0 (e.g. example counts; 0 for
        padding), not all zero. The round aggregates with p_k = w_k / Σ_j w_j over the clients
        whose update reached the server (valid, finite, not dropped), so the aggregate is a
        weighted mean whatever the weights sum to. A negative or non-finite weight is refused
        when concrete; under jit its client is left out and counted in `invalid_weights`.
        `weighted_mean` itself does not normalize.
    Returns:
      (new state, {"train_loss", "nonfinite_clients", "participants", "invalid_client_ids",
       "invalid_weights", "rejected_aggregate", "rejected_server_step", "rejected_plugins"} plus the aggregator's
       declared metrics and the round's diagnostics, `diagnostics.round_diagnostics`:
       aggregation bias per layer, client drift, first/last local-step loss, generator offset
       norm; `faults_<kind>` counts with injected faults).
    """
    self.check_step_inputs(batches, client_ids, weights)
    caps = self.aggregator.capabilities
    global_params = state.global_params
    local_mask = params_lib.regex_mask(global_params, self.local_leaves)
    update_mask = round_update_mask(self.frozen_leaves, global_params, state.round)
    in_range = (client_ids >= 0) & (client_ids < self.num_clients)
    repeated = in_range & repeated_ids(client_ids)
    good_weight = jnp.isfinite(weights) & (weights >= 0)
    valid = in_range & ~repeated & good_weight
    weights = jnp.where(good_weight, weights, 0.0)
    gather_ids = jnp.where(valid, client_ids, 0)
    local, signatures, offsets, masks = self.client_inputs(state, gather_ids)
    if caps.base_delta:  # __post_init__ required apply_base_delta for it.
      assert self.apply_base_delta is not None
      frozen = self.apply_base_delta(frozen, state.base_delta)
    round_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
    keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(round_key, i)))(client_ids)
    batches, heldout = split_heldout(batches, caps.heldout_steps)  # Held-out steps: never trained on.
    train_steps = jax.tree.leaves(batches)[0].shape[1]

    # 1. Local training of every sampled client, with injected faults (a simulation knob) and
    #    non-finite updates replaced by the client's start.
    train = self._client_trainer(global_params, frozen, update_mask)
    fault_inputs: tuple = ()
    fault_masks = None
    if self.faults is not None and self.faults.active:
      fault_masks = faults_lib.draw(self.faults, jax.random.fold_in(round_key, FAULT_STREAM), valid)
      fault_inputs = faults_lib.client_inputs(self.faults, fault_masks, train_steps)
      train = faults_lib.with_faults(train, self.faults)
    trained, metrics, finite, starts = primitives.map_clients(
      leave_out_nonfinite(train),
      (local, batches, offsets, masks, keys, *fault_inputs),
      self.clients_per_chunk,
      self.mesh,
      self._chunk_loader(),
    )

    # 2. What reached the server: valid, finite and not dropped; p_k normalized over those.
    if fault_masks is not None:  # A dropped client trained, but its update never arrived.
      weights = jnp.where(fault_masks["dropout"], 0.0, weights)
    weights = jnp.where(valid & finite, weights, 0.0)
    total = jnp.sum(weights)
    weights = weights / jnp.maximum(total, 1e-12)
    participants = total > 0  # Nothing usable came back (every client non-finite): keep the global model.

    # 3. Aggregation, 4. the server step, 5. the plug-ins: each kept only if sound.
    context = AggregationContext(
      signatures=signatures,
      client_loss=metrics["loss"],
      client_starts=starts,
      heldout_loss=(
        self._heldout_loss(trained, local_mask, heldout, offsets, masks, keys, frozen, weights, train_steps=train_steps)
        if caps.heldout_steps
        else None
      ),
    )
    aggregated, base_delta_increment, agg_state, aggregate_ok = self._aggregate_if_sound(
      state, trained, weights, context, participants
    )
    new_global, server_opt, step_ok = self._server_step_if_sound(state, aggregated)
    # Local leaves are not the server's, and frozen leaves were not sent: both stay as they were.
    new_global = jax.tree.map(
      lambda n, g, m, u: g if m else jnp.where(u > 0, n, g), new_global, global_params, local_mask, update_mask
    )
    outcome = RoundOutcome(new_global, trained, weights, gather_ids, signatures, masks, global_params, starts)
    plugin_states, plugins_rejected = self._plugins_if_finite(state, outcome)

    # 6. Write-back: the clients' local leaves to the store (padding and invalid ids dropped).
    scatter_ids = jnp.where(valid, client_ids, self.store_rows)  # Out of range: dropped.
    clients = primitives.scatter_clients(state.clients, scatter_ids, params_lib.select(trained, local_mask))
    clients = primitives.constrain_clients(clients, self.mesh)  # The store stays sharded.
    base_delta = (
      jax.tree.map(lambda d, inc: d + jnp.where(total > 0, inc, 0.0), state.base_delta, base_delta_increment)
      if base_delta_increment
      else state.base_delta
    )
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(
      round=state.round + 1,
      rng=rng,
      global_params=new_global,
      server_opt=server_opt,
      clients=clients,
      agg=agg_state,
      base_delta=base_delta,
      plugins=plugin_states,
    )

    # 7. Metrics.
    received = weights > 0
    round_metrics = {
      **train_loss_metrics(metrics, received),
      "nonfinite_clients": jnp.sum(valid & ~finite),
      "participants": jnp.sum(received),
      "invalid_client_ids": (jnp.sum(client_ids >= self.num_clients) + jnp.sum(repeated)).astype(jnp.int32),
      "invalid_weights": jnp.sum(~good_weight & (client_ids >= 0)).astype(jnp.int32),
      "rejected_aggregate": (participants & ~aggregate_ok).astype(jnp.int32),
      "rejected_server_step": (~step_ok).astype(jnp.int32),
      "rejected_plugins": plugins_rejected,
    }
    round_metrics.update({name: agg_state[name] for name in caps.metrics})
    # The starts again, from the round's inputs rather than the mapped output: the diagnostics'
    # weighted sums then fuse with them, and methods that never read `starts` never store them.
    starts_again = self.client_starts(global_params, local, offsets, masks)
    round_metrics.update(diagnostics_lib.round_diagnostics(trained, starts_again, weights, metrics, offsets))
    if fault_masks is not None:
      round_metrics.update(faults_lib.fault_metrics(fault_masks))
    return new_state, round_metrics

  # ---------------------------------------------------------------- the round's phases

  def _client_trainer(self, global_params: Tree, frozen: Tree, update_mask: Tree) -> Callable:
    """One client's training: (inputs (local, batches, offset, rank_mask, key, ...), steps_done
    or None) -> (trained, metrics, start), from its start (`client_start`)."""

    def train(inputs, steps_done=None):
      client_local, client_batches, offset, rank_mask, key = inputs[:5]
      start = self.client_start(global_params, client_local, offset, rank_mask)
      trained, metrics = self.client_update(
        start,
        frozen,
        client_batches,
        jax.random.wrap_key_data(key),
        rank_update_mask(update_mask, rank_mask),
        *(() if steps_done is None else (steps_done,)),
      )
      return trained, metrics, start

    return train

  def _heldout_loss(
    self,
    trained: Tree,
    local_mask: Tree,
    heldout: Tree,
    offsets: Any,
    masks: jax.Array,
    keys: jax.Array,
    frozen: Tree,
    weights: jax.Array,
    *,
    train_steps: int,
  ) -> Callable[[Tree], jax.Array]:
    """The meta-objective of an aggregator with held-out steps: candidate global params ->
    Σ_k p_k loss of client k's next-round start from them on its held-out steps (step j's key
    folds in S + j, after the S training steps' keys)."""
    heldout_steps = self.aggregator.capabilities.heldout_steps
    trained_local = params_lib.select(trained, local_mask)

    def heldout_loss(candidate):
      def one_heldout(inputs):
        client_local, client_batches, offset, rank_mask, key = inputs
        start = self.client_start(candidate, client_local, offset, rank_mask)
        key = jax.random.wrap_key_data(key)
        losses = [
          self.client_update.loss_fn(
            start, frozen, jax.tree.map(lambda x: x[j], client_batches), jax.random.fold_in(key, train_steps + j)
          )[0]
          for j in range(heldout_steps)
        ]
        return sum(losses) / heldout_steps

      losses = primitives.map_clients(
        one_heldout,
        (trained_local, heldout, offsets, masks, keys),
        self.clients_per_chunk,
        self.mesh,
        self._chunk_loader(),
      )
      return jnp.sum(weights * losses)

    return heldout_loss

  def _aggregate_if_sound(
    self, state: ServerState, trained: Tree, weights: jax.Array, context: AggregationContext, participants: jax.Array
  ) -> tuple[Tree, Tree, Tree, jax.Array]:
    """(aggregate, base-delta increment, aggregator state, ok): the aggregator's output, or the
    previous global params, a zero increment and the previous state where it is non-finite or
    beyond `max_server_value` (its declared metrics are this round's either way)."""
    metric_names = self.aggregator.capabilities.metrics
    global_params = state.global_params
    aggregated, increment, agg_state = self.aggregator.aggregate(state.agg, global_params, trained, weights, context)
    ok = primitives.is_sound(aggregated, self.max_server_value) & primitives.is_finite(
      (increment, states.without(agg_state, metric_names))
    )
    use = participants & ok
    aggregated = primitives.keep_if(use, aggregated, global_params)
    increment = jax.tree.map(lambda inc: jnp.where(use, inc, 0.0), increment)
    agg_state = states.with_entries(
      primitives.keep_if(ok, states.without(agg_state, metric_names), states.without(state.agg, metric_names)),
      agg_state,
      metric_names,
    )  # This round's metrics, even if rejected.
    return aggregated, increment, agg_state, ok

  def _server_step_if_sound(self, state: ServerState, aggregated: Tree) -> tuple[Tree, Tree, jax.Array]:
    """(new global params, server optimizer state, ok): FedOpt's step on the pseudo-gradient
    global − aggregate, or the previous ones where it is non-finite or too large."""
    global_params = state.global_params
    pseudo_gradient = jax.tree.map(lambda g, a: g - a, global_params, aggregated)
    updates, server_opt = self.server_optimizer.update(pseudo_gradient, state.server_opt, global_params)
    new_global = optax.apply_updates(global_params, updates)
    ok = primitives.is_sound(new_global, self.max_server_value) & primitives.is_finite(server_opt)
    new_global, server_opt = primitives.keep_if(ok, (new_global, server_opt), (global_params, state.server_opt))
    return new_global, server_opt, ok

  def _plugins_if_finite(self, state: ServerState, outcome: RoundOutcome) -> tuple[dict, jax.Array]:
    """({name: new state}, int32 count rejected): each plug-in's post-aggregation hook, its
    previous state kept where the new one is non-finite."""
    plugin_states, rejected = {}, jnp.zeros((), jnp.int32)
    for plugin in self.plugins:
      old, new = state.plugins[plugin.name], plugin.after_aggregation(state.plugins[plugin.name], outcome)
      ok = primitives.is_finite(new)
      plugin_states[plugin.name] = primitives.keep_if(ok, new, old)
      rejected += (~ok).astype(jnp.int32)
    return plugin_states, rejected

  # ---------------------------------------------------------------- contracts

  def check_signatures(self, signatures: Any) -> None:
    """`init`'s signatures against the round: [N, D] with N = num_clients and D the width each
    plug-in declares (no signatures: D = 0). Raises ValueError in those terms.

    Args:
      signatures: [N, D] or None.
    Raises:
      ValueError: another shape, or signatures a plug-in needs are missing.
    """
    shape = (self.num_clients, 0) if signatures is None else tuple(jnp.shape(signatures))
    if len(shape) != 2 or shape[0] != self.num_clients:
      raise ValueError(
        f"FederatedRound.init: signatures must be [N, D] with N = num_clients = "
        f"{self.num_clients} (one row per registered client), got shape {shape}"
      )
    for plugin in self.plugins:
      if plugin.signature_dim is not None and plugin.signature_dim != shape[1]:
        raise ValueError(
          f"FederatedRound.init: plug-in {plugin.name!r} reads signatures of width "
          f"{plugin.signature_dim} (make_generator(signature_dim=...)), but the signatures "
          f"given are [N, D] = {list(shape)}"
        )

  def check_ranks(self, params: Tree) -> None:
    """Every LoRA layer of `params` has a rank >= 1, and `client_ranks` are in [1, r_max]
    (Raises ValueError naming the layer or the ranks).

    Args:
      params: the trainable tree.
    Raises:
      ValueError: naming the layer or the ranks.
    """
    found = lora_lib.layers(params)
    for name, layer in found.items():
      lora_lib.check_rank(int(jnp.shape(layer["a"])[-1]), f"FederatedRound.init: the rank of LoRA layer {name!r}")
    if self.client_ranks is not None and found:
      max_rank, ranks = lora_lib.rank_of(params), np.asarray(self.client_ranks)
      if ranks.shape != (self.num_clients,) or np.any(ranks < 1) or np.any(ranks > max_rank):
        raise ValueError(
          f"FederatedRound: client_ranks must be [num_clients] = [{self.num_clients}] ranks in "
          f"[1, r_max = {max_rank}] (the adapter's rank), got {ranks.tolist()}"
        )

  def check_step_inputs(self, batches: Tree, client_ids: Any, weights: Any) -> None:
    """`step`'s inputs against its contract, from their shapes (so at trace time, under jit),
    and the ids' values where they are concrete. Raises ValueError saying what was expected.

    Args:
      batches: pytree of [C, S (+ heldout_steps), B, ...] arrays.
      client_ids: [C] ints.
      weights: [C] floats.
    Raises:
      ValueError: naming the argument, its shape and the expected one.
    """
    client_ids, weights = jnp.asarray(client_ids), jnp.asarray(weights)
    if client_ids.ndim != 1:
      raise ValueError(
        f"FederatedRound.step: client_ids must be [C] (one id per sampled client), got shape {tuple(client_ids.shape)}"
      )
    num = client_ids.shape[0]
    if weights.shape != (num,):
      raise ValueError(
        f"FederatedRound.step: weights must be [C] = [{num}] like client_ids, got shape {tuple(weights.shape)}"
      )
    leaves = jax.tree_util.tree_leaves_with_path(batches)
    if not leaves:
      raise ValueError("FederatedRound.step: batches has no arrays")
    heldout = self.aggregator.capabilities.heldout_steps
    layout = (
      f"batches' leaves are [C, S + h, B, ...]: C = {num} sampled clients (client_ids), S local "
      f"steps, h = {heldout} held-out steps of aggregator {self.aggregator.capabilities.name!r}, "
      f"B examples a step"
    )
    for path, leaf in leaves:
      shape = tuple(jnp.shape(leaf))
      if len(shape) < 3 or shape[0] != num:
        hint = " (did you leave out the steps axis?)" if len(shape) == 2 and shape[0] == num else ""
        raise ValueError(f"FederatedRound.step: batches{jax.tree_util.keystr(path)} has shape {shape}; {layout}{hint}")
    steps = {tuple(jnp.shape(leaf))[1] for _, leaf in leaves}
    batch_sizes = {tuple(jnp.shape(leaf))[2] for _, leaf in leaves}
    if len(steps) > 1 or len(batch_sizes) > 1:
      shapes = {jax.tree_util.keystr(path): tuple(jnp.shape(leaf)) for path, leaf in leaves}
      raise ValueError(f"FederatedRound.step: batches' leaves disagree on the steps or batch axis {shapes}; {layout}")
    (total_steps,) = steps
    expected = getattr(self.client_update, "steps", None)
    if expected is not None and total_steps != expected + heldout:
      raise ValueError(
        f"FederatedRound.step: batches have {total_steps} steps, expected S + h = {expected} + "
        f"{heldout} (local_update(steps={expected}) and the held-out steps of aggregator "
        f"{self.aggregator.capabilities.name!r})"
      )
    if total_steps <= heldout:
      raise ValueError(
        f"FederatedRound.step: batches have {total_steps} steps but aggregator "
        f"{self.aggregator.capabilities.name!r} holds out the last {heldout}: give S + {heldout} "
        f"steps (S >= 1 local steps, then the held-out ones)"
      )
    if _concrete(client_ids):
      ids = np.asarray(client_ids)
      bad = sorted(set(ids[(ids >= self.num_clients) | (ids < NEW_CLIENT)].tolist()))
      if bad:
        raise ValueError(
          f"FederatedRound.step: client ids {bad} are outside [0, num_clients={self.num_clients}) "
          f"(-1 marks a padding client)"
        )
      real, counts = np.unique(ids[ids >= 0], return_counts=True)
      if np.any(counts > 1):
        raise ValueError(
          f"FederatedRound.step: client ids {real[counts > 1].tolist()} are sampled more than once; "
          f"a client trains at most once a round (its local leaves and state are one row)"
        )
    if _concrete(weights):
      values = np.asarray(weights, np.float64)
      wrong = ~np.isfinite(values) | (values < 0)
      if np.any(wrong):
        raise ValueError(
          f"FederatedRound.step: weights must be finite and >= 0 (relative aggregation weights, 0 "
          f"for padding); entries {np.flatnonzero(wrong).tolist()} are {values[wrong].tolist()}"
        )
      if not np.any(values > 0):
        raise ValueError(
          "FederatedRound.step: weights are all zero, so no client's update can be aggregated; "
          "give each sampled client a positive weight (e.g. its example count)"
        )


def _concrete(x: Any) -> bool:
  """Whether `x`'s values can be read here: not traced, and all on this process."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def repeated_ids(client_ids: jax.Array) -> jax.Array:
  """[C] bool: True where the id already occurred earlier in `client_ids` [C] (later copies).

  Args:
    client_ids: [C] ints.
  Returns:
    [C] bool (the first copy of each id is False).
  """
  same = client_ids[:, None] == client_ids[None, :]
  earlier = jnp.tril(jnp.ones(same.shape, bool), k=-1)
  return jnp.any(same & earlier, axis=1)


def split_heldout(batches: Tree, heldout_steps: int) -> tuple[Tree, Tree | None]:
  """([C, S, ...] training steps, [C, h, ...] held-out steps or None) of [C, S + h, ...] batches.

  Args:
    batches: pytree of [C, S + h, ...] arrays.
    heldout_steps: h (0: none).
  Returns:
    (training steps [C, S, ...], held-out steps [C, h, ...] or None).
  """
  if not heldout_steps:
    return batches, None
  return (
    jax.tree.map(lambda x: x[:, :-heldout_steps], batches),
    jax.tree.map(lambda x: x[:, -heldout_steps:], batches),
  )


def leave_out_nonfinite(train_client: Callable) -> Callable:
  """`train_client` (inputs -> (trained, metrics, start)) guarded: a client whose trained params
  or loss are non-finite returns its start instead. -> (trained, metrics, finite, start).

  Args:
    train_client: one client's (inputs -> (trained, metrics, start)).
  Returns:
    The guarded function: inputs -> (trained or start, metrics, finite scalar bool, start).
  """

  def guarded(inputs):
    trained, metrics, start = train_client(inputs)
    finite = primitives.is_finite(trained) & jnp.isfinite(metrics["loss"])
    trained = jax.tree.map(lambda t, s: jnp.where(finite, t, s), trained, start)
    return trained, metrics, finite, start

  return guarded


def train_loss_metrics(metrics: dict, received: jax.Array) -> dict:
  """{"train_loss"}: the example-weighted mean local loss of the clients whose update reached
  the server (non-finite clients' losses left out); NaN when none saw an example (not 0).

  Args:
    metrics: the clients' metrics, "loss" and "examples" [C].
    received: [C] bool, whose update reached the server.
  Returns:
    {"train_loss": scalar}.
  """
  example_weights = metrics["examples"] * received
  client_losses = jnp.where(received, metrics["loss"], 0.0)
  seen = jnp.sum(example_weights)
  return {"train_loss": jnp.where(seen > 0, jnp.sum(client_losses * example_weights) / jnp.maximum(seen, 1.0), jnp.nan)}


def state_shardings(state: ServerState, mesh: Mesh) -> ServerState:
  """Shardings for a `FederatedRound` state on `mesh`: the per-client store (`clients`,
  `signatures`, [N', ...] leaves) split over the `clients` axis, everything else replicated.
  Use with `jax.device_put(state, state_shardings(state, mesh))`.

  Args:
    state: a `ServerState` (arrays or ShapeDtypeStructs).
    mesh: the run's mesh.
  Returns:
    A `ServerState` of `NamedSharding`s.
  """
  replicated, per_client = NamedSharding(mesh, P()), primitives.clients_sharding(mesh)
  return state.replace(
    **{
      field.name: jax.tree.map(
        lambda _, k=field.name: per_client if k in ("clients", "signatures") else replicated, getattr(state, field.name)
      )
      for field in dataclasses.fields(state)
    }
  )


def capability_problems(
  aggregator: Aggregator, server_optimizer: optax.GradientTransformation, client_ranks: Any
) -> list[tuple[str, str]]:
  """What in (server optimizer, client ranks) the aggregator's capabilities refuse, as
  (argument, message) pairs ([] = it fits).

  Args:
    aggregator: the method's aggregator.
    server_optimizer: the server's optax optimizer.
    client_ranks: [N] ints, or None.
  Returns:
    [(argument, message)], empty when the combination is sound.
  """
  caps, problems = aggregator.capabilities, []
  if caps.plain_server_step and not is_plain_step(server_optimizer):
    problems.append(
      (
        "server_optimizer",
        f"aggregator {caps.name!r} is exact only with a plain server step (sgd, learning rate 1, no momentum)",
      )
    )
  distinct = sorted(set(np.asarray(client_ranks).tolist())) if client_ranks is not None else []
  if len(distinct) > 1 and not caps.heterogeneous_ranks:
    problems.append(
      ("client_ranks", f"aggregator {caps.name!r} does not define aggregation for heterogeneous ranks {distinct}")
    )
  return problems


def communication_bytes(
  fed_round: FederatedRound, params: Tree, round_index: int, participant_ranks: Sequence[int], signature_bytes: int = 0
) -> tuple[int, int]:
  """(bytes up, bytes down) of one round, summed over its participants.

  Each participant sends up, and receives down, every leaf that is shared and trained this
  round (frozen leaves are known to both sides: FFA-LoRA's A, RoLoRA's idle factor; generated
  factors count like shared ones); a client of rank r_k sends r_k of the r_max components of
  the LoRA layers. Down adds what the aggregator sends besides (FedEx-LoRA's residual, FLoRA's
  stacks) and up what it asks besides. With held-out steps (a meta-learned aggregator) each
  participant also receives the candidate global leaves and returns their gradient.
  `signature_bytes` (signatures sent once) are added to bytes up.

  Args:
    fed_round: the round.
    params: the trainable tree (shapes only).
    round_index: which round (frozen leaves may alternate).
    participant_ranks: each participant's rank.
    signature_bytes: bytes of signatures sent up this round.
  Returns:
    (bytes up, bytes down), ints.
  """
  caps = fed_round.aggregator.capabilities
  ranks = [int(r) for r in participant_ranks]
  max_rank = lora_lib.rank_of(params)
  local = params_lib.regex_mask(params, fed_round.local_leaves)
  frozen = params_lib.regex_mask(params, fed_round.frozen_leaves[round_index % len(fed_round.frozen_leaves)])
  sent = jax.tree.map(lambda l, f: not l and not f, local, frozen)
  in_layer = lora_lib.map_layers(lambda f: {"a": True, "b": True}, jax.tree.map(lambda _: False, params))
  layer_bytes = params_lib.num_bytes(params, jax.tree.map(lambda s, l: s and l, sent, in_layer))
  other_bytes = params_lib.num_bytes(params, jax.tree.map(lambda s, l: s and not l, sent, in_layer))
  up = sum(other_bytes + layer_bytes * r // max_rank for r in ranks)
  shapes = layer_shapes(params)
  down = up + caps.extra_bytes_down(shapes, ranks)
  up += caps.extra_bytes_up(shapes, ranks)
  if caps.heldout_steps:
    meta = len(ranks) * (other_bytes + layer_bytes)
    up, down = up + meta, down + meta
  return up + signature_bytes, down
