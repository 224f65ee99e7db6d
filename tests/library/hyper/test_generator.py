"""The LoRA generator (pFedHN, HyperLoRA's G_φ): shapes, zero start, the VJP rule."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hyperlora_jax import lora
from hyperlora_jax.hyper.generator import NEW_CLIENT, LoraGenerator
from tests.generator_case import generator_case

TARGETS = (("enc/q", 6, 5), ("enc/v", 6, 5), ("mlp", 5, 7))
RANK, CLIENTS, SIG = 2, 3, 4


def _module(embed=3):
  return LoraGenerator(
    targets=TARGETS, rank=RANK, num_clients=CLIENTS, client_embed_dim=embed, hidden=8, layer_embed_dim=4
  )


def test_generator_shapes_zero_start_and_size_independent_of_depth():
  module = _module()
  params = module.init(jax.random.key(0), jnp.zeros(SIG), jnp.int32(0))
  out = module.apply(params, jnp.ones(SIG), jnp.int32(1))
  assert {p: (f["a"].shape, f["b"].shape) for p, f in out.items()} == {
    "enc/q": ((6, 2), (2, 5)),
    "enc/v": ((6, 2), (2, 5)),
    "mlp": ((5, 2), (2, 7)),
  }
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(out))  # Zero-init output.
  deeper = LoraGenerator(
    targets=TARGETS + tuple((f"enc{i}/q", 6, 5) for i in range(10)),
    rank=RANK,
    num_clients=CLIENTS,
    client_embed_dim=3,
    hidden=8,
    layer_embed_dim=4,
  )
  size = lambda m: ravel_pytree(m.init(jax.random.key(0), jnp.zeros(SIG), jnp.int32(0)))[0].size
  assert size(deeper) - size(module) == 10 * 4  # Only the new layers' embeddings.


def test_new_client_gets_the_mean_embedding():
  module = _module()
  params = module.init(jax.random.key(0), jnp.zeros(SIG), jnp.int32(0))
  params = jax.tree.map(lambda x: x + 0.1, params)  # Nonzero outputs.
  table = params["params"]["client_embedding"]
  mean_params = jax.tree.map(lambda x: x, params)
  mean_params["params"]["client_embedding"] = jnp.broadcast_to(table.mean(0), table.shape)
  new = module.apply(params, jnp.ones(SIG), jnp.int32(NEW_CLIENT))
  expected = module.apply(mean_params, jnp.ones(SIG), jnp.int32(0))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), new, expected)


def _case(loss="vjp", learning_rate=0.1, server_steps=1):
  module = _module()
  gen, state, signatures, ids, base, trained = generator_case(
    module, CLIENTS, RANK, SIG, loss=loss, learning_rate=learning_rate, server_steps=server_steps
  )
  weights = jnp.array([0.5, 0.3, 0.2])
  masks = lora.rank_masks(None, CLIENTS, RANK)
  return module, gen, state, signatures, ids, base, trained, weights, masks


def test_vjp_update_equals_the_explicit_jacobian_transpose_product():
  module, gen, state, signatures, ids, base, trained, weights, masks = _case()
  new = gen.update(state, signatures, ids, base, trained, weights, masks)
  flat_params, unravel = ravel_pytree(state["params"])

  def theta(flat, k):  # θ_k(φ) = base + G_φ(s_k, k), flattened.
    out = module.apply(unravel(flat), signatures[k], ids[k])
    return ravel_pytree(jax.tree.map(lambda o, b: o + b, out, base))[0]

  expected, jacobian_of, theta_of = flat_params, jax.jit(jax.jacobian(theta)), jax.jit(theta)
  for k in range(CLIENTS):
    jacobian = jacobian_of(flat_params, k)  # [|θ|, |φ|], explicit.
    delta = theta_of(flat_params, k) - ravel_pytree(jax.tree.map(lambda x: x[k], trained))[0]
    expected = expected - 0.1 * float(weights[k]) * jacobian.T @ delta
  np.testing.assert_allclose(ravel_pytree(new["params"])[0], expected, rtol=1e-4, atol=1e-6)


def test_product_distillation_moves_generated_products_toward_the_clients():
  module, gen, state, signatures, ids, base, trained, weights, masks = _case("product_distill", 0.05, 50)

  def gap(params):
    sent = jax.tree.map(lambda o, b: o + b, gen.generate(state.replace(params=params), signatures, ids), base)
    return sum(
      float(jnp.sum(weights[:, None, None] * (f["a"] @ f["b"] - trained[p]["a"] @ trained[p]["b"]) ** 2))
      for p, f in sent.items()
    )

  new = gen.update(state, signatures, ids, base, trained, weights, masks)
  assert gap(new["params"]) < 0.9 * gap(state["params"])
