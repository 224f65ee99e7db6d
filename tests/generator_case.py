"""A generator test case shared by the generator and the private-HyperLoRA tests (not a test module)."""

import jax
import jax.numpy as jnp
import optax

from hyperlora_jax.hyper.generator import make_generator


def generator_case(
  module,
  clients: int,
  rank: int,
  signature_dim: int,
  *,
  loss: str = "vjp",
  learning_rate: float = 0.1,
  server_steps: int = 1,
  privacy=None,
):
  """(generator, state with non-trivial params, signatures [C, D], ids [C], base factors, the
  clients' trained factors: the sent ones plus noise) for an SGD generator over `module`."""
  gen = make_generator(
    module,
    loss=loss,
    optimizer=optax.sgd(learning_rate),
    scale=2.0,
    server_steps=server_steps,
    signature_dim=signature_dim,
    privacy=privacy,
  )
  state = gen.init(jax.random.key(0))
  state = state.replace(
    params=jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), state.params)
  )
  k = jax.random.split(jax.random.key(1), 3)
  signatures = jax.random.normal(k[0], (clients, signature_dim))
  ids = jnp.arange(clients)
  base = {p: {"a": jnp.full((i, rank), 0.1), "b": jnp.zeros((rank, o))} for p, i, o in module.targets}
  sent = jax.tree.map(lambda o, b: o + b, gen.generate(state, signatures, ids), base)
  trained = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(k[1], x.shape), sent)
  return gen, state, signatures, ids, base, trained
