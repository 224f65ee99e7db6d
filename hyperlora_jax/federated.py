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

Server state (a pytree, checkpointed whole):
  round       int32 scalar, rounds done
  rng         uint32 [2], the server's PRNG key data
  global      the global params (any nested-dict tree holding LoRA layers)
  server_opt  optax state of the server optimizer over `global`
  clients     {leaf name: [N', ...]} the leaves each client keeps locally
  agg         the aggregator's state
  base_delta  {layer: [d_in, d_out]} full-rank residuals merged into frozen weights ({} if unused)
  plugins     {plug-in name: its state}
  signatures  [N', D] per-client signatures (only when D > 0)

The per-client store has N' = `store_rows` rows: N rounded up to a multiple of the mesh's
devices (rows past N are never read), so that `state_shardings` can shard it over the
`clients` mesh axis: each device then holds the state of N'/D clients, not of all N.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence

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
from hyperlora_jax.aggregators.base import AggregationContext, Aggregator, layer_shapes
from hyperlora_jax.client import ClientUpdate

Tree = Any
NEW_CLIENT = -1  # Client id of a client with no learned state (the global model, new clients).
FAULT_STREAM = 1 << 30  # fold_in index of the round key that draws injected faults.


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
    name: key of its state in `state["plugins"]`.
    init: rng -> state.
    client_offsets: (state, signatures [C, D], client_ids [C]) -> offsets {layer: {"a", "b"}}
      with a leading [C] axis, added to each client's starting LoRA layers (client id
      `NEW_CLIENT`: a client with no learned state).
    after_aggregation: (state, RoundOutcome) -> state.
  """
  name: str
  init: Callable[[jax.Array], Tree]
  client_offsets: Callable[[Tree, jax.Array, jax.Array], dict]
  after_aggregation: Callable[[Tree, RoundOutcome], Tree]


def is_plain_step(optimizer: optax.GradientTransformation) -> bool:
  """Whether `optimizer` applies an update as is (u = -g, every step): SGD, lr 1, no momentum."""
  params = {"x": jnp.arange(3.0)}
  state = optimizer.init(params)
  for g in (jnp.array([1.0, -2.0, 0.5]), jnp.array([-3.0, 0.25, 2.0])):
    updates, state = optimizer.update({"x": g}, state, params)
    if not np.allclose(np.asarray(updates["x"]), -np.asarray(g), rtol=0, atol=1e-7):
      return False
  return True


def round_update_mask(frozen_leaves: Sequence[str], params: Tree, round_index: jax.Array) -> Tree:
  """Float scalar per leaf: 0 where `frozen_leaves[round % len]` (a regex on leaf names)
  freezes it this round, else 1."""
  phases = [params_lib.regex_mask(params, r) for r in frozen_leaves]
  phase = round_index % len(phases)
  return jax.tree.map(lambda *frozen: jnp.array([0.0 if f else 1.0 for f in frozen], jnp.float32)[phase],
                      *phases)


def rank_update_mask(update_mask: Tree, rank_mask: jax.Array) -> Tree:
  """The round's per-leaf update mask times the client's rank mask on the LoRA layers."""
  return lora_lib.map_layers(lambda m: {"a": m["a"] * rank_mask[None, :], "b": m["b"] * rank_mask[:, None]},
                             update_mask)


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
      raise ValueError(f"aggregator {caps.name!r} merges a full-rank base delta into the frozen "
                       f"weights: give FederatedRound(apply_base_delta=...)")
    try:
      re.compile(self.local_leaves)
      [re.compile(r) for r in self.frozen_leaves]
    except re.error as e:
      raise ValueError(f"local_leaves / frozen_leaves: not a valid regex ({e})") from None

  # ---------------------------------------------------------------- state

  @property
  def store_rows(self) -> int:
    """N': rows of the per-client store, N rounded up to a multiple of the mesh's devices."""
    devices = self.mesh.size if self.mesh is not None else 1
    return -(-self.num_clients // devices) * devices

  def init(self, rng: jax.Array, params: Tree, signatures: jax.Array | None = None) -> dict:
    """The round-0 server state; every client's local leaves start from `params`.

    Args:
      params: the initial global params (with LoRA layers).
      signatures: [N, D] per-client signatures (None or D = 0: none).
    """
    local_mask = params_lib.regex_mask(params, self.local_leaves)
    clients = params_lib.select(primitives.broadcast(params, self.store_rows), local_mask)
    key = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
    signature_dim = 0 if signatures is None else signatures.shape[-1]
    state = {
        "round": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(key),
        "global": jax.tree.map(jnp.array, params),  # A copy: donating the state keeps `params`.
        "server_opt": self.server_optimizer.init(params),
        "clients": jax.tree.map(jnp.asarray, clients),
        "agg": self.aggregator.init(params, jax.random.fold_in(key, 8), signature_dim),
        "base_delta": lora_lib.zero_deltas(params) if self.aggregator.capabilities.base_delta else {},
        "plugins": {p.name: p.init(jax.random.fold_in(key, 7)) for p in self.plugins},
    }
    if signature_dim:
      padding = ((0, self.store_rows - self.num_clients), (0, 0))
      state["signatures"] = jnp.pad(jnp.asarray(signatures, jnp.float32), padding)
    return state

  # ---------------------------------------------------------------- client starts

  def signatures_of(self, state: dict, client_ids: jax.Array) -> jax.Array:
    """[C, D] signatures of `client_ids` ([C, 0] when the run has none)."""
    if "signatures" not in state:
      return jnp.zeros((client_ids.shape[0], 0), jnp.float32)
    return state["signatures"][client_ids]

  def rank_masks(self, params: Tree) -> jax.Array:
    """[N, r_max] {0, 1} rank mask of every registered client."""
    return lora_lib.rank_masks(self.client_ranks, self.num_clients, lora_lib.rank_of(params))

  def offsets(self, state: dict, signatures: jax.Array, client_ids: jax.Array) -> dict | None:
    """The plug-ins' summed client-start offsets {layer: {"a", "b"}} [C, ...] (None: no plug-in)."""
    total = None
    for plugin in self.plugins:
      offset = plugin.client_offsets(state["plugins"][plugin.name], signatures, client_ids)
      total = offset if total is None else jax.tree.map(jnp.add, total, offset)
    return total

  @staticmethod
  def client_start(global_params: Tree, client_local: dict, offset: dict | None,
                   rank_mask: jax.Array) -> Tree:
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

  def client_inputs(self, state: dict, client_ids: jax.Array) -> tuple[dict, jax.Array, dict | None, jax.Array]:
    """(local leaves [C, ...], signatures [C, D], offsets [C, ...] or None, rank masks [C, r])
    for `client_ids` (valid ids in [0, N)); with `client_start` they give each client's model."""
    local = primitives.gather_clients(state["clients"], client_ids)
    signatures = self.signatures_of(state, client_ids)
    offsets = self.offsets(state, signatures, client_ids) if self.plugins else None
    return local, signatures, offsets, self.rank_masks(state["global"])[client_ids]

  def global_params(self, state: dict) -> Tree:
    """The model evaluated as *global*: the server's params plus the plug-ins' offsets for a
    client with no learned state and the mean signature (generator methods)."""
    if not self.plugins:
      return state["global"]
    if "signatures" in state:
      signature = jnp.mean(state["signatures"][:self.num_clients], axis=0, keepdims=True)
    else:
      signature = jnp.zeros((1, 0), jnp.float32)
    offset = jax.tree.map(lambda x: x[0], self.offsets(state, signature, jnp.full((1,), NEW_CLIENT, jnp.int32)))
    return lora_lib.add_to_layers(state["global"], offset)

  def _chunk_loader(self) -> Callable | None:
    """`map_clients`' load_chunk for the round's (local, batches, ...) inputs: `load_batches`
    on the batches (second entry) only."""
    if self.load_batches is None:
      return None
    return lambda inputs: (inputs[0], self.load_batches(inputs[1]), *inputs[2:])

  # ---------------------------------------------------------------- the round

  def step(self, state: dict, frozen: Tree, batches: Tree, client_ids: jax.Array,
           weights: jax.Array) -> tuple[dict, dict]:
    """One round (pure; jit it).

    Args:
      state: server state (module docstring).
      frozen: the frozen tree the loss reads (e.g. the backbone's variables).
      batches: pytree with leaves [C, S + h, ...]: each sampled client's S local steps, plus
        the aggregator's h = `capabilities.heldout_steps` held-out steps at the end (light
        batches with `load_batches`).
      client_ids: [C] int32 sampled client ids, -1 for padding clients.
      weights: [C] float32 aggregation weights p_k (0 for padding).
    Returns:
      (new state, {"train_loss", "nonfinite_clients", "participants", "rejected_aggregate",
       "rejected_server_step", "rejected_plugins"} plus the aggregator's declared metrics and
       the round's diagnostics, `diagnostics.round_diagnostics`: aggregation bias per layer,
       client drift, first/last local-step loss, generator offset norm).
    """
    caps = self.aggregator.capabilities
    global_params = state["global"]
    local_mask = params_lib.regex_mask(global_params, self.local_leaves)
    update_mask = round_update_mask(self.frozen_leaves, global_params, state["round"])
    valid = client_ids >= 0
    gather_ids = jnp.where(valid, client_ids, 0)
    local, signatures, offsets, masks = self.client_inputs(state, gather_ids)
    frozen = self.apply_base_delta(frozen, state["base_delta"]) if caps.base_delta else frozen
    round_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["round"])
    keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(round_key, i)))(client_ids)
    if caps.heldout_steps:  # The aggregator's held-out steps, never trained on.
      heldout = jax.tree.map(lambda x: x[:, -caps.heldout_steps:], batches)
      batches = jax.tree.map(lambda x: x[:, :-caps.heldout_steps], batches)
    train_steps = jax.tree.leaves(batches)[0].shape[1]
    faulty = self.faults is not None and self.faults.active
    fault_inputs = ()
    if faulty:  # Injected faults (a simulation knob): drawn per round from the round's key.
      fault_masks = faults_lib.draw(self.faults, jax.random.fold_in(round_key, FAULT_STREAM), valid)
      fault_inputs = (faults_lib.steps_done(self.faults, fault_masks["straggler"], train_steps),
                      fault_masks["nonfinite"], fault_masks["byzantine"])

    def one_client(inputs):
      client_local, client_batches, offset, rank_mask, key, *fault = inputs
      start = self.client_start(global_params, client_local, offset, rank_mask)
      trained, metrics = self.client_update(start, frozen, client_batches, jax.random.wrap_key_data(key),
                                            rank_update_mask(update_mask, rank_mask),
                                            *(fault[:1] if fault else ()))
      if fault:  # What a faulty client sends instead of `trained`.
        one = lambda t: jax.tree.map(lambda x: x[None], t)
        flags = {"nonfinite": fault[1][None], "byzantine": fault[2][None]}
        trained = jax.tree.map(lambda x: x[0], faults_lib.corrupt(
            self.faults, one(trained), one(start), flags, jax.random.fold_in(jax.random.wrap_key_data(key), 1)))
      finite = primitives.is_finite(trained) & jnp.isfinite(metrics["loss"])
      trained = jax.tree.map(lambda t, s: jnp.where(finite, t, s), trained, start)
      return trained, metrics, finite, start

    trained, metrics, finite, starts = primitives.map_clients(
        one_client, (local, batches, offsets, masks, keys, *fault_inputs), self.clients_per_chunk, self.mesh,
        self._chunk_loader())
    if faulty:  # A dropped client trained, but its update never arrived.
      weights = jnp.where(fault_masks["dropout"], 0.0, weights)
    weights = jnp.where(valid & finite, weights, 0.0)
    total = jnp.sum(weights)
    weights = weights / jnp.maximum(total, 1e-12)

    heldout_loss = None
    if caps.heldout_steps:
      trained_local = params_lib.select(trained, local_mask)

      def heldout_loss(candidate):
        """Σ_k p_k loss of client k's next-round start from `candidate` on its held-out steps."""
        def one_heldout(inputs):
          client_local, client_batches, offset, rank_mask, key = inputs
          start = self.client_start(candidate, client_local, offset, rank_mask)
          key = jax.random.wrap_key_data(key)
          losses = [self.client_update.loss_fn(start, frozen, jax.tree.map(lambda x: x[j], client_batches),
                                               jax.random.fold_in(key, train_steps + j))[0]
                    for j in range(caps.heldout_steps)]
          return sum(losses) / caps.heldout_steps
        losses = primitives.map_clients(
            one_heldout, (trained_local, heldout, jax.lax.stop_gradient(offsets), masks, keys),
            self.clients_per_chunk, self.mesh, self._chunk_loader())
        return jnp.sum(weights * losses)

    context = AggregationContext(signatures=signatures, client_loss=metrics["loss"], heldout_loss=heldout_loss,
                                 client_starts=starts)
    aggregated, base_delta_increment, agg_state = self.aggregator.aggregate(
        state["agg"], global_params, trained, weights, context)
    # Server-side safety: each part (aggregate, server step, every plug-in) whose output is
    # non-finite or beyond `max_server_value` is rejected and keeps its previous state.
    # Nothing usable came back (every client non-finite): keep the global model, silently.
    participants = total > 0
    aggregate_ok = (primitives.is_sound(aggregated, self.max_server_value)
                    & primitives.is_finite((base_delta_increment, _without(agg_state, caps.metrics))))
    use_aggregate = participants & aggregate_ok
    aggregated = primitives.keep_if(use_aggregate, aggregated, global_params)
    base_delta_increment = jax.tree.map(lambda inc: jnp.where(use_aggregate, inc, 0.0), base_delta_increment)
    agg_state = _with_metrics(primitives.keep_if(aggregate_ok, _without(agg_state, caps.metrics),
                                                 _without(state["agg"], caps.metrics)),
                              agg_state, caps.metrics)  # This round's metrics, even if rejected.
    pseudo_gradient = jax.tree.map(lambda g, a: g - a, global_params, aggregated)
    updates, server_opt = self.server_optimizer.update(pseudo_gradient, state["server_opt"], global_params)
    new_global = optax.apply_updates(global_params, updates)
    step_ok = primitives.is_sound(new_global, self.max_server_value) & primitives.is_finite(server_opt)
    new_global, server_opt = primitives.keep_if(step_ok, (new_global, server_opt),
                                                (global_params, state["server_opt"]))
    # Local leaves are not the server's, and frozen leaves were not sent: both stay as they were.
    new_global = jax.tree.map(lambda n, g, m, u: g if m else jnp.where(u > 0, n, g),
                              new_global, global_params, local_mask, update_mask)
    outcome = RoundOutcome(new_global, trained, weights, gather_ids, signatures, masks, global_params, starts)
    plugin_states, plugins_rejected = {}, jnp.zeros((), jnp.int32)
    for plugin in self.plugins:
      old, new = state["plugins"][plugin.name], plugin.after_aggregation(state["plugins"][plugin.name], outcome)
      plugin_ok = primitives.is_finite(new)
      plugin_states[plugin.name] = primitives.keep_if(plugin_ok, new, old)
      plugins_rejected += (~plugin_ok).astype(jnp.int32)
    scatter_ids = jnp.where(valid, client_ids, self.store_rows)  # Out of range: dropped.
    clients = primitives.scatter_clients(state["clients"], scatter_ids, params_lib.select(trained, local_mask))
    clients = primitives.constrain_clients(clients, self.mesh)  # The store stays sharded.
    base_delta = (jax.tree.map(lambda d, inc: d + jnp.where(total > 0, inc, 0.0),
                               state["base_delta"], base_delta_increment)
                  if base_delta_increment else state["base_delta"])
    rng, _ = jax.random.split(state["rng"])
    new_state = {"round": state["round"] + 1, "rng": rng, "global": new_global,
                 "server_opt": server_opt, "clients": clients, "agg": agg_state,
                 "base_delta": base_delta, "plugins": plugin_states}
    if "signatures" in state:
      new_state["signatures"] = state["signatures"]
    received = weights > 0  # Valid, finite and not dropped: what reached the server.
    example_weights = metrics["examples"] * received  # Non-finite clients' losses left out.
    client_losses = jnp.where(received, metrics["loss"], 0.0)
    seen = jnp.sum(example_weights)
    train_loss = jnp.where(seen > 0, jnp.sum(client_losses * example_weights) / jnp.maximum(seen, 1.0),
                           jnp.nan)  # No finite client saw an example: no loss to report, not 0.
    round_metrics = {"train_loss": train_loss, "nonfinite_clients": jnp.sum(valid & ~finite),
                     "participants": jnp.sum(received),
                     "rejected_aggregate": (participants & ~aggregate_ok).astype(jnp.int32),
                     "rejected_server_step": (~step_ok).astype(jnp.int32),
                     "rejected_plugins": plugins_rejected}
    round_metrics.update({name: agg_state[name] for name in caps.metrics})
    # The starts again, from the round's inputs rather than the mapped output: the diagnostics'
    # weighted sums then fuse with them, and methods that never read `starts` never store them.
    starts_again = jax.vmap(lambda *inputs: self.client_start(global_params, *inputs))(local, offsets, masks)
    round_metrics.update(diagnostics_lib.round_diagnostics(trained, starts_again, weights, metrics, offsets))
    if faulty:
      round_metrics.update(faults_lib.fault_metrics(fault_masks))
    return new_state, round_metrics


def _without(tree: Tree, keys: Sequence[str]) -> Tree:
  """An aggregator state without its metric entries `keys` (a dict when there are any)."""
  return {k: v for k, v in tree.items() if k not in keys} if keys else tree


def _with_metrics(tree: Tree, source: Tree, keys: Sequence[str]) -> Tree:
  """`tree` with the metric entries `keys` of `source` put back."""
  return {**tree, **{k: source[k] for k in keys}} if keys else tree


def state_shardings(state: dict, mesh: Mesh) -> dict:
  """Shardings for a `FederatedRound` state on `mesh`: the per-client store (`clients`,
  `signatures`, [N', ...] leaves) split over the `clients` axis, everything else replicated.
  Use with `jax.device_put(state, state_shardings(state, mesh))`."""
  replicated, per_client = NamedSharding(mesh, P()), primitives.clients_sharding(mesh)
  return {key: jax.tree.map(lambda _, k=key: per_client if k in ("clients", "signatures") else replicated, value)
          for key, value in state.items()}


def capability_problems(aggregator: Aggregator, server_optimizer: optax.GradientTransformation,
                        client_ranks: Any) -> list[tuple[str, str]]:
  """What in (server optimizer, client ranks) the aggregator's capabilities refuse, as
  (argument, message) pairs ([] = it fits)."""
  caps, problems = aggregator.capabilities, []
  if caps.plain_server_step and not is_plain_step(server_optimizer):
    problems.append(("server_optimizer", f"aggregator {caps.name!r} is exact only with a plain server "
                                         f"step (sgd, learning rate 1, no momentum)"))
  distinct = sorted(set(np.asarray(client_ranks).tolist())) if client_ranks is not None else []
  if len(distinct) > 1 and not caps.heterogeneous_ranks:
    problems.append(("client_ranks", f"aggregator {caps.name!r} does not define aggregation for "
                                     f"heterogeneous ranks {distinct}"))
  return problems


def communication_bytes(fed_round: FederatedRound, params: Tree, round_index: int,
                        participant_ranks: Sequence[int], signature_bytes: int = 0) -> tuple[int, int]:
  """(bytes up, bytes down) of one round, summed over its participants.

  Each participant sends up, and receives down, every leaf that is shared and trained this
  round (frozen leaves are known to both sides: FFA-LoRA's A, RoLoRA's idle factor; generated
  factors count like shared ones); a client of rank r_k sends r_k of the r_max components of
  the LoRA layers. Down adds what the aggregator sends besides (FedEx-LoRA's residual, FLoRA's
  stacks) and up what it asks besides. With held-out steps (a meta-learned aggregator) each
  participant also receives the candidate global leaves and returns their gradient.
  `signature_bytes` (signatures sent once) are added to bytes up.
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
