"""The library core on its own: LoRA layer types, clients-axis primitives, the aggregator
contract (per-layer combinator, partition, capabilities) and the round's plug-in hooks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hyperlora_jax as hl
from hyperlora_jax import aggregators, federated, lora, primitives


def _perturbed(targets, rank, seed=3):
  adapter = lora.init_lora(jax.random.key(seed), targets, rank)
  return jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapter)


class Mixed(nn.Module):
  """One layer of every supported kind, all non-square."""

  @nn.compact
  def __call__(self, tokens, image):
    x = nn.Embed(11, 6, name="embed")(tokens)  # [B, T, 6]
    x = nn.DenseGeneral((2, 5), name="heads")(x)  # [B, T, 2, 5]
    x = nn.DenseGeneral(7, axis=(-2, -1), name="merge")(x)  # [B, T, 7]
    x = nn.Einsum((7, 3, 4), "btd,dhk->bthk", name="einsum")(x).reshape(x.shape[:2] + (12,))
    y = nn.Conv(5, (3, 2), strides=(2, 1), padding="SAME", name="conv")(image)  # [B, 4, 5, 5]
    return x.mean(1) @ jnp.ones((12, 5)) + y.mean((1, 2))


def test_every_linen_layer_kind_factored_equals_merged():
  model = Mixed()
  tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
  image = jax.random.normal(jax.random.key(0), (2, 8, 5, 3))
  variables = model.init(jax.random.key(1), tokens, image)
  targets = lora.find_targets(model, variables, tokens, image, target_regex=".*")
  assert targets == {"embed": (11, 6), "heads": (6, 10), "merge": (10, 7), "einsum": (7, 12), "conv": (18, 5)}
  adapter = _perturbed(targets, rank=2)
  base = model.apply(variables, tokens, image)
  factored = lora.apply(model, variables, adapter, tokens, image, scale=1.5)
  merged = model.apply(lora.merge(variables, adapter, 1.5), tokens, image)
  assert float(jnp.abs(factored - base).max()) > 1e-3
  np.testing.assert_allclose(factored, merged, atol=1e-5)
  # Each layer alone too, so one layer's error cannot hide behind another's.
  for path in targets:
    one = {path: adapter[path]}
    np.testing.assert_allclose(
      lora.apply(model, variables, one, tokens, image, scale=1.5),
      model.apply(lora.merge(variables, one, 1.5), tokens, image),
      atol=1e-5,
    )


def test_base_delta_on_a_dense_general_layer_is_a_full_rank_weight_increment():
  model = nn.DenseGeneral((2, 5), name="heads")
  x = jax.random.normal(jax.random.key(0), (3, 6))
  variables = model.init(jax.random.key(1), x)
  delta = jax.random.normal(jax.random.key(2), (6, 10))
  shifted = {"params": {**variables["params"], "kernel": variables["params"]["kernel"] + delta.reshape(6, 2, 5)}}
  np.testing.assert_allclose(
    lora.apply(model, variables, {}, x, scale=1.0, base_delta={"": delta}), model.apply(shifted, x), atol=1e-5
  )


def test_nnx_linear_and_embed_factored_equal_merged_and_vmap_over_clients():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(9, 4, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)])

    def __call__(self, ids):
      return self.blocks[1](nnx.relu(self.blocks[0](self.embed(ids))))

  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  targets = lora.find_targets_nnx(model, target_regex=".*")
  assert targets == {"blocks/0": (4, 6), "blocks/1": (6, 3), "embed": (9, 4)}
  adapter = _perturbed(targets, rank=2)
  ids = jnp.array([0, 3, 8])
  got = lora.apply_nnx(graphdef, state, adapter, ids, scale=2.0)
  pure = nnx.to_pure_dict(state)
  pure["embed"]["embedding"] = pure["embed"]["embedding"] + 2.0 * adapter["embed"]["a"] @ adapter["embed"]["b"]
  for i in (0, 1):
    f = adapter[f"blocks/{i}"]
    pure["blocks"][i]["kernel"] = pure["blocks"][i]["kernel"] + 2.0 * f["a"] @ f["b"]
  merged_state = nnx.split(Model(nnx.Rngs(0)))[1]
  nnx.replace_by_pure_dict(merged_state, pure)
  np.testing.assert_allclose(got, nnx.merge(graphdef, merged_state)(ids), atol=1e-5)
  # The frozen state enters unbatched; per-client gradients differ per client.
  clients = primitives.broadcast(adapter, 3)
  clients = jax.tree.map(lambda x: x * jnp.arange(1.0, 4.0).reshape((3,) + (1,) * (x.ndim - 1)), clients)
  grads = jax.vmap(jax.grad(lambda a: jnp.sum(lora.apply_nnx(graphdef, state, a, ids, scale=2.0))))(clients)
  assert grads["embed"]["b"].shape == (3, 2, 4)
  assert not np.allclose(grads["embed"]["b"][0], grads["embed"]["b"][2])


def test_an_nnx_model_with_dropout_trains_in_the_round_with_its_own_draws_per_client_and_step():
  """`nnx.Dropout(rngs=rngs)`, the usual NNX idiom, trains in the round (no "Cannot mutate
  RngCount from a different trace level"), its draws from the loss's rng."""
  from flax import nnx

  class Net(nnx.Module):  # x [B, 8] -> [B, 3]
    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 16, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(nnx.relu(self.hidden(x))))

  graphdef, state = nnx.split(Net(nnx.Rngs(0, dropout=1)))
  adapter = lora.init_lora(jax.random.key(1), {"hidden": (8, 16), "out": (16, 3)}, rank=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
  call = lambda key: lora.apply_nnx(graphdef, state, adapter, x, scale=1.0, rngs=key)
  np.testing.assert_array_equal(call(jax.random.key(3)), call(jax.random.key(3)))
  assert not np.allclose(call(jax.random.key(3)), call(jax.random.key(4)))  # Another step: other masks.
  with pytest.raises(ValueError, match=r"streams \['dropout'\].*pass rngs="):
    lora.apply_nnx(graphdef, state, adapter, x, scale=1.0)

  def loss_fn(trainable, frozen, batch, rng):
    y = lora.apply_nnx(graphdef, frozen, trainable, batch["x"], scale=1.0, rngs=rng)
    return jnp.mean((y - batch["y"]) ** 2), {}

  fed = hl.FederatedRound(hl.local_update(loss_fn, optax.sgd(0.1)), aggregators.fedit(), num_clients=4)
  xs = np.random.default_rng(1).normal(size=(4, 2, 5, 8)).astype(np.float32)
  new_state, metrics = jax.jit(fed.step)(
    fed.init(jax.random.key(2), adapter), state, {"x": xs, "y": xs[..., :3]}, jnp.arange(4), jnp.full(4, 0.25)
  )
  assert np.isfinite(float(metrics["train_loss"])) and int(metrics["participants"]) == 4


def test_an_nnx_tied_head_is_adapted_as_its_merged_table():
  """`embed.attend` (a tied LM head) on an adapted nnx.Embed uses the merged table."""
  from flax import nnx

  class Tied(nnx.Module):  # ids [B, T] -> logits [B, T, 11]
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 6, rngs=rngs)
      self.mix = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, ids):
      return self.embed.attend(self.mix(self.embed(ids)))

  model = Tied(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  adapter = _perturbed(lora.find_targets_nnx(model, target_regex="embed"), rank=2)
  ids = jnp.array([[0, 4, 10, 3]])
  got = lora.apply_nnx(graphdef, state, adapter, ids, scale=2.0)
  pure = nnx.to_pure_dict(state)
  pure["embed"]["embedding"] = pure["embed"]["embedding"] + 2.0 * adapter["embed"]["a"] @ adapter["embed"]["b"]
  merged = nnx.split(Tied(nnx.Rngs(0)))[1]
  nnx.replace_by_pure_dict(merged, pure)
  np.testing.assert_allclose(got, nnx.merge(graphdef, merged)(ids), atol=1e-5)
  assert not np.allclose(got, model(ids), atol=1e-3)


def test_nnx_multi_head_attention_takes_lora_on_its_linear_general_layers():
  from flax import nnx

  attention = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(attention)
  targets = lora.find_targets_nnx(attention, target_regex="query|value|out")
  assert targets == {"out": (8, 6), "query": (6, 8), "value": (6, 8)}
  adapter = _perturbed(targets, rank=2)
  x = jax.random.normal(jax.random.key(5), (2, 3, 6))
  got = lora.apply_nnx(graphdef, state, adapter, x, scale=1.5)
  pure = nnx.to_pure_dict(state)
  for path, f in adapter.items():
    kernel = pure[path]["kernel"]
    pure[path]["kernel"] = kernel + (1.5 * f["a"] @ f["b"]).reshape(kernel.shape)
  nnx.replace_by_pure_dict(state, pure)
  merged = nnx.merge(graphdef, state)(x)
  assert float(jnp.abs(got - nnx.merge(*nnx.split(attention))(x)).max()) > 1e-3
  np.testing.assert_allclose(got, merged, atol=1e-5)


def test_a_host_feed_holds_bytes_as_words_in_host_memory_and_gives_each_chunk_back_exactly():
  """`HostFeed`: uint8 leaves whose trailing bytes divide by 4 are held as uint32 words (4 pixels
  a word; the others as they are), all in pinned host memory; each chunk comes back to the device
  bit for bit, in the clients' order, whatever the chunk (a byte-order or reshape bug changes it)."""
  rng = np.random.default_rng(0)
  batches = {
    "image": rng.integers(0, 256, (8, 2, 3, 4, 6, 3), dtype=np.uint8),  # 72 bytes: words.
    "odd": rng.integers(0, 256, (8, 2, 3, 5), dtype=np.uint8),  # 5 bytes: kept as bytes.
    "label": rng.integers(0, 10, (8, 2, 3)).astype(np.int32),
  }
  feed = primitives.HostFeed.of(batches, None)
  assert feed.byte_shapes == (("['image']", (4, 6, 3)),)
  held = feed.place(batches)
  assert {x.sharding.memory_kind for x in held.values()} == {primitives.HOST_MEMORY}
  assert held["image"].shape == (8, 2, 3, 18) and held["image"].dtype == jnp.uint32
  assert held["odd"].dtype == jnp.uint8 and held["label"].dtype == jnp.int32
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), feed.held(abstract)) == jax.tree.map(
    lambda x: (x.shape, x.dtype), held
  )
  for chunk in (0, 2, 4):
    back = jax.jit(lambda b, chunk=chunk: primitives.map_clients(lambda x: x, b, chunk, None, feed.load))(held)
    assert back["image"].sharding.memory_kind == primitives.DEVICE_MEMORY
    jax.tree.map(np.testing.assert_array_equal, back, batches)


def test_map_clients_is_differentiable_and_chunking_does_not_change_gradients():
  xs = jax.random.normal(jax.random.key(0), (6, 3))

  def loss(w, chunk):
    ys = primitives.map_clients(lambda x: jnp.tanh(x @ w), xs, clients_per_chunk=chunk)
    return jnp.sum(primitives.weighted_mean(ys, jnp.arange(6.0) / 15.0) ** 2)

  w = jax.random.normal(jax.random.key(1), (3, 2))
  g_all, g_chunked = jax.grad(loss)(w, 0), jax.grad(loss)(w, 2)
  assert float(jnp.abs(g_all).max()) > 0
  np.testing.assert_allclose(g_all, g_chunked, rtol=1e-5)
  # d/dw_k of Σ_k w_k x_k is x_k: the reduce's gradient with respect to the weights.
  tree = {"x": jnp.arange(6.0).reshape(3, 2)}
  grad_w = jax.grad(lambda wt: jnp.sum(primitives.weighted_mean(tree, wt)["x"]))(jnp.ones(3))
  np.testing.assert_allclose(grad_w, [1.0, 5.0, 9.0])
  assert primitives.broadcast({"a": jnp.ones((2, 5))}, 4)["a"].shape == (4, 2, 5)


def test_per_layer_combinator_touches_only_lora_layers():
  params = {"lora": {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}, "head": {"w": jnp.ones(3)}}
  clients = jax.tree.map(lambda x: jnp.stack([x, 3 * x]), params)
  seen = []

  def rule(layer, global_layer, weights):
    seen.append((layer["a"].shape, global_layer["b"].shape))
    return {"a": layer["a"][0], "b": layer["b"][1]}, jnp.zeros((4, 3))

  new, deltas = aggregators.aggregate_layers(rule, params, clients, jnp.array([0.5, 0.5]))
  assert seen == [((2, 4, 2), (2, 3))] and list(deltas) == ["q"]
  np.testing.assert_allclose(new["head"]["w"], 2.0 * np.ones(3))  # Weighted mean elsewhere.
  np.testing.assert_allclose(new["lora"]["q"]["b"], 3.0 * np.ones((2, 3)))


def test_partition_gives_each_part_its_rule_and_combines_capabilities():
  params = {"lora": {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}, "head": {"w": jnp.ones(3)}}
  clients = jax.tree.map(lambda x: jnp.stack([x, 3 * x]), params)
  agg = aggregators.partition(
    {"adapter": aggregators.head_only(), "head": aggregators.fedit()}, {"adapter": r"lora/.*", "head": r"head/.*"}
  )
  new, _, _ = agg.aggregate(agg.init(params), params, clients, jnp.array([0.5, 0.5]))
  jax.tree.map(np.testing.assert_array_equal, new["lora"], params["lora"])  # head_only keeps LoRA.
  np.testing.assert_allclose(new["head"]["w"], 2.0 * np.ones(3))
  assert agg.capabilities.plain_server_step and not agg.capabilities.heterogeneous_ranks
  with pytest.raises(ValueError, match="matches none"):
    aggregators.partition({"adapter": aggregators.fedit()}, {"adapter": r"lora/.*"}).init(params)


class OneLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(x)


def _toy_round(**kwargs):
  model = OneLayer()
  x = jnp.ones((2, 5))
  frozen = model.init(jax.random.key(0), x)
  adapter = {"out": {"a": 0.1 * jnp.ones((5, 2)), "b": jnp.zeros((2, 3))}}

  def loss_fn(trainable, frozen, batch, rng):
    pred = lora.apply(model, frozen, trainable, batch["x"], scale=1.0)
    return jnp.mean((pred - batch["y"]) ** 2), {}

  options = {"aggregator": aggregators.fedit(), **kwargs}
  return (
    federated.FederatedRound(hl.local_update(loss_fn, optax.sgd(0.1)), num_clients=4, **options),
    frozen,
    adapter,
    loss_fn,
  )


def test_round_enforces_the_aggregators_capabilities_when_built():
  with pytest.raises(ValueError, match="plain server step"):
    _toy_round(aggregator=aggregators.flexlora(1.0), server_optimizer=optax.sgd(1.0, momentum=0.9))
  with pytest.raises(ValueError, match="heterogeneous ranks"):
    _toy_round(client_ranks=np.array([1, 2, 2, 2]))
  with pytest.raises(ValueError, match="apply_base_delta"):
    _toy_round(aggregator=aggregators.fedex_lora(1.0))
  assert federated.is_plain_step(optax.sgd(1.0))
  assert not federated.is_plain_step(optax.sgd(0.5)) and not federated.is_plain_step(optax.adam(1.0))
  _toy_round(aggregator=aggregators.hetlora(), client_ranks=np.array([1, 2, 2, 2]))  # Declared: accepted.


def test_plugins_offset_every_start_and_see_the_outcome():
  calls = []
  shift = {"out": {"a": jnp.zeros((5, 2)), "b": jnp.full((2, 3), 0.5)}}
  plugin = hl.Plugin(
    name="shift",
    init=lambda rng: {"count": jnp.zeros((), jnp.int32)},
    client_offsets=lambda state, sig, ids: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape), shift
    ),
    after_aggregation=lambda state, outcome: calls.append(outcome.weights.shape) or {"count": state["count"] + 1},
  )
  fed, frozen, adapter, _ = _toy_round(plugins=(plugin,))
  state = fed.init(jax.random.key(1), adapter)
  batches = {"x": jnp.ones((2, 1, 2, 5)), "y": jnp.zeros((2, 1, 2, 3))}
  new_state, _ = fed.step(state, frozen, batches, jnp.array([0, -1]), jnp.array([1.0, 0.0]))
  assert calls == [(2,)] and int(new_state["plugins"]["shift"]["count"]) == 1
  start = fed.client_start(state["global"], {}, shift, jnp.ones(2))
  np.testing.assert_array_equal(start["out"]["b"], shift["out"]["b"])
  np.testing.assert_array_equal(fed.global_params(state)["out"]["b"], shift["out"]["b"])
  # The one real client trained from the shifted start, with SGD lr 0.1 on the MSE: b moved off 0.5.
  assert not np.allclose(new_state["global"]["out"]["b"], 0.5)


def test_an_aggregator_with_heldout_steps_gets_their_loss_and_they_are_not_trained_on():
  seen = {}

  def aggregate(state, global_params, client_params, weights, context):
    seen["heldout"] = context.heldout_loss(global_params)
    seen["client_loss"] = context.client_loss
    return aggregators.weighted_mean(client_params, weights), {}, state

  agg = aggregators.Aggregator(aggregators.no_state, aggregate, aggregators.Capabilities(name="probe", heldout_steps=1))
  fed, frozen, adapter, loss_fn = _toy_round(aggregator=agg)
  state = fed.init(jax.random.key(1), adapter)
  x = jax.random.normal(jax.random.key(2), (2, 3, 2, 5))
  batches = {"x": x, "y": jnp.ones((2, 3, 2, 3))}
  weights = jnp.array([0.25, 0.75])
  fed.step(state, frozen, batches, jnp.array([1, 3]), weights)
  expected = sum(
    float(w) * float(loss_fn(adapter, frozen, {"x": x[k, -1], "y": jnp.ones((2, 3))}, None)[0])
    for k, w in enumerate(weights)
  )
  np.testing.assert_allclose(float(seen["heldout"]), expected, rtol=1e-5)
  # The client update saw 2 steps, not 3: dropping the last step from the batches changes nothing.
  trimmed = dataclasses.replace(fed, aggregator=aggregators.fedit())
  s1, m1 = trimmed.step(state, frozen, jax.tree.map(lambda v: v[:, :2], batches), jnp.array([1, 3]), weights)
  np.testing.assert_allclose(float(m1["train_loss"]), float(jnp.mean(seen["client_loss"])), rtol=1e-5)


def test_communication_bytes_follow_the_declared_extra_bytes():
  fed, _, adapter, _ = _toy_round(aggregator=aggregators.flora(1.0), apply_base_delta=lambda f, d: f)
  up, down = federated.communication_bytes(fed, adapter, 0, [2, 2, 2])
  per_client = 4 * (5 * 2 + 2 * 3)
  assert up == 3 * per_client
  assert down == up + (3 - 1) * 6 * 4 * (5 + 3)  # FLoRA: every participant's stack to every other.


def test_importing_the_library_pulls_no_configs_or_model_zoo():
  import subprocess
  import sys

  code = (
    "import sys, hyperlora_jax; "
    "print(sorted(m for m in ('ml_collections', 'hyperlora_jax.models', 'experiments.runner.train', "
    "'tensorflow_datasets') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_nonfinite_clients_loss_is_left_out_of_the_reported_train_loss():
  """One client's data makes its loss NaN: it is counted as non-finite, left out of the
  aggregate, and the round's train_loss is the other client's (not NaN)."""
  fed, frozen, adapter, loss_fn = _toy_round()
  state = fed.init(jax.random.key(1), adapter)
  y = jnp.zeros((2, 1, 2, 3)).at[1].set(jnp.nan)
  batches = {"x": jnp.ones((2, 1, 2, 5)), "y": y}
  new_state, metrics = fed.step(state, frozen, batches, jnp.array([0, 1]), jnp.array([0.5, 0.5]))
  assert int(metrics["nonfinite_clients"]) == 1 and int(metrics["participants"]) == 1
  expected = loss_fn(adapter, frozen, jax.tree.map(lambda v: v[0, 0], batches), None)[0]
  np.testing.assert_allclose(metrics["train_loss"], expected, rtol=1e-6)
  assert bool(primitives.is_finite(new_state["global"]))


def test_a_round_with_no_finite_client_reports_no_loss_and_the_summary_says_so():
  from experiments.runner import reporting

  fed, frozen, adapter, _ = _toy_round()
  state = fed.init(jax.random.key(1), adapter)
  batches = {"x": jnp.ones((2, 1, 2, 5)), "y": jnp.full((2, 1, 2, 3), jnp.nan)}
  _, metrics = fed.step(state, frozen, batches, jnp.array([0, 1]), jnp.array([0.5, 0.5]))
  assert int(metrics["participants"]) == 0 and np.isnan(float(metrics["train_loss"]))
  record = reporting.clean_record(
    {
      "round": 1,
      "train_loss": float(metrics["train_loss"]),
      "cum_bytes_up": 0,
      "cum_bytes_down": 0,
      "global_accuracy": 0.1,
      "personalized_accuracy_mean": 0.1,
      "personalized_accuracy_worst": 0.1,
    }
  )
  assert record["train_loss"] is None
  assert "train loss             n/a" in reporting.summary([record], "run")


def test_the_typed_server_state_reads_and_checkpoints_as_the_dict_it_was(tmp_path):
  """`ServerState` keeps the dict layout of every checkpoint written before it (the keys
  below), so those restore into it; `state["global"]` reads as before."""
  import orbax.checkpoint as ocp

  from experiments.runner.workdir import checkpoint_manager, restore_state, save_state

  fed, frozen, adapter, _ = _toy_round(local_leaves=r"out/b")
  batches = {"x": jnp.ones((2, 2, 2, 5)), "y": jnp.ones((2, 2, 2, 3))}
  state, _ = jax.jit(fed.step)(
    fed.init(jax.random.key(1), adapter), frozen, batches, jnp.array([0, 3]), jnp.full(2, 0.5)
  )
  layout = state.as_dict()
  assert set(layout) == {"round", "rng", "global", "server_opt", "clients", "agg", "base_delta", "plugins"}
  assert state["global"] is state.global_params and "signatures" not in state and "clients" in state
  old = checkpoint_manager(str(tmp_path / "dict"))  # As the runner saved before the typed state.
  old.save(1, args=ocp.args.StandardSave(layout))
  old.wait_until_finished()
  fresh = fed.init(jax.random.key(9), adapter)
  restored, step = restore_state(old, fresh)
  old.close()
  assert step == 1 and isinstance(restored, federated.ServerState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  new = checkpoint_manager(str(tmp_path / "typed"))
  save_state(new, 1, state)
  new.wait_until_finished()
  again, _ = restore_state(new, fresh)
  new.close()
  jax.tree.map(np.testing.assert_array_equal, again, state)
