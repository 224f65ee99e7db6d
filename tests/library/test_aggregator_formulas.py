"""Each method's math against an independent formula or a hand count, on non-square layers.

Each test names the deliberate bug it catches:
LoRA-FAIR's correction with its sign flipped or without its λ‖ΔB‖ term, the server overwriting
the base delta instead of adding to it, FedSA keeping A local instead of B, FedOpt's momentum
applied wrongly, the head shared under head_policy=local, and every method's bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hyperlora_jax as hl
from hyperlora_jax import aggregators, federated, lora
from experiments.runner import methods
from hyperlora_jax.aggregators.fair import fair_objective, fit_delta_b
from tests.library.test_core import OneLayer

D_IN, D_OUT, R, C = 5, 3, 2, 3
WEIGHTS = np.array([0.5, 0.3, 0.2], np.float32)
IDS = jnp.array([0, 2, 3])


def _random(seed, *shape):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


# ------------------------------------------------------------------ LoRA-FAIR


def _fair_objective_numpy(delta, a_bar, b_bar, target, lam):
  candidate = a_bar @ (b_bar + delta)
  cos = np.sum(target * candidate) / (np.linalg.norm(target) * np.linalg.norm(candidate))
  return -cos + lam * np.linalg.norm(delta)


def _fair_gradient_numpy(delta, a_bar, b_bar, target, lam):
  """d/dΔ of −cos(T, ā(b̄+Δ)) + λ‖Δ‖_F, by hand."""
  candidate = a_bar @ (b_bar + delta)
  t_norm, c_norm = np.linalg.norm(target), np.linalg.norm(candidate)
  dcos_dc = target / (t_norm * c_norm) - np.sum(target * candidate) * candidate / (t_norm * c_norm**3)
  norm = np.linalg.norm(delta)
  return -a_bar.T @ dcos_dc + (lam * delta / norm if norm > 0 else 0.0)


def test_fair_objective_is_minus_cosine_plus_lambda_norm():
  a_bar, b_bar, target, delta = _random(0, D_IN, R), _random(1, R, D_OUT), _random(2, D_IN, D_OUT), _random(3, R, D_OUT)
  for lam in (0.0, 0.01, 0.7):  # A flipped sign or a dropped λ term changes these values.
    np.testing.assert_allclose(
      fair_objective(delta, a_bar, b_bar, target, lam),
      _fair_objective_numpy(delta, a_bar, b_bar, target, lam),
      rtol=1e-5,
    )


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_fair_fit_equals_adam_on_the_hand_gradient(lam):
  """ΔB* after 15 Adam steps from 0, against Adam written out on the analytic gradient."""
  a_bar, b_bar, target = _random(4, D_IN, R), _random(5, R, D_OUT), _random(6, D_IN, D_OUT)
  lr, steps, (b1, b2, eps) = 0.05, 15, (0.9, 0.999, 1e-8)
  delta, m, v = np.zeros((R, D_OUT)), np.zeros((R, D_OUT)), np.zeros((R, D_OUT))
  for t in range(1, steps + 1):
    g = _fair_gradient_numpy(delta, a_bar.astype(np.float64), b_bar.astype(np.float64), target.astype(np.float64), lam)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    delta = delta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  got = fit_delta_b(a_bar, b_bar, target, lam=lam, steps=steps, learning_rate=lr)
  np.testing.assert_allclose(got, delta, atol=2e-4)
  # And the fit does what it is for: a higher cosine with the exact product than ΔB = 0.
  assert _fair_objective_numpy(np.asarray(got), a_bar, b_bar, target, 0.0) < _fair_objective_numpy(
    0 * delta, a_bar, b_bar, target, 0.0
  )


def test_lora_fair_round_broadcasts_the_mean_a_and_the_corrected_mean_b():
  clients = {"l": {"a": _random(7, C, D_IN, R), "b": _random(8, C, R, D_OUT)}}
  new, _, _ = aggregators.lora_fair(lam=0.01, steps=20, learning_rate=1e-2).aggregate(
    {}, None, clients, jnp.asarray(WEIGHTS)
  )
  a_bar = np.einsum("c,cir->ir", WEIGHTS, clients["l"]["a"])
  b_bar = np.einsum("c,cro->ro", WEIGHTS, clients["l"]["b"])
  target = np.einsum("c,cir,cro->io", WEIGHTS, clients["l"]["a"], clients["l"]["b"])
  np.testing.assert_allclose(new["l"]["a"], a_bar, rtol=1e-5)
  expected = b_bar + np.asarray(fit_delta_b(a_bar, b_bar, target, lam=0.01, steps=20, learning_rate=1e-2))
  np.testing.assert_allclose(new["l"]["b"], expected, rtol=1e-4, atol=1e-6)
  assert np.abs(expected - b_bar).max() > 1e-3  # The correction is really there.


# ------------------------------------------------------------------ rounds on a real model


def _round(aggregator, **kwargs):
  """A real jitted-able round on a one-layer model with a 5 -> 3 LoRA target (rank 2) and a
  spy plug-in recording each round's returned client params: (round, frozen, adapter, batches, seen)."""
  model = OneLayer()
  frozen = model.init(jax.random.key(0), jnp.ones((2, D_IN)))
  adapter = {
    "lora": {"out": {"a": jnp.asarray(_random(9, D_IN, R)), "b": jnp.asarray(0.1 * _random(10, R, D_OUT))}},
    "head": {"w": jnp.zeros((D_OUT,))},
  }

  def loss_fn(trainable, frozen, batch, rng):
    pred = lora.apply(model, frozen, trainable["lora"], batch["x"], scale=1.0) + trainable["head"]["w"]
    return jnp.mean((pred - batch["y"]) ** 2), {}

  seen = []
  spy = hl.Plugin(
    name="spy",
    init=lambda rng: {},
    client_offsets=lambda state, sig, ids: {
      "out": {"a": jnp.zeros((ids.shape[0], D_IN, R)), "b": jnp.zeros((ids.shape[0], R, D_OUT))}
    },
    after_aggregation=lambda state, outcome: seen.append(outcome) or state,
  )
  fed = federated.FederatedRound(
    hl.local_update(loss_fn, optax.sgd(0.2)), aggregator, num_clients=4, plugins=(spy,), **kwargs
  )
  batches = {"x": jnp.asarray(_random(11, C, 3, 4, D_IN)), "y": jnp.asarray(_random(12, C, 3, 4, D_OUT))}
  return fed, frozen, adapter, batches, seen


def _add_base_delta(frozen, base_delta):
  kernel = frozen["params"]["out"]["kernel"] + base_delta["lora/out"] if "lora/out" in base_delta else None
  return {"params": {"out": {**frozen["params"]["out"], "kernel": kernel}}}


def test_fedex_base_delta_accumulates_over_rounds():
  """W0 gains s(Σp_k a_k b_k − ā b̄) *every* round: after two rounds the base delta is the sum
  of both rounds' residuals (an overwrite keeps only the last)."""
  fed, frozen, adapter, batches, seen = _round(
    aggregators.fedex_lora(1.0),
    apply_base_delta=lambda f, d: {
      "params": {"out": {**f["params"]["out"], "kernel": f["params"]["out"]["kernel"] + d["out"]}}
    },
  )
  state = fed.init(jax.random.key(1), adapter)
  residuals = []
  for _ in range(2):
    state, _ = fed.step(state, frozen, batches, IDS, jnp.asarray(WEIGHTS))
    a, b = (np.asarray(seen[-1].client_params["lora"]["out"][k]) for k in ("a", "b"))
    exact = np.einsum("c,cir,cro->io", WEIGHTS, a, b)
    residuals.append(exact - np.einsum("c,cir->ir", WEIGHTS, a) @ np.einsum("c,cro->ro", WEIGHTS, b))
  assert np.abs(residuals[0]).max() > 1e-4 and np.abs(residuals[1]).max() > 1e-4
  np.testing.assert_allclose(state["base_delta"]["out"], residuals[0] + residuals[1], atol=1e-6)


def test_fedsa_aggregates_a_and_keeps_each_clients_b():
  method = methods.fedsa_lora(_config(head_policy="shared"))
  fed, frozen, adapter, batches, seen = _round(aggregators.fedit(), local_leaves=method.local_regex)
  state = fed.init(jax.random.key(1), adapter)
  new, _ = fed.step(state, frozen, batches, IDS, jnp.asarray(WEIGHTS))
  trained = seen[-1].client_params["lora"]["out"]
  np.testing.assert_allclose(
    new["global"]["lora"]["out"]["a"], np.einsum("c,cir->ir", WEIGHTS, trained["a"]), rtol=1e-5
  )
  np.testing.assert_array_equal(new["global"]["lora"]["out"]["b"], adapter["lora"]["out"]["b"])  # Not the server's.
  store = new["clients"]
  assert set(store) == {"lora/out/b"}  # B is what clients keep; A is not stored.
  for k, client in enumerate(np.asarray(IDS)):
    np.testing.assert_array_equal(store["lora/out/b"][client], trained["b"][k])
  np.testing.assert_array_equal(store["lora/out/b"][1], adapter["lora"]["out"]["b"])  # Client 1 did not take part.


def test_head_policy_local_keeps_the_head_out_of_the_aggregate():
  method = methods.fedit(_config(head_policy="local"))
  fed, frozen, adapter, batches, seen = _round(aggregators.fedit(), local_leaves=method.local_regex)
  new, _ = fed.step(fed.init(jax.random.key(1), adapter), frozen, batches, IDS, jnp.asarray(WEIGHTS))
  trained = seen[-1].client_params
  np.testing.assert_array_equal(new["global"]["head"]["w"], adapter["head"]["w"])
  assert np.abs(np.asarray(trained["head"]["w"])).max() > 1e-4  # Clients did train their heads ...
  assert set(new["clients"]) == {"head/w"}
  np.testing.assert_array_equal(new["clients"]["head/w"][2], trained["head"]["w"][1])  # ... and keep them.
  np.testing.assert_allclose(
    new["global"]["lora"]["out"]["b"], np.einsum("c,cro->ro", WEIGHTS, trained["lora"]["out"]["b"]), rtol=1e-5
  )


def test_fedopt_with_momentum_follows_the_heavy_ball_formula():
  """x_{t+1} = x_t − η m_t, m_t = μ m_{t−1} + (x_t − Σ_k p_k x_k^t), over two rounds."""
  lr, mu = 0.7, 0.9
  fed, frozen, adapter, batches, seen = _round(aggregators.fedit(), server_optimizer=optax.sgd(lr, momentum=mu))
  state = fed.init(jax.random.key(1), adapter)
  x = jax.tree.map(np.asarray, adapter)
  m = jax.tree.map(np.zeros_like, x)
  for _ in range(2):
    state, _ = fed.step(state, frozen, batches, IDS, jnp.asarray(WEIGHTS))
    mean = jax.tree.map(lambda t: np.einsum("c,c...->...", WEIGHTS, np.asarray(t)), seen[-1].client_params)
    m = jax.tree.map(lambda m_, x_, a: mu * m_ + (x_ - a), m, x, mean)
    x = jax.tree.map(lambda x_, m_: x_ - lr * m_, x, m)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6), state["global"], x)


def test_rslora_scale_is_alpha_over_root_rank():
  assert lora.lora_scale(8.0, 4, rslora=False) == pytest.approx(2.0)
  assert lora.lora_scale(8.0, 4, rslora=True) == pytest.approx(4.0)
  assert lora.lora_scale(8.0, 16, rslora=True) == pytest.approx(2.0)


def _config(**fed):
  """A method's settings from the smoke config with `fed` fields changed."""
  from configs import default

  config = default.get_config("smoke")
  for key, value in fed.items():
    config.fed[key] = value
  return methods.method_settings(config)


# ------------------------------------------------------------------ bytes, counted by hand

# The smoke model: LoRA rank 4 on query and value (16 x 16 each); head 16 x 10 + 10; float32.
LORA_A = LORA_B = 2 * 16 * 4 * 4  # 512 bytes of A (and of B) over both layers.
HEAD = (16 * 10 + 10) * 4  # 680 bytes.
SHARED = LORA_A + LORA_B + HEAD  # 1,704 bytes per participant.
N = 4  # Participants per smoke round (of 6 clients).
SIGNATURE = 10 + 16 + 8 * 9 // 2  # Label histogram + feature mean + upper triangle of QᵀΣQ (q = 8).
EXPECTED_BYTES = {  # method: ((up, down) in round 0, (up, down) in round 1)
  "fedit": ((N * SHARED,) * 2,) * 2,
  "flexlora": ((N * SHARED,) * 2,) * 2,
  "hetlora": ((N * SHARED,) * 2,) * 2,
  "lora_fair": ((N * SHARED,) * 2,) * 2,
  "pfedhn": ((N * SHARED,) * 2,) * 2,  # Generated factors go down and trained ones up.
  "ffa_lora": ((N * (LORA_B + HEAD),) * 2,) * 2,  # A frozen: never sent.
  "fedsa_lora": ((N * (LORA_A + HEAD),) * 2,) * 2,  # B local: never sent.
  "rolora": ((N * (LORA_B + HEAD),) * 2, (N * (LORA_A + HEAD),) * 2),  # B, then A.
  "fedex_lora": ((N * SHARED, N * (SHARED + 2 * 16 * 16 * 4)),) * 2,  # + the full-rank residual.
  "flora": ((N * SHARED, N * SHARED + N * (N - 1) * (LORA_A + LORA_B)),) * 2,  # + the others' stacks.
  # + the candidate down and its gradient up (meta-objective); + every client's signature once.
  "hyperlora": ((2 * N * SHARED + 6 * SIGNATURE * 4, 2 * N * SHARED), (2 * N * SHARED, 2 * N * SHARED)),
  "local_only": ((0, 0),) * 2,
  "centralized": ((0, 0),) * 2,
}


def test_every_methods_bytes_match_a_hand_count(smoke_config):
  from experiments.runner import experiment, records

  assert set(EXPECTED_BYTES) == set(methods.METHODS)
  ids = np.array([0, 1, 2, 3])
  for method, expected in EXPECTED_BYTES.items():
    smoke_config.method = method
    exp = experiment.build_experiment(smoke_config, log=lambda _: None)
    got = (records.communication_bytes(exp, 0, ids), records.communication_bytes(exp, 1, ids))
    assert got == expected, method
