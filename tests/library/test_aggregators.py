"""Aggregators and methods as pure functions."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import aggregators, params, primitives


def _trainable(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
    "lora": {"l0": {"a": jax.random.normal(k1, (5, 2)), "b": jax.random.normal(k2, (2, 3))}},
    "head": {"kernel": jax.random.normal(k3, (4, 3)), "bias": jnp.zeros(3)},
  }


def test_fedit_on_two_clients_is_the_hand_computed_weighted_average():
  c0, c1 = _trainable(0), _trainable(1)
  clients = jax.tree.map(lambda a, b: jnp.stack([a, b]), c0, c1)
  weights = jnp.array([30.0, 10.0]) / 40.0
  agg = aggregators.fedit()
  new_global, delta, _ = agg.aggregate(agg.init(c0), c0, clients, weights)
  assert delta == {}
  for path in (("lora", "l0", "a"), ("lora", "l0", "b"), ("head", "kernel")):
    x0, x1, got = c0, c1, new_global
    for key in path:
      x0, x1, got = x0[key], x1[key], got[key]
    np.testing.assert_allclose(got, 0.75 * np.asarray(x0) + 0.25 * np.asarray(x1), rtol=1e-6)


def test_fedit_product_of_averages_is_biased():
  """B̄Ā ≠ Σ p_k B_k A_k: the cross-term bias that motivates exact and product-space methods."""
  c0, c1 = _trainable(0), _trainable(1)
  clients = jax.tree.map(lambda a, b: jnp.stack([a, b]), c0, c1)
  w = jnp.array([0.5, 0.5])
  g, _, _ = aggregators.fedit().aggregate({}, c0, clients, w)
  exact = 0.5 * (c0["lora"]["l0"]["a"] @ c0["lora"]["l0"]["b"]) + 0.5 * (c1["lora"]["l0"]["a"] @ c1["lora"]["l0"]["b"])
  assert float(jnp.abs(g["lora"]["l0"]["a"] @ g["lora"]["l0"]["b"] - exact).max()) > 1e-2


def test_identity_keeps_global():
  c0 = _trainable(0)
  clients = primitives.broadcast(_trainable(1), 3)
  g, _, _ = aggregators.identity().aggregate({}, c0, clients, jnp.ones(3) / 3)
  jax.tree.map(np.testing.assert_array_equal, g, c0)


def test_leaf_selection_by_regex():
  t = _trainable(0)
  mask = params.regex_mask(t, r"head/.*|lora/.*/b")
  local = params.select(t, mask)
  assert sorted(local) == ["head/bias", "head/kernel", "lora/l0/b"]
  swapped = params.combine(t, {"lora/l0/b": jnp.zeros((2, 3))})
  assert float(jnp.abs(swapped["lora"]["l0"]["b"]).max()) == 0.0
  np.testing.assert_array_equal(swapped["lora"]["l0"]["a"], t["lora"]["l0"]["a"])
  assert params.num_bytes(t, mask) == 4 * (3 + 12 + 6)
