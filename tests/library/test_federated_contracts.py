"""The round's contracts catch a user's plausible mistakes, in the user's terms, when traced.

Each test is a plausible mistake that, unchecked, runs silently with wrong results (or fails
deep inside JAX or Flax): it fails with a message naming what was expected, or, where values
cannot be seen under jit, is left out and counted.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hyperlora_jax as hl
from hyperlora_jax import aggregators, lora


class Linear(nn.Module):
  """x [B, 5] -> [B, 3]: a non-square layer."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(x)


def mse(model):
  def loss_fn(trainable, frozen, batch, rng):
    pred = lora.apply(model, frozen, trainable, batch["x"], scale=1.0)
    return jnp.mean((pred - batch["y"]) ** 2), {}

  return loss_fn


def setup(num_clients=4, steps=None, aggregator=None, loss_fn=None):
  model = Linear()
  frozen = model.init(jax.random.key(0), jnp.ones((2, 5)))
  adapter = {"out": {"a": 0.1 * jnp.ones((5, 2)), "b": jnp.zeros((2, 3))}}
  update = hl.local_update(loss_fn or mse(model), optax.sgd(0.1), steps=steps)
  fed = hl.FederatedRound(update, aggregator or aggregators.fedit(), num_clients=num_clients, local_leaves=r"out/b")
  return fed, frozen, adapter


def batches(clients, steps, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(clients, steps, batch, 5)).astype(np.float32)
  return {"x": x, "y": x[..., :3] * 2.0}


def test_batches_without_the_steps_axis_are_refused_naming_the_layout():
  """[C, B, ...] batches (no steps axis) are refused naming [C, S, B, ...], rather than trained
  as single-example steps."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  x = np.ones((4, 8, 5), np.float32)
  flat = {"x": x, "y": np.ones((4, 8), np.float32)}  # Per-example targets: [C, B].
  with pytest.raises(ValueError, match=r"batches\['y'\] has shape \(4, 8\).*\[C, S \+ h, B, \.\.\.\].*steps axis"):
    jax.jit(fed.step)(state, frozen, flat, jnp.arange(4), jnp.full(4, 0.25))
  with pytest.raises(ValueError, match=r"disagree on the steps or batch axis"):  # x [C, B, 5], y [C, B, 3].
    jax.jit(fed.step)(state, frozen, {"x": x, "y": x[..., :3]}, jnp.arange(4), jnp.full(4, 0.25))
  # Leaves that agree ([C, B, D] alone): only the declared number of steps can tell.
  fed, frozen, adapter = setup(steps=3)
  state = fed.init(jax.random.key(1), adapter)
  with pytest.raises(ValueError, match=r"local_update\(steps=3\)"):
    jax.jit(fed.step)(state, frozen, {"x": x, "y": x}, jnp.arange(4), jnp.full(4, 0.25))
  jax.jit(fed.step)(state, frozen, batches(4, 3), jnp.arange(4), jnp.full(4, 0.25))  # The right shape runs.


def test_batches_for_fewer_clients_than_ids_name_both_counts():
  """Used to fail inside JAX with 'axis 0 of argument inputs[3] ... float32[4,2]' (a rank mask)."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  with pytest.raises(ValueError, match=r"batches\['x'\] has shape \(3, 2, 4, 5\).*C = 4 sampled clients"):
    jax.jit(fed.step)(state, frozen, batches(3, 2), jnp.arange(4), jnp.full(4, 0.25))
  with pytest.raises(ValueError, match=r"weights must be \[C\] = \[4\]"):
    jax.jit(fed.step)(state, frozen, batches(4, 2), jnp.arange(4), jnp.full(3, 1 / 3))


def test_an_id_beyond_num_clients_is_refused_when_concrete_and_left_out_and_counted_under_jit():
  """Used to be clamped by JAX on the gather (the last client's local leaves) and dropped on
  the write-back. With 4 clients and ids [0, 2, 7], client 7 is now treated as padding."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  data, weights = batches(3, 2), jnp.array([0.2, 0.3, 0.5])
  with pytest.raises(ValueError, match=r"client ids \[7\] are outside \[0, num_clients=4\)"):
    fed.step(state, frozen, data, np.array([0, 2, 7], np.int32), weights)
  step = jax.jit(fed.step)
  got, metrics = step(state, frozen, data, jnp.array([0, 2, 7]), weights)
  padded, padded_metrics = step(state, frozen, data, jnp.array([0, 2, -1]), weights)
  assert int(metrics["invalid_client_ids"]) == 1 and int(padded_metrics["invalid_client_ids"]) == 0
  assert int(metrics["participants"]) == 2
  jax.tree.map(np.testing.assert_array_equal, got, padded)
  np.testing.assert_array_equal(got["clients"]["out/b"][3], state["clients"]["out/b"][3])  # Untouched.


def test_weights_are_relative_the_round_normalizes_them_and_weighted_mean_does_not():
  """Documented semantics: p_k = w_k / Σ w_j over the clients that reached the server."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  step, data, ids = jax.jit(fed.step), batches(2, 2), jnp.array([0, 1])
  counts, _ = step(state, frozen, data, ids, jnp.array([30.0, 10.0]))  # Example counts.
  normalized, _ = step(state, frozen, data, ids, jnp.array([0.75, 0.25]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), counts, normalized)
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_allclose(hl.weighted_mean(x, jnp.array([3.0, 1.0])), [6.0, 10.0])  # Σ w_k x_k as given.


def test_negative_nonfinite_or_all_zero_weights_are_refused_when_concrete_and_left_out_under_jit():
  """A negative, NaN or all-zero weight never enters the aggregate (unchecked, a negative one
  gives (t0 + t1 + t2 - t3) / 2 while `participants` says 3, and all-zero ones a NaN loss)."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  data, ids = batches(4, 2), np.arange(4, dtype=np.int32)
  with pytest.raises(ValueError, match=r"finite and >= 0.*entries \[3\] are \[-1.0\]"):
    fed.step(state, frozen, data, ids, np.array([1.0, 1.0, 1.0, -1.0], np.float32))
  with pytest.raises(ValueError, match=r"entries \[1\] are \[nan\]"):
    fed.step(state, frozen, data, ids, np.array([1.0, np.nan, 1.0, 1.0], np.float32))
  with pytest.raises(ValueError, match=r"weights are all zero"):
    fed.step(state, frozen, data, ids, np.zeros(4, np.float32))
  step = jax.jit(fed.step)
  got, metrics = step(state, frozen, data, jnp.arange(4), jnp.array([1.0, 1.0, 1.0, -1.0]))
  without, _ = step(state, frozen, data, jnp.array([0, 1, 2, -1]), jnp.array([1.0, 1.0, 1.0, 0.0]))
  assert int(metrics["invalid_weights"]) == 1 and int(metrics["participants"]) == 3
  np.testing.assert_allclose(got["global"]["out"]["a"], without["global"]["out"]["a"], rtol=1e-6)
  np.testing.assert_array_equal(got["clients"]["out/b"][3], state["clients"]["out/b"][3])  # Left out: not stored.


def test_a_client_sampled_twice_is_refused_when_concrete_and_its_second_copy_left_out_under_jit():
  """A repeated client id is aggregated once (unchecked, it is counted twice and its last copy
  stored)."""
  fed, frozen, adapter = setup()
  state = fed.init(jax.random.key(1), adapter)
  data, weights = batches(3, 2), jnp.full(3, 1 / 3)
  with pytest.raises(ValueError, match=r"client ids \[2\] are sampled more than once"):
    fed.step(state, frozen, data, np.array([2, 0, 2], np.int32), weights)
  step = jax.jit(fed.step)
  got, metrics = step(state, frozen, data, jnp.array([2, 0, 2]), weights)
  once, _ = step(state, frozen, data, jnp.array([2, 0, -1]), weights)
  assert int(metrics["invalid_client_ids"]) == 1 and int(metrics["participants"]) == 2
  jax.tree.map(np.testing.assert_array_equal, got, once)  # Client 2's first copy trains; its row holds that.


def test_rank_zero_adapters_and_client_ranks_outside_the_adapters_are_refused():
  """Rank 0 is refused by name everywhere (unchecked: a silent no-op adapter, and a bare
  ZeroDivisionError in lora_scale(8, 0))."""
  with pytest.raises(ValueError, match=r"LoRA rank must be an integer >= 1, got 0"):
    lora.lora_scale(8.0, 0)
  with pytest.raises(ValueError, match=r"LoRA rank must be an integer >= 1, got 0"):
    lora.init_lora(jax.random.key(0), {"out": (5, 3)}, rank=0)
  fed, frozen, _ = setup()
  with pytest.raises(ValueError, match=r"rank of LoRA layer 'out' must be an integer >= 1, got 0"):
    fed.init(jax.random.key(1), {"out": {"a": jnp.zeros((5, 0)), "b": jnp.zeros((0, 3))}})
  model = Linear()
  hetero = hl.FederatedRound(
    hl.local_update(mse(model), optax.sgd(0.1)),
    aggregators.hetlora(),
    num_clients=4,
    client_ranks=np.array([1, 2, 3, 2]),
  )
  with pytest.raises(ValueError, match=r"client_ranks must be \[num_clients\] = \[4\] ranks in \[1, r_max = 2\]"):
    hetero.init(jax.random.key(1), lora.init_lora(jax.random.key(0), {"out": (5, 3)}, rank=2))


def test_a_loss_returning_a_scalar_names_the_loss_contract():
  """Used to be JAX's 'expected function with aux output to return a two-element tuple ...'."""
  model = Linear()
  scalar_loss = lambda t, f, batch, rng: mse(model)(t, f, batch, rng)[0]
  fed, frozen, adapter = setup(loss_fn=scalar_loss)
  state = fed.init(jax.random.key(1), adapter)
  with pytest.raises(TypeError, match=r"loss_fn must return \(loss, aux\).*loss_fn\(trainable, frozen, batch, rng\)"):
    jax.jit(fed.step)(state, frozen, batches(4, 2), jnp.arange(4), jnp.full(4, 0.25))
  per_example = lambda t, f, batch, rng: (
    jnp.sum((lora.apply(model, f, t, batch["x"], scale=1.0) - batch["y"]) ** 2, axis=-1),
    {},
  )
  fed, frozen, adapter = setup(loss_fn=per_example)
  with pytest.raises(TypeError, match=r"float scalar loss.*float32\[4\]"):
    jax.jit(fed.step)(fed.init(jax.random.key(1), adapter), frozen, batches(4, 2), jnp.arange(4), jnp.full(4, 0.25))


def test_held_out_steps_of_the_synthesizer_are_required():
  """HyperLoRA's synthesizer holds out the last step: given S steps where S + 1 are due, it used
  to take the last training step as its held-out step."""
  synth = hl.hyper.hyperlora_synthesizer(hl.hyper.SynthesisConfig(scale=1.0, rank=2), optax.adam(1e-3, eps_root=1e-16))
  assert synth.capabilities.heldout_steps == 1
  fed, frozen, adapter = setup(steps=3, aggregator=synth)
  state = fed.init(jax.random.key(1), adapter)
  with pytest.raises(ValueError, match=r"3 steps, expected S \+ h = 3 \+ 1"):
    jax.jit(fed.step)(state, frozen, batches(4, 3), jnp.arange(4), jnp.full(4, 0.25))
  jax.jit(fed.step)(state, frozen, batches(4, 4), jnp.arange(4), jnp.full(4, 0.25))
  fed, frozen, adapter = setup(aggregator=synth)  # Without steps=: at least one training step.
  with pytest.raises(ValueError, match=r"holds out the last 1: give S \+ 1"):
    jax.jit(fed.step)(fed.init(jax.random.key(1), adapter), frozen, batches(4, 1), jnp.arange(4), jnp.full(4, 0.25))


def test_signatures_of_the_wrong_width_or_count_are_refused_at_init():
  """Used to surface as a Flax ScopeParamShapeError inside the generator."""
  targets = {"out": (5, 3)}
  generator = hl.hyper.make_generator(
    hl.hyper.LoraGenerator(targets=targets, rank=2, hidden=8), loss="vjp", optimizer=optax.adam(1e-2), signature_dim=6
  )
  model = Linear()
  fed = hl.FederatedRound(
    hl.local_update(mse(model), optax.sgd(0.1)),
    aggregators.fedit(),
    num_clients=4,
    plugins=(hl.hyper.generator_plugin(generator),),
  )
  adapter = lora.init_lora(jax.random.key(0), targets, 2)
  with pytest.raises(ValueError, match=r"reads signatures of width 6.*\[N, D\] = \[4, 5\]"):
    fed.init(jax.random.key(1), adapter, jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match=r"\[N, D\] with N = num_clients = 4.*\(3, 6\)"):
    fed.init(jax.random.key(1), adapter, jnp.zeros((3, 6)))
  assert fed.init(jax.random.key(1), adapter, jnp.zeros((4, 6)))["signatures"].shape == (4, 6)


def test_make_generator_needs_a_scale_only_for_the_loss_that_reads_it():
  module = hl.hyper.LoraGenerator(targets={"out": (5, 3)}, rank=2, hidden=8)
  hl.hyper.make_generator(module, loss="vjp", optimizer=optax.adam(1e-2), signature_dim=2)
  with pytest.raises(ValueError, match="give scale=s"):
    hl.hyper.make_generator(module, loss="product_distill", optimizer=optax.adam(1e-2), signature_dim=2)
