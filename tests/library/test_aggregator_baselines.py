"""Exactness and layout of the baseline aggregators, and their methods end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import aggregators
from experiments.runner import methods
from hyperlora_jax.federated import round_update_mask
from hyperlora_jax.tasks.image_classification import frozen_tree
from hyperlora_jax.aggregators.exact import stack_factors
from hyperlora_jax.aggregators.fair import fair_objective, fit_delta_b
from hyperlora_jax.aggregators.products import weighted_product
from experiments.runner.experiment import build_experiment
from experiments.runner.feeding import round_inputs
from experiments.runner.train import train_and_evaluate

D_IN, D_OUT, RANK, CLIENTS, SCALE = 6, 5, 2, 3, 2.0
WEIGHTS = jnp.array([0.5, 0.3, 0.2])


def _clients(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
    "lora": {
      "l": {"a": jax.random.normal(k[0], (CLIENTS, D_IN, RANK)), "b": jax.random.normal(k[1], (CLIENTS, RANK, D_OUT))}
    },
    "head": {"kernel": jax.random.normal(k[2], (CLIENTS, 4, 3)), "bias": jnp.zeros((CLIENTS, 3))},
  }


def _global():
  return jax.tree.map(lambda x: x[0], _clients(9))


def _exact_update(clients):
  a, b = clients["lora"]["l"]["a"], clients["lora"]["l"]["b"]
  return SCALE * sum(float(WEIGHTS[k]) * np.asarray(a[k] @ b[k]) for k in range(CLIENTS))


def test_fedex_residual_makes_the_aggregate_exact():
  clients = _clients()
  agg = aggregators.fedex_lora(SCALE)
  g, residual, _ = agg.aggregate(agg.init(_global()), _global(), clients, WEIGHTS)
  w0 = jax.random.normal(jax.random.key(3), (D_IN, D_OUT))
  lhs = (w0 + residual["l"]) + SCALE * g["lora"]["l"]["a"] @ g["lora"]["l"]["b"]
  np.testing.assert_allclose(lhs, np.asarray(w0) + _exact_update(clients), atol=1e-5)


def test_flora_stacking_equals_weighted_product_sum_for_mixed_ranks():
  keys = jax.random.split(jax.random.key(1), 6)
  ranks = (1, 3, 4)
  a_list = [jax.random.normal(keys[i], (D_IN, r)) for i, r in enumerate(ranks)]
  b_list = [jax.random.normal(keys[3 + i], (r, D_OUT)) for i, r in enumerate(ranks)]
  a_s, b_s = stack_factors(a_list, b_list, WEIGHTS)
  assert a_s.shape == (D_IN, 8) and b_s.shape == (8, D_OUT)
  expected = sum(float(w) * np.asarray(a @ b) for w, a, b in zip(WEIGHTS, a_list, b_list))
  np.testing.assert_allclose(a_s @ b_s, expected, atol=1e-5)


def test_flora_merges_the_exact_update_and_restarts_lora():
  clients = _clients()
  agg = aggregators.flora(SCALE)
  state = agg.init(_global())
  g, merged, state2 = agg.aggregate(state, _global(), clients, WEIGHTS)
  np.testing.assert_allclose(merged["l"], _exact_update(clients), atol=1e-5)
  assert float(jnp.abs(g["lora"]["l"]["b"]).max()) == 0.0 and float(jnp.abs(g["lora"]["l"]["a"]).max()) > 0
  g2, _, _ = agg.aggregate(state2, _global(), clients, WEIGHTS)
  assert not np.allclose(g["lora"]["l"]["a"], g2["lora"]["l"]["a"])  # Fresh A every round.


def test_ffa_average_is_exact_when_a_is_shared_and_frozen():
  clients = _clients()
  shared_a = clients["lora"]["l"]["a"][0]
  clients["lora"]["l"]["a"] = jnp.broadcast_to(shared_a, clients["lora"]["l"]["a"].shape)
  g, _, _ = aggregators.fedit().aggregate({}, _global(), clients, WEIGHTS)
  np.testing.assert_allclose(SCALE * g["lora"]["l"]["a"] @ g["lora"]["l"]["b"], _exact_update(clients), atol=1e-5)


def test_flexlora_is_the_best_rank_r_approximation_not_transposed():
  clients = _clients()
  agg = aggregators.flexlora(SCALE)
  g, _, _ = agg.aggregate({}, _global(), clients, WEIGHTS)
  a, b = g["lora"]["l"]["a"], g["lora"]["l"]["b"]
  assert a.shape == (D_IN, RANK) and b.shape == (RANK, D_OUT)
  u, s, vt = np.linalg.svd(_exact_update(clients), full_matrices=False)
  best = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
  np.testing.assert_allclose(SCALE * a @ b, best, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(best - _exact_update(clients)), np.sqrt(np.sum(s[RANK:] ** 2)), rtol=1e-4)


def _assert_balanced_split(a, b, target, scale):
  """a [d_in, r], b [r, d_out] are U_r √(Σ_r/s) and √(Σ_r/s) V_r^T of target = U Σ V^T, up to
  each component's sign: aᵀa = b bᵀ = diag(Σ_r/s), and s a b is the best rank-r approximation.
  Unbalanced factors (a = U_r Σ_r/s, b = V_r^T) have the same product but fail the first check."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rank = a.shape[1]
  u, sigma, vt = np.linalg.svd(np.asarray(target, np.float64), full_matrices=False)
  # Distinct singular values (U_r and V_r are then unique up to sign) and Σ_r/s far from 1
  # (where √ would change nothing): otherwise the check could not see a wrong split.
  assert np.all(-np.diff(sigma[: rank + 1]) > 1e-2 * sigma[0]) and np.all(np.abs(sigma[:rank] / scale - 1) > 0.1)
  np.testing.assert_allclose(a.T @ a, np.diag(sigma[:rank] / scale), atol=1e-4 * sigma[0])
  np.testing.assert_allclose(b @ b.T, np.diag(sigma[:rank] / scale), atol=1e-4 * sigma[0])
  signs = np.sign(np.sum(a * u[:, :rank], axis=0))  # The SVD's sign per component.
  np.testing.assert_allclose(a * signs, u[:, :rank] * np.sqrt(sigma[:rank] / scale), atol=1e-4)
  np.testing.assert_allclose(b * signs[:, None], np.sqrt(sigma[:rank] / scale)[:, None] * vt[:rank], atol=1e-4)
  np.testing.assert_allclose(scale * a @ b, (u[:, :rank] * sigma[:rank]) @ vt[:rank], atol=1e-4 * sigma[0])


def test_flexlora_splits_the_singular_values_evenly_between_a_and_b():
  """FlexLoRA hands clients a = U_r √(Σ_r/s), b = √(Σ_r/s) V_r^T (Bai et al.'s √Σ on each
  side). The product alone cannot tell a split without the square root, but the clients'
  next round starts from these factors, so every round after the first would differ."""
  clients = _clients()
  g, _, _ = aggregators.flexlora(SCALE).aggregate({}, _global(), clients, WEIGHTS)
  _assert_balanced_split(g["lora"]["l"]["a"], g["lora"]["l"]["b"], _exact_update(clients), SCALE)


def test_robust_products_split_their_statistic_evenly_between_a_and_b():
  """`robust.rule` in product space re-factorizes its statistic as FlexLoRA does."""
  clients = _clients()
  g, _, _ = aggregators.robust_products("median", SCALE).aggregate({}, _global(), clients, WEIGHTS)
  products = SCALE * np.einsum("cir,cro->cio", clients["lora"]["l"]["a"], clients["lora"]["l"]["b"])
  _assert_balanced_split(g["lora"]["l"]["a"], g["lora"]["l"]["b"], np.median(products, axis=0), SCALE)


def test_a_flexlora_round_starts_the_next_one_from_balanced_factors():
  """A real round (5 -> 3 layer, rank 2): the new global factors, which the clients of the
  next round start from, are the balanced split of Σ_k p_k s a_k b_k of the trained clients."""
  from tests.library.test_aggregator_formulas import IDS, WEIGHTS as ROUND_WEIGHTS, _round

  scale = 1.0  # `_round`'s loss applies LoRA with s = 1.
  fed, frozen, adapter, batches, seen = _round(aggregators.flexlora(scale))
  new, _ = fed.step(fed.init(jax.random.key(1), adapter), frozen, batches, IDS, jnp.asarray(ROUND_WEIGHTS))
  trained = seen[-1].client_params["lora"]["out"]
  target = scale * np.einsum("c,cir,cro->io", ROUND_WEIGHTS, trained["a"], trained["b"])
  _assert_balanced_split(new["global"]["lora"]["out"]["a"], new["global"]["lora"]["out"]["b"], target, scale)


def test_lora_fair_lowers_its_objective():
  clients = _clients()
  mean = jax.tree.map(lambda x: jnp.tensordot(WEIGHTS, x, axes=1), clients)
  a_bar, b_bar = mean["lora"]["l"]["a"], mean["lora"]["l"]["b"]
  target = weighted_product(clients["lora"]["l"]["a"], clients["lora"]["l"]["b"], WEIGHTS)
  delta = fit_delta_b(a_bar, b_bar, target, lam=0.01, steps=50, learning_rate=1e-2)
  before = fair_objective(jnp.zeros_like(b_bar), a_bar, b_bar, target, 0.01)
  after = fair_objective(delta, a_bar, b_bar, target, 0.01)
  assert float(after) < float(before) - 1e-3
  g, _, _ = aggregators.lora_fair(0.01, 50, 1e-2).aggregate({}, _global(), clients, WEIGHTS)
  np.testing.assert_allclose(g["lora"]["l"]["b"], b_bar + delta, atol=1e-6)
  np.testing.assert_allclose(g["lora"]["l"]["a"], a_bar, atol=1e-6)


def test_rolora_alternates_the_trained_factor():
  method = methods.rolora(methods.MethodSettings("rolora"))  # fed.head_policy="shared" by default.
  t = jax.tree.map(lambda x: x[0], _clients())
  even = round_update_mask(method.frozen_regexes, t, jnp.int32(0))
  odd = round_update_mask(method.frozen_regexes, t, jnp.int32(1))
  assert (float(even["lora"]["l"]["a"]), float(even["lora"]["l"]["b"])) == (0.0, 1.0)
  assert (float(odd["lora"]["l"]["a"]), float(odd["lora"]["l"]["b"])) == (1.0, 0.0)
  assert float(even["head"]["kernel"]) == float(odd["head"]["kernel"]) == 1.0


@pytest.mark.parametrize(
  "name",
  [
    "ffa_lora",
    "fedsa_lora",
    "rolora",
    "fedex_lora",
    "flora",
    "flexlora",
    "lora_fair",
    "hetlora",
    "pfedhn",
    "centralized",
  ],
)
def test_every_baseline_runs_end_to_end(smoke_config, tmp_path, name):
  smoke_config.method = name
  smoke_config.fed.num_rounds = 2
  result = train_and_evaluate(smoke_config, str(tmp_path), progress=False, log=lambda _: None)
  last = result["records"][-1]
  assert result["round_traces"] == 1 and last["round"] == 2
  assert 0.0 <= last["global_accuracy"] <= 1.0
  assert (last["cum_bytes_up"] == 0) == (name == "centralized")  # Pooled data: nothing is sent.


def test_rolora_round_leaves_the_frozen_factor_unchanged(smoke_config):
  smoke_config.method = "rolora"
  exp = build_experiment(smoke_config, log=lambda _: None)
  step = jax.jit(exp.fed_round.step)
  state = exp.fed_round.init(jax.random.key(0), exp.initial_trainable)
  for r in range(2):
    before = state["global"]["lora"]
    block, ids, weights = round_inputs(exp, r)
    state, _ = step(state, frozen_tree(exp.backbone), block, ids, weights)
    frozen, trained = ("a", "b") if r == 0 else ("b", "a")
    for path in before:
      np.testing.assert_array_equal(state["global"]["lora"][path][frozen], before[path][frozen])
      assert not np.array_equal(state["global"]["lora"][path][trained], before[path][trained])


def test_communication_accounting(smoke_config):
  from experiments.runner.records import communication_bytes

  sizes = {}
  for name in ("fedit", "ffa_lora", "fedex_lora", "flora", "local_only", "rolora"):
    smoke_config.method = name
    exp = build_experiment(smoke_config, log=lambda _: None)
    sizes[name] = communication_bytes(exp, 0, np.array([0, 1, 2, 3, -1, -1]))
  lora_bytes = sum(4 * RANK_SMOKE * (i + o) for i, o in exp.targets.values())
  head_bytes = sizes["fedit"][0] // 4 - lora_bytes
  residual = sum(4 * i * o for i, o in exp.targets.values())
  assert sizes["local_only"] == (0, 0)
  assert sizes["ffa_lora"][0] < sizes["fedit"][0] and sizes["rolora"] == sizes["ffa_lora"]
  assert sizes["fedex_lora"][1] == sizes["fedit"][1] + 4 * residual
  assert sizes["flora"][1] == sizes["fedit"][1] + 4 * 3 * lora_bytes
  assert head_bytes > 0


RANK_SMOKE = 4


def test_exact_methods_refuse_a_momentum_server(smoke_config):
  from experiments.runner.config_validation import ConfigError

  smoke_config.method = "fedex_lora"
  smoke_config.server_optimizer.momentum = 0.9
  with pytest.raises(ConfigError, match="server_optimizer"):
    build_experiment(smoke_config, log=lambda _: None)
