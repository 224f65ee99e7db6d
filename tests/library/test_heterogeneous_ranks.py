"""Heterogeneous client ranks (FLoRA, FlexLoRA, HetLoRA), and the centralized reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import aggregators, lora
from hyperlora_jax.aggregators.hetero import norm_weights, product_norms
from experiments.runner.config_validation import ConfigError
from hyperlora_jax.tasks.image_classification import frozen_tree
from experiments.runner.experiment import build_experiment
from experiments.runner.records import communication_bytes
from experiments.runner.feeding import round_inputs

RANKS = (1, 2, 4)
R_MAX, D_IN, D_OUT, SCALE = 4, 6, 5, 2.0
WEIGHTS = jnp.array([0.5, 0.3, 0.2])


def _padded_clients(seed=0):
  """Three clients of ranks 1, 2, 4 stored zero-padded to r_max = 4."""
  k = jax.random.split(jax.random.key(seed), 3)
  factors = {"l": {"a": jax.random.normal(k[0], (3, D_IN, R_MAX)), "b": jax.random.normal(k[1], (3, R_MAX, D_OUT))}}
  masks = lora.rank_masks(np.array(RANKS), 3, R_MAX)
  return {"lora": lora.truncate(factors, masks), "head": {"kernel": jax.random.normal(k[2], (3, 4, 3))}}


def test_rank_masks_and_truncation_zero_the_components_a_client_lacks():
  masks = lora.rank_masks(np.array(RANKS), 3, R_MAX)
  np.testing.assert_array_equal(masks, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  factors = _padded_clients()["lora"]["l"]
  assert float(jnp.abs(factors["a"][0, :, 1:]).max()) == 0.0 and float(jnp.abs(factors["b"][1, 2:]).max()) == 0.0
  assert float(jnp.abs(factors["a"][2, :, 3]).max()) > 0.0


def test_hetlora_weights_by_product_norm_and_averages_padded_factors():
  clients = _padded_clients()
  a, b = clients["lora"]["l"]["a"], clients["lora"]["l"]["b"]
  explicit = np.array([np.linalg.norm(np.asarray(a[k] @ b[k])) for k in range(3)])
  np.testing.assert_allclose(product_norms(a, b), explicit, rtol=1e-5)
  g, _, _ = aggregators.hetlora().aggregate({}, None, clients, WEIGHTS)
  w = explicit / explicit.sum()
  np.testing.assert_allclose(g["lora"]["l"]["a"], np.einsum("c,cir->ir", w, a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g["lora"]["l"]["b"], np.einsum("c,cro->ro", w, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g["head"]["kernel"], np.einsum("c,cij->ij", WEIGHTS, clients["head"]["kernel"]), rtol=1e-5)
  # A non-participant (weight 0) gets no say, whatever its norm.
  w0 = norm_weights(jnp.asarray(explicit), jnp.array([0.5, 0.5, 0.0]))
  assert float(w0[2]) == 0.0 and abs(float(w0.sum()) - 1.0) < 1e-6


def test_flora_with_mixed_ranks_merges_the_exact_update():
  clients = _padded_clients()
  agg = aggregators.flora(SCALE)
  _, merged, _ = agg.aggregate(agg.init(None), jax.tree.map(lambda x: x[2], clients), clients, WEIGHTS)
  a, b = clients["lora"]["l"]["a"], clients["lora"]["l"]["b"]
  exact = sum(float(WEIGHTS[k]) * np.asarray(a[k, :, : RANKS[k]] @ b[k, : RANKS[k]]) for k in range(3))
  np.testing.assert_allclose(merged["l"], SCALE * exact, atol=1e-5)


@pytest.mark.parametrize("client_rank", [1, 2, 3])
def test_flexlora_truncated_to_a_client_rank_is_its_best_rank_approximation(client_rank):
  clients = _padded_clients()
  g, _, _ = aggregators.flexlora(SCALE).aggregate({}, jax.tree.map(lambda x: x[2], clients), clients, WEIGHTS)
  mask = lora.rank_masks(np.array([client_rank]), 1, R_MAX)[0]
  own = lora.truncate(g["lora"], mask)["l"]
  a, b = clients["lora"]["l"]["a"], clients["lora"]["l"]["b"]
  target = SCALE * np.einsum("c,cir,cro->io", WEIGHTS, a, b)
  u, s, vt = np.linalg.svd(target, full_matrices=False)
  best = (u[:, :client_rank] * s[:client_rank]) @ vt[:client_rank]
  np.testing.assert_allclose(SCALE * own["a"] @ own["b"], best, atol=1e-4)


def test_heterogeneous_ranks_in_a_real_round_never_touch_missing_components(smoke_config):
  smoke_config.method, smoke_config.lora.client_ranks = "hetlora", (1, 3)
  exp = build_experiment(smoke_config, log=lambda _: None)
  step = jax.jit(exp.fed_round.step)
  state = exp.fed_round.init(jax.random.key(0), exp.initial_trainable)
  block, ids, weights = round_inputs(exp, 0)
  state, metrics = step(state, frozen_tree(exp.backbone), block, ids, weights)
  assert int(metrics["participants"]) == int((ids >= 0).sum())
  b = next(iter(state["global"]["lora"].values()))["b"]
  assert float(jnp.abs(b[3]).max()) == 0.0  # No client has rank 4: the 4th component stays zero.
  assert float(jnp.abs(b[:3]).max()) > 0.0


def test_rank_bytes_scale_with_each_clients_rank(smoke_config):
  smoke_config.method = "flexlora"
  full = communication_bytes(build_experiment(smoke_config, log=lambda _: None), 0, np.array([0, 1]))
  smoke_config.lora.client_ranks = (2,)
  half = communication_bytes(build_experiment(smoke_config, log=lambda _: None), 0, np.array([0, 1]))
  exp = build_experiment(smoke_config, log=lambda _: None)
  lora_bytes = sum(4 * 4 * (i + o) for i, o in exp.targets.values())
  assert full[0] - half[0] == 2 * lora_bytes // 2


@pytest.mark.parametrize("method", ["fedit", "fedex_lora", "ffa_lora", "centralized"])
def test_methods_without_heterogeneous_ranks_refuse_them_by_field(smoke_config, method):
  smoke_config.method, smoke_config.lora.client_ranks = method, (2, 4)
  with pytest.raises(ConfigError, match=r"lora\.client_ranks: .*hetlora"):
    build_experiment(smoke_config, log=lambda _: None)


def test_client_ranks_above_the_rank_fail_validation(smoke_config):
  smoke_config.method, smoke_config.lora.client_ranks = "hetlora", (2, 8)
  with pytest.raises(ConfigError, match=r"lora\.client_ranks"):
    build_experiment(smoke_config, log=lambda _: None)


def test_centralized_learns_on_pooled_data_with_a_rounds_compute(smoke_config):
  smoke_config.method = "centralized"
  exp = build_experiment(smoke_config, log=lambda _: None)
  block, ids, weights = round_inputs(exp, 0)
  fed = smoke_config.fed
  assert block["label"].shape[:3] == (1, fed.clients_per_round * fed.local_steps, fed.batch_size)
  assert list(ids) == [0] and float(weights[0]) == 1.0
  assert communication_bytes(exp, 0, ids) == (0, 0)
  pool = np.concatenate(exp.data.train_parts)
  labels = set(np.asarray(exp.data.train_pool.labels)[pool].tolist())
  assert set(block["label"].ravel().tolist()) <= labels and len(set(block["label"].ravel().tolist())) > 2
