"""Server-side numerical safety and the cause of HyperLoRA's divergence.

Each test names the bug it catches: a generator's offset absorbed into the global every round
(the geometric growth that made HyperLoRA's smoke run non-finite after ~580 rounds), a
generator learning the shared update instead of the personal part, and server parts
(aggregate, server step, plug-ins, meta-step) whose non-finite or exploding output was kept.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hyperlora_jax as hl
from hyperlora_jax import aggregators, federated, lora, primitives
from hyperlora_jax.hyper import generator as generator_lib
from hyperlora_jax.hyper.plugins import deviation_targets, generator_plugin
from hyperlora_jax.hyper.synthesis import SynthesisConfig, hyperlora_synthesizer
from tests.library.test_core import OneLayer

D_IN, D_OUT, R = 5, 3, 2  # Non-square: a transposed factor fails to broadcast or to match.


PLAIN_SERVER_STEP = optax.sgd(1.0)


def _round(
  aggregator,
  *,
  learning_rate=0.1,
  plugins=(),
  server_optimizer=PLAIN_SERVER_STEP,
  optimizer=optax.sgd,
  local_steps=2,
  b_scale=0.5,
  **kwargs,
):
  """A one-layer LoRA round on an MSE loss: (FederatedRound, frozen, adapter, batches)."""
  model = OneLayer()
  frozen = model.init(jax.random.key(0), jnp.ones((2, D_IN)))
  k = jax.random.split(jax.random.key(1), 3)
  adapter = {"out": {"a": jax.random.normal(k[0], (D_IN, R)), "b": b_scale * jax.random.normal(k[1], (R, D_OUT))}}

  def loss_fn(trainable, frozen, batch, rng):
    pred = lora.apply(model, frozen, trainable, batch["x"], scale=1.0)
    return jnp.mean((pred - batch["y"]) ** 2), {}

  fed = federated.FederatedRound(
    hl.local_update(loss_fn, optimizer(learning_rate)),
    aggregator,
    num_clients=4,
    plugins=plugins,
    server_optimizer=server_optimizer,
    **kwargs,
  )
  steps = local_steps + aggregator.capabilities.heldout_steps
  batches = {"x": jax.random.normal(k[2], (3, steps, 4, D_IN)), "y": jnp.ones((3, steps, 4, D_OUT))}
  return fed, frozen, adapter, batches


IDS, WEIGHTS = jnp.array([0, 2, 3]), jnp.array([0.5, 0.3, 0.2])


def _constant_offset_plugin(offset):
  """Every client starts from global + `offset` (a fixed generator)."""
  return hl.Plugin(
    name="fixed",
    init=lambda rng: {},
    client_offsets=lambda state, sig, ids: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape), offset
    ),
    after_aggregation=lambda state, outcome: state,
  )


def test_a_generators_offset_is_not_absorbed_into_the_synthesized_global():
  """Clients that do not train (learning rate 0) return their start, global + offset. The
  global must not move: the old synthesizer averaged the returned *products*, so the global
  took in s(a+o_a)(b+o_b) − s a b every round, and the next round added the offset again."""
  offset = {"out": {"a": jnp.full((D_IN, R), 0.3), "b": jnp.full((R, D_OUT), -0.2)}}
  synthesizer = hyperlora_synthesizer(
    SynthesisConfig(scale=1.0, rank=R, corrector="none", learned_weights=False), optax.adam(1e-3), meta_learning=False
  )
  fed, frozen, adapter, batches = _round(synthesizer, learning_rate=0.0, plugins=(_constant_offset_plugin(offset),))
  state = fed.init(jax.random.key(2), adapter)
  step = jax.jit(fed.step)
  for _ in range(5):
    state, _ = step(state, frozen, batches, IDS, WEIGHTS)
  layer = state["global"]["out"]
  np.testing.assert_allclose(layer["a"] @ layer["b"], adapter["out"]["a"] @ adapter["out"]["b"], atol=1e-5)


def test_synthesized_global_moves_by_the_weighted_mean_product_change():
  """With offsets and real training: new s a b = best rank-r of s a b + Σ_k p_k (s a_k b_k − s a⁰_k b⁰_k)
  (uniform weights, no corrector), checked against the clients' returned factors."""
  offset = {"out": {"a": jnp.full((D_IN, R), 0.1), "b": jnp.zeros((R, D_OUT))}}
  synthesizer = hyperlora_synthesizer(
    SynthesisConfig(scale=1.0, rank=R, corrector="none", learned_weights=False), optax.adam(1e-3), meta_learning=False
  )
  seen = {}
  spy = hl.Plugin(
    name="spy",
    init=lambda rng: {},
    client_offsets=lambda state, sig, ids: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape), offset
    ),
    after_aggregation=lambda state, outcome: (
      seen.update(trained=outcome.client_params, starts=outcome.client_starts) or state
    ),
  )
  fed, frozen, adapter, batches = _round(synthesizer, plugins=(spy,))
  state = fed.init(jax.random.key(2), adapter)
  new_state, _ = fed.step(state, frozen, batches, IDS, WEIGHTS)
  trained, starts = seen["trained"]["out"], seen["starts"]["out"]
  np.testing.assert_allclose(starts["a"][1], adapter["out"]["a"] + 0.1, rtol=1e-6)
  change = sum(
    float(w)
    * (
      np.asarray(trained["a"][k]) @ np.asarray(trained["b"][k])
      - np.asarray(starts["a"][k]) @ np.asarray(starts["b"][k])
    )
    for k, w in enumerate(WEIGHTS)
  )
  target = np.asarray(adapter["out"]["a"] @ adapter["out"]["b"]) + change
  u, s, vt = np.linalg.svd(target, full_matrices=False)
  layer = new_state["global"]["out"]
  np.testing.assert_allclose(layer["a"] @ layer["b"], (u[:, :R] * s[:R]) @ vt[:R], atol=1e-5)
  # The old rule (products averaged) is measurably different here.
  averaged = sum(float(w) * np.asarray(trained["a"][k]) @ np.asarray(trained["b"][k]) for k, w in enumerate(WEIGHTS))
  assert np.abs(averaged - target).max() > 1e-2


def test_deviation_targets_remove_the_cohorts_mean_change():
  k = jax.random.split(jax.random.key(3), 2)
  starts = {"l": {"a": jax.random.normal(k[0], (3, D_IN, R)), "b": jax.random.normal(k[1], (3, R, D_OUT))}}
  trained = jax.tree.map(lambda s: s + jnp.arange(3.0).reshape(3, 1, 1) * 0.1 + 0.05 * s, starts)
  got = deviation_targets(trained, starts, WEIGHTS)
  for name in ("a", "b"):
    t, s = np.asarray(trained["l"][name]), np.asarray(starts["l"][name])
    mean_change = sum(float(WEIGHTS[c]) * (t[c] - s[c]) for c in range(3))
    np.testing.assert_allclose(got["l"][name], t - mean_change[None], rtol=1e-5, atol=1e-6)
    residual = s - np.asarray(got["l"][name])  # The VJP rule's (sent − target): zero on average.
    np.testing.assert_allclose(np.einsum("c,c...->...", WEIGHTS, residual), 0.0, atol=1e-6)


def _generator(learning_rate=1.0):
  module = generator_lib.LoraGenerator(
    targets={"out": (D_IN, D_OUT)}, rank=R, num_clients=4, client_embed_dim=3, hidden=8, layer_embed_dim=4
  )
  return generator_lib.make_generator(module, loss="vjp", optimizer=optax.sgd(learning_rate), scale=1.0)


def test_a_deviation_generator_learns_nothing_from_a_change_every_client_shares():
  """All clients made the same change: nothing is personal, so G_φ (target "deviation")
  stays put, while pFedHN's "from_global" rule (base = the unmoved global) learns it."""
  generator = _generator()
  state = generator.init(jax.random.key(4))
  base = {"out": {"a": jnp.ones((D_IN, R)), "b": jnp.ones((R, D_OUT))}}
  starts = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), base)
  trained = jax.tree.map(lambda x: x + 0.5, starts)
  outcome = federated.RoundOutcome(
    new_global=base,
    client_params=trained,
    weights=WEIGHTS,
    client_ids=IDS,
    signatures=jnp.zeros((3, 0)),
    rank_masks=jnp.ones((3, R)),
    previous_global=base,
    client_starts=starts,
  )
  for target, moves in (("deviation", False), ("from_global", True)):
    new = generator_plugin(generator, target=target).after_aggregation(state, outcome)
    changed = any(
      not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"]))
    )
    assert changed == moves, target
  with pytest.raises(ValueError, match="generator target"):
    generator_plugin(generator, target="nope")


def _probe(output):
  """An aggregator that returns `output(global_params)` and counts its calls in its state."""

  def aggregate(state, global_params, client_params, weights, context=None):
    return output(global_params), {}, {"calls": state["calls"] + 1}

  return aggregators.Aggregator(
    lambda g, rng=None, signature_dim=0: {"calls": jnp.zeros((), jnp.int32)},
    aggregate,
    aggregators.Capabilities(name="probe"),
  )


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, 1e7])
def test_a_nonfinite_or_exploding_aggregate_is_rejected_and_the_previous_state_kept(bad):
  fed, frozen, adapter, batches = _round(_probe(lambda g: jax.tree.map(lambda x: x * 0 + bad, g)))
  state = fed.init(jax.random.key(2), adapter)
  new_state, metrics = fed.step(state, frozen, batches, IDS, WEIGHTS)
  assert int(metrics["rejected_aggregate"]) == 1 and int(metrics["rejected_server_step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, new_state["global"], adapter)
  assert int(new_state["agg"]["calls"]) == 0  # The aggregator's state is the previous one.
  fine = _round(_probe(lambda g: jax.tree.map(lambda x: x + 1.0, g)))[0]
  new_state, metrics = fine.step(fine.init(jax.random.key(2), adapter), frozen, batches, IDS, WEIGHTS)
  assert int(metrics["rejected_aggregate"]) == 0 and int(new_state["agg"]["calls"]) == 1
  np.testing.assert_allclose(new_state["global"]["out"]["b"], adapter["out"]["b"] + 1.0)


def test_the_value_bound_is_a_knob():
  fed, frozen, adapter, batches = _round(
    _probe(lambda g: jax.tree.map(lambda x: x * 0 + 1e7, g)), max_server_value=None
  )
  _, metrics = fed.step(fed.init(jax.random.key(2), adapter), frozen, batches, IDS, WEIGHTS)
  assert int(metrics["rejected_aggregate"]) == 0  # No bound: only non-finite values are rejected.


def test_an_overflowing_server_step_is_rejected_with_its_optimizer_state():
  server = optax.sgd(1e38, momentum=0.9)  # FedOpt with momentum: the step overflows to inf.
  fed, frozen, adapter, batches = _round(aggregators.fedit(), server_optimizer=server)
  state = fed.init(jax.random.key(2), adapter)
  new_state, metrics = fed.step(state, frozen, batches, IDS, WEIGHTS)
  assert int(metrics["rejected_server_step"]) == 1 and int(metrics["rejected_aggregate"]) == 0
  jax.tree.map(np.testing.assert_array_equal, new_state["global"], adapter)
  jax.tree.map(np.testing.assert_array_equal, new_state["server_opt"], state["server_opt"])


def test_a_plugin_whose_new_state_is_nonfinite_keeps_its_old_state():
  plugin = hl.Plugin(
    name="broken",
    init=lambda rng: {"w": jnp.ones(3)},
    client_offsets=lambda state, sig, ids: {
      "out": {"a": jnp.zeros((ids.shape[0], D_IN, R)), "b": jnp.zeros((ids.shape[0], R, D_OUT))}
    },
    after_aggregation=lambda state, outcome: {"w": state["w"] * jnp.nan},
  )
  fed, frozen, adapter, batches = _round(aggregators.fedit(), plugins=(plugin,))
  new_state, metrics = fed.step(fed.init(jax.random.key(2), adapter), frozen, batches, IDS, WEIGHTS)
  assert int(metrics["rejected_plugins"]) == 1
  np.testing.assert_array_equal(new_state["plugins"]["broken"]["w"], jnp.ones(3))


def test_hyperlora_with_an_absurd_client_learning_rate_keeps_a_finite_server():
  """Client Adam with lr 1e20, one step from b = 0 (LoRA's start): b becomes ±1e20, finite,
  with a finite loss, but the server's products and Gram matrices overflow. Before the guards, the global adapter, generator and residual were NaN after one round with
  nonfinite_clients = 0; now every server part stays finite and the rejections are counted."""
  synthesizer = hyperlora_synthesizer(
    SynthesisConfig(scale=1.0, rank=R, corrector="learned"), optax.adam(1e-3, eps_root=1e-16)
  )
  plugin = generator_plugin(_generator(1e-3), target="deviation")
  fed, frozen, adapter, batches = _round(
    synthesizer, learning_rate=1e20, plugins=(plugin,), optimizer=optax.adam, local_steps=1, b_scale=0.0
  )
  state = fed.init(jax.random.key(2), adapter)
  step = jax.jit(fed.step)
  for round_index in range(3):
    state, metrics = step(state, frozen, batches, IDS, WEIGHTS)
    if round_index == 0:  # Each client's own factors are finite; their aggregate is not.
      assert int(metrics["nonfinite_clients"]) == 0 and int(metrics["rejected_aggregate"]) == 1
      assert int(metrics["meta_step_skipped"]) == 1
    assert bool(
      primitives.is_finite((state["global"], state["agg"]["params"], state["agg"]["residual"], state["plugins"]))
    )
  jax.tree.map(np.testing.assert_array_equal, state["global"], adapter)


def test_a_run_counts_rejections_and_stops_on_a_nonfinite_global_model(smoke_config, tmp_path, monkeypatch):
  """A server step that overflows (FedOpt, lr 1e38 with momentum): the guard rejects it every
  round and metrics.jsonl counts it; with the guards switched off, the global model turns
  non-finite and the run stops naming the round, instead of reporting an accuracy for it."""
  from experiments.runner import reporting
  from experiments.runner.train import train_and_evaluate

  smoke_config.server_optimizer.learning_rate, smoke_config.server_optimizer.momentum = 1e38, 0.9
  smoke_config.fed.num_rounds = 2
  train_and_evaluate(smoke_config, str(tmp_path / "guarded"), progress=False, log=lambda _: None)
  records = reporting.read_metrics(str(tmp_path / "guarded"))
  assert [r["rejected_server_step"] for r in records] == [1, 1]
  assert all(r["rejected_aggregate"] == 0 and r["global_accuracy"] is not None for r in records)
  monkeypatch.setattr(primitives, "keep_if", lambda ok, new, old: new)  # No guards.
  with pytest.raises(FloatingPointError, match="round 2: the global model is non-finite.*no checkpoint"):
    train_and_evaluate(smoke_config, str(tmp_path / "unguarded"), progress=False, log=lambda _: None)
  assert [r["round"] for r in reporting.read_metrics(str(tmp_path / "unguarded"))] == [1]  # 2 not recorded.


def test_a_diverged_pretraining_is_reported_and_not_cached(smoke_config, tmp_path):
  """A pretraining learning rate that blows up once cached a NaN backbone and reported
  "holdout accuracy 0.062"; validation now refuses inf, and a finite but absurd one is caught."""
  import os
  from experiments.runner import pretrain
  from experiments.runner.settings import backbone_settings

  smoke_config.pretrain.learning_rate = 1e30
  smoke_config.pretrain.cache_dir = str(tmp_path / "backbones")
  with pytest.raises(FloatingPointError, match="pretraining diverged.*pretrain.learning_rate"):
    pretrain.load_or_pretrain(backbone_settings(smoke_config), log=lambda _: None)
  assert not os.path.exists(tmp_path / "backbones") or not os.listdir(tmp_path / "backbones")
