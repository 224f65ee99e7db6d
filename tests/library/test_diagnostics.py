"""The round's diagnostics (`hyperlora_jax.diagnostics`, the synthesizer's metrics) against hand
counts and independent NumPy formulas in the paper's orientation (B [d_out, r], A [r, d_in]),
on non-square layers so that a transposed factor would show."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hyperlora_jax as hl
from hyperlora_jax import aggregators, diagnostics, federated, lora
from hyperlora_jax.client import masked_mean
from hyperlora_jax.hyper import synthesis


def _paper_bias(a, b, weights):
  """‖B̄Ā − Σ p_k B_k A_k‖_F / ‖Σ p_k B_k A_k‖_F with B_k = b_kᵀ, A_k = a_kᵀ, in NumPy float64."""
  a, b, p = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(weights, np.float64)
  big_b = np.transpose(b, (0, 2, 1))  # [C, d_out, r]
  big_a = np.transpose(a, (0, 2, 1))  # [C, r, d_in]
  exact = sum(p[k] * big_b[k] @ big_a[k] for k in range(len(p)))
  naive = np.tensordot(p, big_b, 1) @ np.tensordot(p, big_a, 1)
  return np.linalg.norm(naive - exact) / np.linalg.norm(exact)


def test_aggregation_bias_hand_count_and_zero_when_every_a_is_shared():
  # Two rank-1 clients on orthogonal directions, p = (1/2, 1/2): Σ p B A = diag(1/2, 1/2) on a
  # 2x3 block, B̄Ā = 1/4 everywhere on it, so the difference has four entries of ±1/4:
  # ‖·‖ = 1/2 against ‖Σ p B A‖ = 1/√2, a bias of 1/√2.
  a = jnp.array([[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.0]]])  # [C=2, d_in=3, r=1]
  b = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # [C=2, r=1, d_out=2]
  weights = jnp.array([0.5, 0.5])
  np.testing.assert_allclose(float(diagnostics.layer_aggregation_bias(a, b, weights)), 2**-0.5, rtol=1e-6)
  shared_a = jnp.broadcast_to(a[:1], a.shape)  # FFA-LoRA: A is frozen and shared.
  assert float(diagnostics.layer_aggregation_bias(shared_a, b, weights)) < 1e-7


def test_aggregation_bias_matches_the_paper_formula_on_non_square_layers():
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (3, 5, 2))  # C=3, d_in=5, r=2
  b = jax.random.normal(keys[1], (3, 2, 7))  # d_out=7
  weights = jnp.array([0.2, 0.5, 0.3])
  got = diagnostics.aggregation_bias({"lora": {"enc/q": {"a": a, "b": b}}, "head": jnp.ones((3, 4))}, weights)
  assert list(got) == ["enc/q"]
  np.testing.assert_allclose(float(got["enc/q"]), _paper_bias(a, b, weights), rtol=1e-5)
  # A client with weight 0 (padding, dropped) does not count.
  padded = diagnostics.layer_aggregation_bias(
    jnp.concatenate([a, 9 * a[:1]]), jnp.concatenate([b, b[:1]]), jnp.array([0.2, 0.5, 0.3, 0.0])
  )
  np.testing.assert_allclose(float(padded), _paper_bias(a, b, weights), rtol=1e-5)


def test_aggregation_bias_of_a_wide_layer_forms_no_layer_sized_matrix_and_resolves_a_small_bias():
  """The bias of a 96 x 80 layer from 4 clients of rank 2 is computed from Gram matrices: no value
  of the computation has both a d_in and a d_out axis (the product form holds a [d_in, d_out]
  float32 per layer, all-reduced across devices). A bias of ~1e-4 (nearly shared A) is still
  resolved to 1% against float64."""
  keys = jax.random.split(jax.random.key(3), 3)
  a = jax.random.normal(keys[0], (1, 96, 2)) + 1e-4 * jax.random.normal(keys[1], (4, 96, 2))
  b = jax.random.normal(keys[2], (4, 2, 80))
  weights = jnp.array([0.1, 0.2, 0.3, 0.4])
  jaxpr = jax.make_jaxpr(diagnostics.layer_aggregation_bias)(a, b, weights)
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
  assert not [s for s in shapes if 96 in s and 80 in s], shapes
  want = _paper_bias(a, b, weights)
  assert 1e-5 < want < 1e-3
  np.testing.assert_allclose(float(diagnostics.layer_aggregation_bias(a, b, weights)), want, rtol=1e-2)


def test_both_ways_to_the_bias_agree_and_each_layer_takes_the_one_moving_fewer_values():
  """The Gram and product ways agree (non-square, padding client included); a wide layer with
  few clients takes the Gram one (no [d_in, d_out] value), a narrow one the product (no
  [C, r, C, r] value)."""
  keys = jax.random.split(jax.random.key(5), 2)
  a, b = jax.random.normal(keys[0], (5, 9, 3)), jax.random.normal(keys[1], (5, 3, 7))
  weights = jnp.array([0.1, 0.2, 0.3, 0.4, 0.0])
  np.testing.assert_allclose(
    float(diagnostics.gram_aggregation_bias(a, b, weights)),
    float(diagnostics.product_aggregation_bias(a, b, weights)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    float(diagnostics.layer_aggregation_bias(a, b, weights)), _paper_bias(a, b, weights), rtol=1e-5
  )

  def value_shapes(c, d_in, r, d_out):
    jaxpr = jax.make_jaxpr(diagnostics.layer_aggregation_bias)(
      jnp.ones((c, d_in, r)), jnp.ones((c, r, d_out)), jnp.full(c, 1 / c)
    )
    return {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}

  wide = value_shapes(2, 96, 2, 80)  # 3 C r (d_in + d_out) = 2,112 < 7,680: Gram.
  assert (96, 80) not in wide and (2, 2, 2, 2) in wide
  narrow = value_shapes(16, 12, 4, 10)  # 4,224 >= 120: the product.
  assert (12, 10) in narrow and (16, 4, 16, 4) not in narrow


def test_client_drift_hand_count():
  starts = {"w": jnp.zeros((2, 2)), "v": jnp.ones((2, 1))}
  # Updates (2, 0 | 0) and (0, 0 | 0): mean (1, 0 | 0), each 1 away from it: sqrt(1) / 1.
  trained = {"w": jnp.array([[2.0, 0.0], [0.0, 0.0]]), "v": jnp.ones((2, 1))}
  np.testing.assert_allclose(float(diagnostics.client_drift(trained, starts, jnp.array([0.5, 0.5]))), 1.0)
  # p = (3/4, 1/4): mean (1.5, 0), spread 3/4 * 0.25 + 1/4 * 2.25 = 0.75: sqrt(0.75) / 1.5.
  np.testing.assert_allclose(
    float(diagnostics.client_drift(trained, starts, jnp.array([0.75, 0.25]))), 0.75**0.5 / 1.5, rtol=1e-6
  )
  alike = {"w": jnp.array([[2.0, 0.0], [2.0, 0.0]]), "v": jnp.ones((2, 1))}
  assert float(diagnostics.client_drift(alike, starts, jnp.array([0.5, 0.5]))) == 0.0


def test_first_and_last_loss_are_those_of_the_first_and_last_steps_with_examples():
  # loss = ½ (w − 3)² per example, SGD lr 0.5 from w = 0: w goes 0, 1.5, 2.25, 2.625, so the
  # step losses are 4.5, 1.125, 0.28125 (each before its step's update).
  def loss_fn(w, frozen, batch, rng):
    return masked_mean(0.5 * (w - 3.0) ** 2 * jnp.ones_like(batch["mask"]), batch["mask"]), {}

  update = hl.local_update(loss_fn, optax.sgd(0.5))
  batches = {"mask": jnp.ones((3, 4))}
  _, metrics = update(jnp.float32(0.0), None, batches, jax.random.key(0))
  np.testing.assert_allclose([float(metrics["first_loss"]), float(metrics["last_loss"])], [4.5, 0.28125])
  # The last step holds no example (a short client's padding): the last loss is the second step's.
  _, metrics = update(jnp.float32(0.0), None, {"mask": jnp.array([[1.0] * 4, [1.0] * 4, [0.0] * 4])}, jax.random.key(0))
  np.testing.assert_allclose(float(metrics["last_loss"]), 1.125)
  # A straggler that did 1 of 3 steps: its first and last step are the same one.
  _, metrics = update(jnp.float32(0.0), None, batches, jax.random.key(0), steps_done=jnp.int32(1))
  np.testing.assert_allclose([float(metrics["first_loss"]), float(metrics["last_loss"])], [4.5, 4.5])


class Dense5to3(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(x)


def _round_with_probe(aggregator, **options):
  """A 5 -> 3 LoRA round whose aggregator also keeps what the clients returned."""
  model = Dense5to3()
  frozen = model.init(jax.random.key(0), jnp.ones((2, 5)))
  adapter = {"out": {"a": 0.3 * jax.random.normal(jax.random.key(1), (5, 2)), "b": jnp.zeros((2, 3))}}

  def loss_fn(trainable, frozen, batch, rng):
    pred = lora.apply(model, frozen, trainable, batch["x"], scale=1.0)
    return jnp.mean((pred - batch["y"]) ** 2), {}

  seen = {}

  def aggregate(state, global_params, client_params, weights, context):
    seen.update(trained=client_params, weights=weights, starts=context.client_starts)
    return aggregator.aggregate(state, global_params, client_params, weights, context)

  probe = aggregators.Aggregator(aggregator.init, aggregate, aggregator.capabilities)
  fed = federated.FederatedRound(hl.local_update(loss_fn, optax.sgd(0.2)), num_clients=4, aggregator=probe, **options)
  # Each client sees its own batch at every step, so its loss falls from step to step.
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (3, 1, 2, 5)), (3, 4, 2, 5))
  y = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (3, 1, 2, 3)), (3, 4, 2, 3))
  state = fed.init(jax.random.key(4), adapter)
  _, metrics = fed.step(state, frozen, {"x": x, "y": y}, jnp.array([0, 2, 3]), jnp.array([0.2, 0.3, 0.5]))
  return metrics, seen


def test_a_fedit_round_reports_the_bias_and_drift_of_what_its_clients_returned():
  metrics, seen = _round_with_probe(aggregators.fedit())
  layer = seen["trained"]["out"]
  expected = _paper_bias(layer["a"], layer["b"], seen["weights"])
  assert expected > 1e-4  # Clients moved A differently: the bias is not trivially 0.
  np.testing.assert_allclose(float(metrics["aggregation_bias_per_layer"]["out"]), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["aggregation_bias"]), expected, rtol=1e-4)
  updates = np.concatenate(
    [np.asarray(seen["trained"]["out"][k] - seen["starts"]["out"][k]).reshape(3, -1) for k in ("a", "b")], axis=1
  )
  p = np.asarray(seen["weights"])
  mean = p @ updates
  drift = np.sqrt(p @ ((updates - mean) ** 2).sum(1)) / np.linalg.norm(mean)
  np.testing.assert_allclose(float(metrics["client_drift"]), drift, rtol=1e-4)
  assert float(metrics["first_step_loss"]) > float(metrics["last_step_loss"])  # The clients learned.
  np.testing.assert_allclose(
    float(metrics["init_lag"]), float(metrics["first_step_loss"]) - float(metrics["last_step_loss"]), rtol=1e-6
  )
  assert "generator_offset_norm" not in metrics


def test_an_ffa_round_has_no_aggregation_bias():
  metrics, _ = _round_with_probe(aggregators.fedit(), frozen_leaves=(r".*/a$",))
  assert float(metrics["aggregation_bias"]) < 1e-6


@pytest.mark.parametrize("learned_corrector", [False, True])
def test_synthesizer_metrics_at_the_uniform_limit(learned_corrector):
  # learned_weights=False: w_{k,l} = p_k, so the entropy is H(p) and the divergence from p is 0;
  # the corrector's gate is 0.5 at initialization (a sigmoid of 0).
  cfg = synthesis.SynthesisConfig(
    scale=1.0, rank=2, learned_weights=False, corrector="learned" if learned_corrector else "none"
  )
  metrics, _ = _round_with_probe(synthesis.hyperlora_synthesizer(cfg, optax.sgd(0.0), meta_learning=False))
  p = np.array([0.2, 0.3, 0.5])
  np.testing.assert_allclose(float(metrics["synth_weight_entropy"]), -(p * np.log(p)).sum(), rtol=1e-5)
  assert abs(float(metrics["synth_weight_kl"])) < 1e-6
  if learned_corrector:
    np.testing.assert_allclose(float(metrics["corrector_gate"]), 0.5, atol=1e-6)
  else:
    assert "corrector_gate" not in metrics


def test_learned_synthesis_weights_move_away_from_p():
  scores = jnp.array([[2.0], [0.0], [-2.0]])
  p = jnp.array([0.2, 0.3, 0.5])
  w = synthesis.synthesis_weights(scores, p)
  expected_kl = float(jnp.sum(w[:, 0] * jnp.log(w[:, 0] / p)))
  np.testing.assert_allclose(float(synthesis.weight_divergence(w, p)), expected_kl, rtol=1e-6)
  assert expected_kl > 0.1
