"""Injected faults, robust aggregation and DP-FedAvg, against hand counts and independent formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from hyperlora_jax import aggregators, faults, privacy
from hyperlora_jax.aggregators import robust
from tests.library.test_aggregator_formulas import _round, D_IN, D_OUT, R


def _faults(**kwargs):
  return faults.Faults(**kwargs)


def test_fault_draw_gives_exact_disjoint_counts_among_valid_clients_reproducibly():
  spec = _faults(dropout=0.2, straggler=0.1, nonfinite=0.1, byzantine=0.3)
  valid = jnp.array([True] * 10 + [False] * 6)  # 6 padding clients never get a fault.
  masks = faults.draw(spec, jax.random.key(3), valid)
  counts = {k: int(jnp.sum(m)) for k, m in masks.items()}
  assert counts == {"dropout": 2, "straggler": 1, "nonfinite": 1, "byzantine": 3}
  stacked = np.stack([np.asarray(m) for m in masks.values()])
  assert stacked.sum(axis=0).max() == 1 and not stacked[:, 10:].any()
  again = faults.draw(spec, jax.random.key(3), valid)
  assert all(np.array_equal(masks[k], again[k]) for k in masks)
  other = faults.draw(spec, jax.random.key(4), valid)
  assert any(not np.array_equal(masks[k], other[k]) for k in masks)


def test_invalid_fault_specs_are_named():
  with pytest.raises(ValueError, match="faults.dropout"):
    _faults(dropout=1.5)
  with pytest.raises(ValueError, match="add up"):
    _faults(dropout=0.6, byzantine=0.6)
  with pytest.raises(ValueError, match="faults.byzantine_kind"):
    _faults(byzantine_kind="gaussian")


def test_byzantine_updates_follow_their_formulas():
  starts = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 2)), jnp.float32)}
  trained = {"w": starts["w"] + 0.5}
  masks = {"nonfinite": jnp.array([False, False, True]), "byzantine": jnp.array([False, True, False])}
  for kind, expected in (("sign_flip", starts["w"][1] - 3 * 0.5), ("scale", starts["w"][1] + 3 * 0.5)):
    out = faults.corrupt(
      _faults(byzantine=0.3, byzantine_kind=kind, byzantine_scale=3.0), trained, starts, masks, jax.random.key(0)
    )["w"]
    np.testing.assert_allclose(out[1], expected, rtol=1e-6)
    np.testing.assert_array_equal(out[0], trained["w"][0])  # Honest clients untouched.
    assert not np.isfinite(out[2]).any()
  out = faults.corrupt(
    _faults(byzantine=0.3, byzantine_kind="random", byzantine_scale=3.0), trained, starts, masks, jax.random.key(0)
  )["w"]
  np.testing.assert_allclose(
    np.linalg.norm(out[1] - starts["w"][1]), 3.0 * np.linalg.norm(np.full((4, 2), 0.5)), rtol=1e-5
  )


def test_a_straggler_does_only_its_first_steps():
  fed, frozen, adapter, batches, _ = _round(aggregators.fedit())
  one = jax.tree.map(lambda x: x[0], batches)
  full, _ = fed.client_update(adapter, frozen, one, jax.random.key(0))
  partial, metrics = fed.client_update(adapter, frozen, one, jax.random.key(0), steps_done=jnp.array(1))
  first, first_metrics = fed.client_update(adapter, frozen, jax.tree.map(lambda x: x[:1], one), jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), partial, first)
  assert float(metrics["examples"]) == float(first_metrics["examples"]) == 4.0
  assert not np.allclose(full["lora"]["out"]["b"], partial["lora"]["out"]["b"])


def test_a_round_with_injected_faults_detects_and_counts_them():
  spec = _faults(dropout=1 / 3, nonfinite=1 / 3)
  fed, frozen, adapter, batches, seen = _round(aggregators.fedit(), faults=spec)
  state = fed.init(jax.random.key(1), adapter)
  weights = jnp.array([0.5, 0.3, 0.2])
  new, metrics = fed.step(state, frozen, batches, jnp.array([0, 2, 3]), weights)
  assert int(metrics["faults_dropout"]) == 1 and int(metrics["faults_nonfinite"]) == 1
  assert int(metrics["nonfinite_clients"]) == 1 and int(metrics["participants"]) == 1
  outcome = seen[-1]
  honest = int(np.argmax(np.asarray(outcome.weights)))
  assert float(outcome.weights[honest]) == 1.0  # The one client that arrived carries the round.
  jax.tree.map(lambda g, t: np.testing.assert_allclose(g, t[honest], rtol=1e-6), new["global"], outcome.client_params)


# ------------------------------------------------------------------ robust statistics


def test_coordinate_median_and_trimmed_mean_match_numpy_and_scipy():
  x = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
  present = np.array([1, 1, 0, 1, 1, 1, 1], bool)  # Client 2 absent: never counted.
  x[2] = 1e9
  np.testing.assert_allclose(
    robust.coordinate_median(jnp.asarray(x), jnp.asarray(present)), np.median(x[present], axis=0), rtol=1e-6
  )
  np.testing.assert_allclose(
    robust.trimmed_mean(jnp.asarray(x), jnp.asarray(present), 0.2),
    scipy.stats.trim_mean(x[present], 0.2, axis=0),
    rtol=1e-5,
  )


def test_geometric_median_minimizes_the_weighted_distance_sum():
  x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
  w = np.array([0.3, 0.2, 0.2, 0.1, 0.2, 0.0], np.float32)
  x[5] = 1e6  # Weight 0: no pull.
  z = np.asarray(robust.geometric_median(jnp.asarray(x), jnp.asarray(w), iterations=200))
  cost = lambda p: float(np.sum(w * np.linalg.norm(x - p, axis=1)))
  best = scipy.optimize.minimize(
    cost, w @ x, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 20000}
  ).x
  assert cost(z) <= cost(best) + 1e-4


def test_robust_factors_survive_a_huge_byzantine_client_where_the_mean_does_not():
  honest = np.random.default_rng(3).normal(size=(4, D_IN, R)).astype(np.float32) * 0.1 + 1.0
  clients = {
    "l": {
      "a": np.concatenate([honest, np.full((1, D_IN, R), -1e4, np.float32)]),
      "b": np.ones((5, R, D_OUT), np.float32),
    }
  }
  weights = jnp.full(5, 0.2)
  mean, _, _ = aggregators.fedit().aggregate({}, None, clients, weights)
  assert float(jnp.min(mean["l"]["a"])) < -1000
  for rule in robust.ROBUST_RULES:
    out, _, _ = aggregators.robust_factors(rule, trim=0.2).aggregate({}, None, clients, weights)
    assert np.abs(np.asarray(out["l"]["a"]) - 1.0).max() < 0.5, rule


def test_robust_products_take_the_statistic_of_products_then_the_best_rank_r():
  rng = np.random.default_rng(4)
  clients = {
    "lora": {
      "l": {
        "a": rng.normal(size=(5, D_IN, R)).astype(np.float32),
        "b": rng.normal(size=(5, R, D_OUT)).astype(np.float32),
      }
    },
    "head": {"w": rng.normal(size=(5, 3)).astype(np.float32)},
  }
  global_params = jax.tree.map(lambda x: x[0], clients)
  weights = jnp.full(5, 0.2)
  out, _, _ = aggregators.robust_products("median", 2.0).aggregate({}, global_params, clients, weights)
  products = 2.0 * np.einsum("cir,cro->cio", clients["lora"]["l"]["a"], clients["lora"]["l"]["b"])
  u, s, vt = np.linalg.svd(np.median(products, axis=0), full_matrices=False)
  np.testing.assert_allclose(
    2.0 * out["lora"]["l"]["a"] @ out["lora"]["l"]["b"], (u[:, :R] * s[:R]) @ vt[:R], atol=1e-4
  )
  np.testing.assert_allclose(out["head"]["w"], np.median(clients["head"]["w"], axis=0), rtol=1e-6)


def test_clipping_bounds_each_clients_update_and_keeps_its_direction():
  starts = {"w": jnp.zeros((3, 4)), "v": jnp.ones((3, 2))}
  params = {"w": jnp.array([[3.0, 4.0, 0, 0], [0.1, 0, 0, 0], [0, 0, 30.0, 40.0]]), "v": jnp.ones((3, 2))}
  clipped, norms = robust.clip_to_norm(params, starts, 1.0)
  np.testing.assert_allclose(norms, [5.0, 0.1, 50.0], rtol=1e-6)
  np.testing.assert_allclose(clipped["w"][0], [0.6, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(clipped["w"][1], params["w"][1])  # Inside the ball: unchanged.
  np.testing.assert_allclose(clipped["w"][2], [0, 0, 0.6, 0.8], rtol=1e-6)


# ------------------------------------------------------------------ DP-FedAvg


def test_dp_fedavg_is_the_uniform_mean_of_clipped_updates_plus_calibrated_noise():
  n, dim = 4, 20000
  global_params = {"w": jnp.zeros(dim)}
  client = np.zeros((5, dim), np.float32)
  client[:, 0] = [10.0, 0.5, -10.0, 0.25, 99.0]
  weights = jnp.array([0.7, 0.1, 0.1, 0.1, 0.0])  # Data weights are ignored; client 4 is absent.
  quiet = aggregators.dp_fedavg(clip_norm=1.0, noise_multiplier=0.0)
  out, _, _ = quiet.aggregate(quiet.init(global_params, jax.random.key(0)), global_params, {"w": client}, weights)
  np.testing.assert_allclose(out["w"][0], (1.0 + 0.5 - 1.0 + 0.25) / n, rtol=1e-6)
  noisy = aggregators.dp_fedavg(clip_norm=2.0, noise_multiplier=1.5)
  state = noisy.init(global_params, jax.random.key(0))
  out, _, state2 = noisy.aggregate(state, global_params, {"w": client}, weights)
  np.testing.assert_allclose(np.std(np.asarray(out["w"][1:])), 1.5 * 2.0 / n, rtol=0.03)
  again, _, _ = noisy.aggregate(state2, global_params, {"w": client}, weights)
  assert not np.allclose(out["w"][1:], again["w"][1:])  # Fresh noise every round.


def test_privacy_epsilon_from_the_accountant_behaves_and_bounds_the_classic_rdp_conversion():
  eps = [privacy.epsilon(r, 1.0, 10, 20, 1e-5) for r in (1, 10, 30)]
  assert eps[0] < eps[1] < eps[2] < math.inf
  assert privacy.epsilon(30, 2.0, 10, 20, 1e-5) < eps[2]
  assert privacy.epsilon(30, 1.0, 5, 20, 1e-5) < eps[2]  # Less sampling, more amplification.
  assert privacy.epsilon(1, 1.0, 10, 20, 1e-5, signature_noise_multiplier=0.0) == math.inf
  with_signatures = privacy.epsilon(10, 1.0, 10, 20, 1e-5, signature_noise_multiplier=2.0)
  assert with_signatures > eps[1]
  # One round that takes everyone is the Gaussian mechanism with multiplier σ/2 (REPLACE_ONE):
  # ε <= min_α α/(2σ'²) + log(1/δ)/(α − 1), the classic RDP-to-DP conversion.
  sigma, delta = 4.0, 1e-5
  classic = min(a / (2 * (sigma / 2) ** 2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
  single = privacy.epsilon(1, sigma, 20, 20, delta)
  assert 0.5 * classic < single <= classic + 1e-6


def test_robust_and_dp_config_options_reach_the_round(smoke_config, tmp_path):
  from experiments.runner import reporting
  from experiments.runner.config_validation import ConfigError
  from experiments.runner.experiment import build_experiment
  from experiments.runner.train import train_and_evaluate

  smoke_config.robust.rule = "geometric_median"
  assert (
    build_experiment(smoke_config, log=lambda _: None).fed_round.aggregator.capabilities.name
    == "robust_factors[geometric_median]"
  )
  smoke_config.method = "hyperlora"
  with pytest.raises(ConfigError, match="^robust.rule"):
    build_experiment(smoke_config, log=lambda _: None)
  smoke_config.method, smoke_config.robust.rule = "fedit", "mean"
  smoke_config.dp.noise_multiplier, smoke_config.fed.num_rounds = 1.0, 2
  smoke_config.faults.byzantine, smoke_config.faults.byzantine_scale = 0.25, 5.0
  train_and_evaluate(smoke_config, str(tmp_path), progress=False, log=lambda _: None)
  records = reporting.read_metrics(str(tmp_path))
  expected = [
    privacy.epsilon(r, 1.0, smoke_config.fed.clients_per_round, smoke_config.data.num_clients, 1e-5) for r in (1, 2)
  ]
  assert [r["dp_epsilon"] for r in records] == pytest.approx(expected)
  assert [r["faults_byzantine"] for r in records] == [1, 1]


def test_a_clipped_plugin_learns_from_updates_clipped_from_each_clients_start():
  from hyperlora_jax.federated import Plugin, RoundOutcome
  from hyperlora_jax.hyper.plugins import clip_plugin_updates

  seen = []
  plugin = Plugin(
    "probe",
    init=lambda rng: {},
    client_offsets=None,
    after_aggregation=lambda state, outcome: seen.append(outcome.client_params) or state,
  )
  starts = {"w": jnp.array([[1.0, 1.0], [0.0, 0.0]])}
  trained = {"w": jnp.array([[7.0, 9.0], [0.3, -0.4]])}  # Updates of norm 10 (6, 8) and 0.5.
  outcome = RoundOutcome(
    new_global={"w": jnp.zeros(2)},
    client_params=trained,
    weights=jnp.array([0.5, 0.5]),
    client_ids=jnp.array([0, 1]),
    signatures=jnp.zeros((2, 0)),
    rank_masks=jnp.ones((2, 1)),
    client_starts=starts,
  )
  clip_plugin_updates(plugin, 1.0).after_aggregation({}, outcome)
  np.testing.assert_allclose(seen[0]["w"], [[1.6, 1.8], [0.3, -0.4]], rtol=1e-6)  # (6, 8)/10 from (1, 1).


# ------------------------------------------------------------------ clipping from each client's start
# Where clients start from different points, an update is θ_k − θ⁰_k from *its* start, not from
# the global model: FedSA-LoRA keeps each client's B (and a local head its head), pFedHN and
# HyperLoRA add a generated offset. Clipping ‖θ_k − global‖ instead bounds the wrong vector and,
# under DP-FedAvg, is the wrong sensitivity. These tests compare real rounds with
# `robust.clip_norm` (clip_updates) and `dp.noise_multiplier` (DP-FedAvg, noise 0 so the mean is
# visible) against the clipped means computed here from starts built independently of the round.

CLIP = 0.05
STORED_B = np.asarray(0.5 * jax.random.normal(jax.random.key(21), (4, R, D_OUT)), np.float32)
OFFSETS = {
  "a": np.asarray(0.4 * jax.random.normal(jax.random.key(22), (4, D_IN, R)), np.float32),
  "b": np.asarray(0.4 * jax.random.normal(jax.random.key(23), (4, R, D_OUT)), np.float32),
}


def _round_from_own_starts(aggregator, start):
  """A round on `_round`'s one-layer model (5 -> 3, rank 2) whose clients start apart:
  start="local_b" keeps B on the clients (FedSA-LoRA), with a different stored B per client;
  start="offsets" adds a per-client offset to both factors (a generator plug-in, as pFedHN).
  Returns (new state, the trained client params [C, ...], each client's start [C, ...] as
  built here, the round's global params before the step, whether B is local)."""
  from hyperlora_jax.federated import FederatedRound, Plugin
  from tests.library.test_aggregator_formulas import C, IDS, WEIGHTS, _round

  fed, frozen, adapter, batches, _ = _round(aggregators.fedit())  # Its model, loss, batches.
  seen = []
  ids = np.asarray(IDS)
  offsets = lambda state, sig, client_ids: {"out": {k: jnp.asarray(v)[client_ids] for k, v in OFFSETS.items()}}
  probe = Plugin(
    "probe",
    init=lambda rng: {},
    after_aggregation=lambda state, outcome: seen.append(outcome) or state,
    client_offsets=offsets
    if start == "offsets"
    else (
      lambda state, sig, client_ids: {
        "out": {"a": jnp.zeros((client_ids.shape[0], D_IN, R)), "b": jnp.zeros((client_ids.shape[0], R, D_OUT))}
      }
    ),
  )
  fed = FederatedRound(
    fed.client_update,
    aggregator,
    num_clients=4,
    plugins=(probe,),
    local_leaves=r"lora/.*/b" if start == "local_b" else "",
  )
  state = fed.init(jax.random.key(1), adapter)
  if start == "local_b":
    state = state.replace(clients={"lora/out/b": jnp.asarray(STORED_B)})
  new, _ = fed.step(state, frozen, batches, IDS, jnp.asarray(WEIGHTS))
  g = jax.tree.map(np.asarray, adapter)
  starts = {
    "lora": {"out": {"a": np.stack([g["lora"]["out"]["a"]] * C), "b": np.stack([g["lora"]["out"]["b"]] * C)}},
    "head": {"w": np.stack([g["head"]["w"]] * C)},
  }
  if start == "local_b":
    starts["lora"]["out"]["b"] = STORED_B[ids]
  else:
    starts["lora"]["out"] = {k: starts["lora"]["out"][k] + OFFSETS[k][ids] for k in ("a", "b")}
  trained = jax.tree.map(np.asarray, seen[-1].client_params)
  return new, trained, starts, g, start == "local_b"


def _clipped_oracle(trained, starts, max_norm):
  """starts_k + min(1, c/‖u_k‖) u_k with u_k = trained_k − starts_k over all leaves; and ‖u_k‖."""
  updates = jax.tree.map(np.subtract, trained, starts)
  norms = np.sqrt(
    sum(np.sum(u.reshape(u.shape[0], -1).astype(np.float64) ** 2, axis=1) for u in jax.tree.leaves(updates))
  )
  factor = np.minimum(1.0, max_norm / norms)
  return jax.tree.map(lambda s, u: s + u * factor.reshape((-1,) + (1,) * (u.ndim - 1)), starts, updates), norms


@pytest.mark.parametrize("start", ["local_b", "offsets"])
@pytest.mark.parametrize("rule", ["clip_updates", "dp_fedavg"])
def test_updates_are_clipped_from_each_clients_own_start(rule, start):
  """Real settings: `robust.clip_norm` or DP-FedAvg with FedSA-LoRA (or a local head), and
  clipping with a generator method. The mutant that clips θ_k − global misses by > 10%."""
  from tests.library.test_aggregator_formulas import C, WEIGHTS

  aggregator = (
    aggregators.clip_updates(aggregators.fedit(), CLIP)
    if rule == "clip_updates"
    else aggregators.dp_fedavg(clip_norm=CLIP, noise_multiplier=0.0)
  )
  new, trained, starts, global_params, b_is_local = _round_from_own_starts(aggregator, start)
  weights = WEIGHTS if rule == "clip_updates" else np.full(C, 1.0 / C, np.float32)  # DP-FedAvg: uniform.
  clipped, norms = _clipped_oracle(trained, starts, CLIP)
  assert norms.min() > 2 * CLIP  # Every client's update is really clipped.
  expected = jax.tree.map(lambda x: np.einsum("c,c...->...", weights, x), clipped)
  if b_is_local:  # B never leaves the clients: the server's B stays.
    expected["lora"]["out"]["b"] = global_params["lora"]["out"]["b"]
  for got, want in zip(jax.tree.leaves(new["global"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The check can fail: the same clipping measured from the global model lands elsewhere.
  from_global, _ = _clipped_oracle(
    trained, jax.tree.map(lambda x: np.broadcast_to(x, (C,) + x.shape), global_params), CLIP
  )
  wrong = np.einsum("c,cir->ir", weights, from_global["lora"]["out"]["a"]) - global_params["lora"]["out"]["a"]
  right = expected["lora"]["out"]["a"] - global_params["lora"]["out"]["a"]
  assert np.linalg.norm(wrong - right) > 0.1 * np.linalg.norm(right)


def test_clip_updates_and_dp_fedavg_read_the_starts_from_the_context():
  """The aggregators alone: given `AggregationContext.client_starts`, the clipped (weighted /
  uniform) mean is from those starts; without one, from the global params."""
  from hyperlora_jax.aggregators.base import AggregationContext

  rng = np.random.default_rng(5)
  global_params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
  starts = {"w": global_params["w"] + rng.normal(size=(3, 4, 3)).astype(np.float32)}
  trained = {"w": starts["w"] + rng.normal(size=(3, 4, 3)).astype(np.float32)}
  weights = np.array([0.6, 0.4, 0.0], np.float32)  # Client 2 is absent.
  for aggregator, mean_weights in (
    (aggregators.clip_updates(aggregators.fedit(), 0.5), weights),
    (aggregators.dp_fedavg(0.5, 0.0), np.array([0.5, 0.5, 0.0], np.float32)),
  ):
    state = aggregator.init(global_params, jax.random.key(0))
    for context, from_ in (
      (AggregationContext(client_starts=starts), starts),
      (None, {"w": np.broadcast_to(global_params["w"], (3, 4, 3))}),
    ):
      got, _, _ = aggregator.aggregate(state, global_params, trained, jnp.asarray(weights), context)
      clipped, _ = _clipped_oracle(trained, from_, 0.5)
      np.testing.assert_allclose(got["w"], np.einsum("c,cij->ij", mean_weights, clipped["w"]), rtol=1e-5, atol=1e-6)
