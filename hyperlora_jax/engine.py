"""The jit-compiled federated round and evaluation, vmapped and sharded over clients.

One pure function, `round_step`, does a whole round for every sampled client:
gather the clients' persistent local leaves, vmap `client.local_update` (a `lax.scan`
over local steps) over the clients axis, processed `clients_per_chunk` at a time
(`lax.map` over chunks, vmap inside) with the clients axis sharded over a `Mesh` axis
named `clients`, then aggregate, apply the server optimizer and scatter local leaves back.
The backbone is an argument closed over by the vmapped function: one copy for all clients.
Block shapes are fixed, so the round compiles once for a whole run.

Server state (a pytree, checkpointed whole):
  round       int32 scalar, rounds done
  rng         uint32 [2], the server's PRNG key
  global      trainable pytree {"lora": ..., "head": ...}
  server_opt  optax state of the server optimizer (FedOpt) over `global`
  clients     {leaf name: [num_clients, ...]} the leaves each client keeps locally
  agg         the aggregator's state
  base_delta  {path: [d_in, d_out]} full-rank residuals merged into frozen weights ({} if unused)
  gen         the generator's state ({"params", "opt"}; {} without a generator)
  signatures  [num_clients, D] client distribution signatures (only when D > 0)

Per-client starts. Client k starts a round from its local leaves combined with `global`,
plus the generator's offset `G_φ(c_k)` where the method has one, truncated to the client's
rank r_k (heterogeneous ranks: factors are stored at r_max and components beyond r_k are
zero and never updated).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hyperlora_jax import client as client_lib
from hyperlora_jax import params as params_lib
from hyperlora_jax.generator import NEW_CLIENT, Generator, truncate_lora
from hyperlora_jax.methods import Method

CLIENTS_AXIS = "clients"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0: all), axis named `clients`."""
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if num_devices > len(devices):
    raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices exist")
  return Mesh(np.array(devices[:num_devices]), (CLIENTS_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def clients_sharding(mesh: Mesh) -> NamedSharding:
  """Shards a leading clients axis over every device of the mesh."""
  return NamedSharding(mesh, P(CLIENTS_AXIS))


def _constrain_clients(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
  if mesh is None or mesh.size == 1:
    return tree
  spec = P(*([None] * axis + [CLIENTS_AXIS]))
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, spec))


def map_clients(fn: Callable, xs: Any, clients_per_chunk: int, mesh: Mesh | None) -> Any:
  """vmap `fn` over the leading clients axis of `xs`, `clients_per_chunk` clients at a time.

  Client c = j * num_chunks + i is computed in chunk i at position j, so with the clients
  axis sharded contiguously over D devices (and D dividing clients_per_chunk) every device
  works on its own clients in every chunk, with no data movement.

  Args:
    fn: per-client function on one client's slice of `xs`.
    xs: pytree of [C, ...] arrays.
    clients_per_chunk: clients vmapped together (0 or >= C: all at once); must divide C.
  Returns:
    pytree of [C, ...] outputs.
  """
  num = jax.tree.leaves(xs)[0].shape[0]
  vmapped = lambda chunk: _constrain_clients(jax.vmap(fn)(_constrain_clients(chunk, mesh)), mesh)
  if not clients_per_chunk or clients_per_chunk >= num:
    return vmapped(xs)
  if num % clients_per_chunk:
    raise ValueError(f"fed.clients_per_chunk={clients_per_chunk} must divide the padded cohort "
                     f"of {num} clients")
  num_chunks = num // clients_per_chunk
  to_chunks = lambda x: x.reshape((clients_per_chunk, num_chunks) + x.shape[1:]).swapaxes(0, 1)
  from_chunks = lambda y: y.swapaxes(0, 1).reshape((num,) + y.shape[2:])
  ys = jax.lax.map(vmapped, jax.tree.map(to_chunks, xs))
  return jax.tree.map(from_chunks, ys)


def init_server_state(rng: jax.Array, method: Method, global_trainable: Any, num_clients: int,
                      server_optimizer: optax.GradientTransformation,
                      targets: dict[str, tuple[int, int]], generator: Generator | None = None,
                      signatures: jax.Array | None = None) -> dict:
  """The round-0 server state (see module docstring). Every client's local leaves start
  from `global_trainable`.

  Args:
    signatures: [num_clients, D] client signatures (None or D = 0: none).
  """
  local_mask = params_lib.regex_mask(global_trainable, method.local_regex)
  clients = params_lib.select(params_lib.broadcast_clients(global_trainable, num_clients), local_mask)
  base_delta = ({path: jnp.zeros(shape, jnp.float32) for path, shape in targets.items()}
                if method.uses_base_delta else {})
  rng = rng if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.key_data(rng)
  state = {
      "round": jnp.zeros((), jnp.int32),
      "rng": rng,
      "global": global_trainable,
      "server_opt": server_optimizer.init(global_trainable),
      "clients": jax.tree.map(jnp.asarray, clients),
      "agg": (method.aggregator.init(jax.random.fold_in(jax.random.wrap_key_data(rng), 8), global_trainable,
                                     0 if signatures is None else signatures.shape[-1])
              if method.meta_objective else method.aggregator.init(global_trainable)),
      "base_delta": base_delta,
      "gen": generator.init(jax.random.fold_in(jax.random.wrap_key_data(rng), 7)) if generator else {},
  }
  if signatures is not None and signatures.shape[-1]:
    state["signatures"] = jnp.asarray(signatures, jnp.float32)
  return state


def client_signatures(state: dict, client_ids: jax.Array) -> jax.Array:
  """[C, D] signatures of `client_ids` ([C, 0] when the run has none)."""
  if "signatures" not in state:
    return jnp.zeros((client_ids.shape[0], 0), jnp.float32)
  return state["signatures"][client_ids]


def rank_masks(client_ranks: np.ndarray | None, num_clients: int, max_rank: int) -> jax.Array:
  """[num_clients, r_max] float {0, 1}: 1 for the components a client's rank r_k has."""
  ranks = np.full(num_clients, max_rank) if client_ranks is None else np.asarray(client_ranks)
  return jnp.asarray(np.arange(max_rank)[None, :] < ranks[:, None], jnp.float32)


def _lora_rank(trainable: Any) -> int:
  return next(iter(trainable["lora"].values()))["a"].shape[-1]


def client_start(global_trainable: Any, client_local: dict, offset: Any, rank_mask: jax.Array) -> Any:
  """One client's starting trainable: global ⊕ its local leaves, + generator offset, truncated.

  Args:
    client_local: {leaf name: leaf} the client keeps.
    offset: lora tree added to the factors (None: no generator).
    rank_mask: [r_max] float {0, 1}.
  """
  start = params_lib.combine(global_trainable, client_local)
  lora = start["lora"]
  if offset is not None:
    lora = jax.tree.map(jnp.add, lora, offset)
  return {**start, "lora": truncate_lora(lora, rank_mask)}


def _rank_update_mask(update_mask: Any, rank_mask: jax.Array) -> Any:
  """The round's per-leaf update mask times the client's rank mask on the LoRA factors."""
  lora = {path: {"a": m["a"] * rank_mask[None, :], "b": m["b"] * rank_mask[:, None]}
          for path, m in update_mask["lora"].items()}
  return {**update_mask, "lora": lora}


def round_update_mask(method: Method, trainable: Any, round_index: jax.Array) -> Any:
  """Float scalar per leaf: 0 where `method.frozen_regexes[round % len]` freezes it, else 1."""
  phases = [params_lib.regex_mask(trainable, r) for r in method.frozen_regexes]
  phase = round_index % len(phases)
  return jax.tree.map(lambda *frozen: jnp.array([0.0 if f else 1.0 for f in frozen], jnp.float32)[phase],
                      *phases)


def make_round_step(adapted: client_lib.AdaptedModel, method: Method,
                    client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation, *, num_clients: int,
                    clients_per_chunk: int = 0, mesh: Mesh | None = None,
                    generator: Generator | None = None,
                    client_ranks: np.ndarray | None = None) -> Callable:
  """Builds the pure `round_step(state, backbone, block, client_ids, weights)`.

  Args (of the builder):
    generator: the method's generator component (pFedHN, HyperLoRA), or None.
    client_ranks: [num_clients] LoRA rank of each client (None: all at `lora.rank`).

  Args of `round_step`:
    state: server state (module docstring).
    backbone: frozen Flax variables of the model.
    block: {"image": [C, S, B, H, W, 3] uint8, "label": [C, S, B] int32, "mask": [C, S, B]}.
    client_ids: [C] int32 sampled client ids, -1 for padding clients.
    weights: [C] float32 aggregation weights p_k (0 for padding).
  Returns:
    (new state, {"train_loss", "nonfinite_clients", "participants"}).
  """
  def round_step(state, backbone, block, client_ids, weights):
    global_trainable = state["global"]
    local_mask = params_lib.regex_mask(global_trainable, method.local_regex)
    update_mask = round_update_mask(method, global_trainable, state["round"])
    valid = client_ids >= 0
    gather_ids = jnp.where(valid, client_ids, 0)
    local = jax.tree.map(lambda x: x[gather_ids], state["clients"])
    masks = rank_masks(client_ranks, num_clients, _lora_rank(global_trainable))[gather_ids]
    signatures = client_signatures(state, gather_ids)
    offsets = generator.generate(state["gen"], signatures, gather_ids) if generator else None
    if method.meta_objective:  # The last step of each client's block is held out for S_ψ, C_ω.
      heldout = jax.tree.map(lambda x: x[:, -1], block)
      block = jax.tree.map(lambda x: x[:, :-1], block)

    def one_client(inputs):
      client_local, client_block, offset, rank_mask = inputs
      start = client_start(global_trainable, client_local, offset, rank_mask)
      trained, metrics = client_lib.local_update(
          adapted, client_optimizer, backbone, state["base_delta"], start,
          _rank_update_mask(update_mask, rank_mask), client_block)
      finite = params_lib.is_finite(trained) & jnp.isfinite(metrics["loss"])
      trained = jax.tree.map(lambda t, s: jnp.where(finite, t, s), trained, start)
      return trained, metrics, finite

    trained, metrics, finite = map_clients(one_client, (local, block, offsets, masks),
                                           clients_per_chunk, mesh)
    weights = jnp.where(valid & finite, weights, 0.0)
    total = jnp.sum(weights)
    weights = weights / jnp.maximum(total, 1e-12)
    if method.meta_objective:
      def meta_loss(candidate):
        """Σ_k p_k loss of client k's next-round start from `candidate` on its held-out batch."""
        def one_heldout(inputs):
          client_local, batch, offset, rank_mask = inputs
          trainable = client_start(candidate, client_local, offset, rank_mask)
          logits = adapted.logits(backbone, trainable, batch["image"], state["base_delta"])
          return client_lib.masked_cross_entropy(logits, batch["label"], batch["mask"])
        trained_local = params_lib.select(trained, local_mask)
        losses = map_clients(one_heldout, (trained_local, heldout, jax.lax.stop_gradient(offsets), masks),
                             clients_per_chunk, mesh)
        return jnp.sum(weights * losses)
      context = {"signatures": signatures, "client_loss": metrics["loss"], "meta_loss": meta_loss}
      aggregated, base_delta_increment, agg_state = method.aggregator.aggregate(
          state["agg"], global_trainable, trained, weights, context)
    else:
      aggregated, base_delta_increment, agg_state = method.aggregator.aggregate(
          state["agg"], global_trainable, trained, weights)
    # Nothing usable came back (every client non-finite): keep the global model.
    aggregated = jax.tree.map(lambda a, g: jnp.where(total > 0, a, g), aggregated, global_trainable)
    pseudo_gradient = jax.tree.map(lambda g, a: g - a, global_trainable, aggregated)
    updates, server_opt = server_optimizer.update(pseudo_gradient, state["server_opt"], global_trainable)
    new_global = optax.apply_updates(global_trainable, updates)
    # Local leaves are not the server's, and frozen leaves were not sent: both stay as they were.
    new_global = jax.tree.map(lambda n, g, m, u: g if m else jnp.where(u > 0, n, g),
                              new_global, global_trainable, local_mask, update_mask)
    gen_state = state["gen"]
    if generator:  # G_φ learns where each client ends up relative to the new global factors.
      gen_state = generator.update(gen_state, signatures, gather_ids, new_global["lora"],
                                   trained["lora"], weights, masks)
    scatter_ids = jnp.where(valid, client_ids, num_clients)  # Out of range: dropped.
    clients = jax.tree.map(lambda store, t: store.at[scatter_ids].set(t, mode="drop"),
                           state["clients"], params_lib.select(trained, local_mask))
    base_delta = jax.tree.map(lambda d, inc: d + jnp.where(total > 0, inc, 0.0),
                              state["base_delta"], base_delta_increment) if base_delta_increment else state["base_delta"]
    rng, _ = jax.random.split(state["rng"])
    new_state = {"round": state["round"] + 1, "rng": rng, "global": new_global,
                 "server_opt": server_opt, "clients": clients, "agg": agg_state,
                 "base_delta": base_delta, "gen": gen_state}
    if "signatures" in state:
      new_state["signatures"] = state["signatures"]
    example_weights = metrics["examples"] * valid
    train_loss = jnp.sum(metrics["loss"] * example_weights) / jnp.maximum(jnp.sum(example_weights), 1.0)
    round_metrics = {"train_loss": train_loss, "nonfinite_clients": jnp.sum(valid & ~finite),
                     "participants": jnp.sum(valid & finite)}
    if method.meta_objective:
      round_metrics["meta_loss"] = agg_state["meta_loss"]
    return new_state, round_metrics

  return round_step


def global_model(state: dict, generator: Generator | None) -> Any:
  """The model evaluated as *global*: the server's adapter, plus (for generator methods) the
  generator's offset for the average client (mean signature, mean client embedding)."""
  if generator is None:
    return state["global"]
  if "signatures" in state:
    signature = jnp.mean(state["signatures"], axis=0, keepdims=True)
  else:
    signature = jnp.zeros((1, 0), jnp.float32)
  offset = jax.tree.map(lambda x: x[0], generator.generate(state["gen"], signature,
                                                          jnp.full((1,), NEW_CLIENT, jnp.int32)))
  return {**state["global"], "lora": jax.tree.map(jnp.add, state["global"]["lora"], offset)}


def make_evaluate(adapted: client_lib.AdaptedModel, method: Method, *, eval_batch: int = 256,
                  clients_per_chunk: int = 0, generator: Generator | None = None,
                  client_ranks: np.ndarray | None = None) -> Callable:
  """Builds the pure `evaluate(state, backbone, global_test, client_test)`.

  Each client's model is what it would start the next round from (`client_start`): its local
  leaves, the generator's offset for it, truncated to its rank; no local steps.

  Args of `evaluate`:
    global_test: {"image": [M, H, W, 3], "label": [M], "mask": [M]}, M a multiple of eval_batch
      (the union of the clients' test splits).
    client_test: {"image": [N, n_max, H, W, 3], "label": [N, n_max], "mask": [N, n_max]}.
  Returns:
    {"global_accuracy": scalar (NaN without a global model),
     "client_accuracy": [N] accuracy of each client's own model on its own test split}.
  """
  def accuracy_on(trainable, backbone, base_delta, data):
    logits = adapted.logits(backbone, trainable, data["image"], base_delta)
    return client_lib.masked_correct(logits, data["label"], data["mask"]), jnp.sum(data["mask"])

  def evaluate(state, backbone, global_test, client_test):
    batches = jax.tree.map(lambda x: x.reshape((-1, eval_batch) + x.shape[1:]), global_test)
    shared = global_model(state, generator)
    correct, count = jax.lax.map(
        lambda b: accuracy_on(shared, backbone, state["base_delta"], b), batches)
    global_accuracy = jnp.sum(correct) / jnp.maximum(jnp.sum(count), 1.0)
    if not method.has_global_model:
      global_accuracy = jnp.full((), jnp.nan)

    num_clients = client_test["label"].shape[0]
    ids = jnp.arange(num_clients)
    masks = rank_masks(client_ranks, num_clients, _lora_rank(state["global"]))
    offsets = (generator.generate(state["gen"], client_signatures(state, ids), ids)
               if generator else None)

    def one_client(inputs):
      client_local, data, offset, rank_mask = inputs
      trainable = client_start(state["global"], client_local, offset, rank_mask)
      c, n = accuracy_on(trainable, backbone, state["base_delta"], data)
      return c / jnp.maximum(n, 1.0)

    client_accuracy = jax.lax.map(one_client, (state["clients"], client_test, offsets, masks),
                                  batch_size=clients_per_chunk or None)
    return {"global_accuracy": global_accuracy, "client_accuracy": client_accuracy}

  return evaluate


def make_new_client_evaluate(adapted: client_lib.AdaptedModel, method: Method,
                             client_optimizer: optax.GradientTransformation,
                             generator: Generator | None = None) -> Callable:
  """Builds the pure `evaluate_new(state, backbone, train_block, test_block, signatures)`.

  Amortization for clients never seen in training. Each new client (index `NEW_CLIENT`:
  mean embedding, its own signature) is evaluated on its test split from:
    "global"              the global model, zero local steps (its local leaves, if the
                          method has any, start from the global ones);
    "generated"           global + G_φ(s_new), zero local steps (generator methods only);
    "<start>_finetuned"   either start after the local steps of `train_block`.
  Args of `evaluate_new`:
    train_block: {"image": [H, S, B, ...], "label", "mask"}: the steps a new client may take.
    test_block: {"image": [H, n, ...], "label", "mask"}; signatures: [H, D].
  Returns:
    {name: [H] accuracy} for the names above.
  """
  def evaluate_new(state, backbone, train_block, test_block, signatures):
    num_new = test_block["label"].shape[0]
    update_mask = round_update_mask(method, state["global"], jnp.int32(0))
    full_rank = jnp.ones((_lora_rank(state["global"]),), jnp.float32)
    generated = (generator.generate(state["gen"], signatures, jnp.full((num_new,), NEW_CLIENT, jnp.int32))
                 if generator else jnp.zeros((num_new,)))

    def accuracy(trainable, data):
      logits = adapted.logits(backbone, trainable, data["image"], state["base_delta"])
      return client_lib.masked_correct(logits, data["label"], data["mask"]) / jnp.maximum(
          jnp.sum(data["mask"]), 1.0)

    def one_client(inputs):
      train, test, offset = inputs
      out = {}
      for name, start_offset in (("global", None), ("generated", offset)):
        if name == "generated" and generator is None:
          continue
        start = client_start(state["global"], {}, start_offset, full_rank)
        out[name] = accuracy(start, test)
        tuned, _ = client_lib.local_update(adapted, client_optimizer, backbone, state["base_delta"],
                                           start, update_mask, train)
        out[f"{name}_finetuned"] = accuracy(tuned, test)
      return out

    return jax.lax.map(one_client, (train_block, test_block, generated))

  return evaluate_new
