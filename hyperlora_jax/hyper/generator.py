"""Hypernetwork generators of LoRA factors (pFedHN, and HyperLoRA's `G_φ`).

`LoraGenerator` maps a client's conditioning (its distribution signature and/or a learned
client embedding) to an *offset* for the LoRA factors of every targeted layer. A client
starts a round from `base + G_φ(c_k)`, where `base` is the server's global adapter
(HyperLoRA) or the fixed round-0 adapter (pFedHN). The output layers are zero-initialised,
so at round 0 every client starts from `base`.

Weights are shared across layers: a trunk MLP embeds the conditioning once, and one output
MLP per distinct kernel shape `(d_in, d_out)` reads `[trunk; layer embedding]`, so the
generator's size grows with the number of distinct shapes, not with depth.

The server trains φ from what clients return (pure functions, `make_generator`):
  * "vjp" (pFedHN, Shamsian et al., ICML 2021): φ ← φ − η Σ_k p_k (∂θ_k/∂φ)^T (θ_k − θ̃_k),
    with θ_k = base + G_φ(c_k) the factors sent and θ̃_k those returned; computed with
    `jax.vjp`, then applied through an optax optimizer.
  * "product_distill": `server_steps` optax steps on
    ½ Σ_k p_k Σ_layers ‖s (a_k b_k)(φ) − s ã_k b̃_k‖², the distance in product space, which
    does not depend on the factors' gauge (a M, M⁻¹ b give the same product).
With `privacy=(C_g, σ)` (client-level DP, `hyperlora_jax.privacy`) each step's gradient is
DP-SGD's: every participant's own gradient g_k (its term, weight 1) clipped to norm C_g, the
uniform mean over the n participants, plus N(0, (σ C_g / n)²) noise on every coordinate; the
state then carries the noise key ("rng").
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax import privacy as privacy_lib
from hyperlora_jax import states
from hyperlora_jax.federated import NEW_CLIENT as NEW_CLIENT  # No learned embedding: the mean one.
from hyperlora_jax.pytree import Tree

GENERATOR_LOSSES = ("vjp", "product_distill")


class LoraGenerator(nn.Module):
  """(signature [D], client index) -> {path: {"a": [d_in, r], "b": [r, d_out]}} offsets.

  Attributes:
    targets: the layers, {path: (d_in, d_out)} as `lora.find_targets` returns them (or
      `aggregators.layer_shapes(adapter)`), or ((path, d_in, d_out), ...); order is kept.
    rank: LoRA rank r (r_max with heterogeneous ranks).
    num_clients, client_embed_dim: learned client embeddings [N, E] (E = 0: none). Index
      `NEW_CLIENT` reads the mean embedding.
    hidden: width of the trunk and of the per-shape output MLPs.
    layer_embed_dim: size of the learned per-layer embedding.
  """

  targets: Any  # {path: (d_in, d_out)} or ((path, d_in, d_out), ...)
  rank: int
  num_clients: int = 0
  client_embed_dim: int = 0
  hidden: int = 64
  layer_embed_dim: int = 16

  @nn.compact
  def __call__(self, signature: jax.Array, client_index: jax.Array) -> dict:
    parts = [signature] if signature.shape[-1] else []
    if self.client_embed_dim:
      table = self.param("client_embedding", nn.initializers.normal(1.0), (self.num_clients, self.client_embed_dim))
      own = table[jnp.maximum(client_index, 0)]
      parts.append(jnp.where(client_index >= 0, own, jnp.mean(table, axis=0)))
    if not parts:
      raise ValueError("LoraGenerator needs a signature or client embeddings (both are empty)")
    trunk = nn.gelu(nn.Dense(self.hidden, name="trunk_in")(jnp.concatenate(parts)))
    trunk = nn.gelu(nn.Dense(self.hidden, name="trunk_out")(trunk))
    layer_embedding = self.param(
      "layer_embedding", nn.initializers.normal(1.0), (len(self.targets), self.layer_embed_dim)
    )
    mixers, outputs, factors = {}, {}, {}
    for i, (path, d_in, d_out) in enumerate(target_triples(self.targets)):
      shape = (d_in, d_out)
      if shape not in mixers:
        mixers[shape] = nn.Dense(self.hidden, name=f"mix_{d_in}x{d_out}")
        outputs[shape] = nn.Dense(
          self.rank * (d_in + d_out), kernel_init=nn.initializers.zeros, name=f"out_{d_in}x{d_out}"
        )
      hidden = nn.gelu(mixers[shape](jnp.concatenate([trunk, layer_embedding[i]])))
      flat = outputs[shape](hidden)
      factors[path] = {
        "a": flat[: d_in * self.rank].reshape(d_in, self.rank),
        "b": flat[d_in * self.rank :].reshape(self.rank, d_out),
      }
    return factors


def target_triples(targets) -> tuple[tuple[str, int, int], ...]:
  """{path: (d_in, d_out)} or ((path, d_in, d_out), ...) -> ((path, d_in, d_out), ...).

  Args:
    targets: the LoRA targets, either form.
  Returns:
    ((path, d_in, d_out), ...), in the given order.
  """
  if isinstance(targets, dict) or hasattr(targets, "items"):
    return tuple((path, d_in, d_out) for path, (d_in, d_out) in targets.items())
  return tuple(tuple(t) for t in targets)


class Generator(NamedTuple):
  """Pure functions of a generator component (no data, no I/O).

    state = init(rng)
    offsets = generate(state, signatures [C, D], client_ids [C])      -> lora tree [C, ...]
    state = update(state, signatures, client_ids, base_lora, trained_lora [C, ...],
                   weights [C], rank_masks [C, r])

  `base_lora` is the factors the offsets are added to: one adapter {path: {"a", "b"}} for all
  clients (no leading axis).
  """

  init: Callable[[jax.Array], Tree]
  generate: Callable[[Tree, jax.Array, jax.Array], Tree]
  update: Callable[..., Tree]
  signature_dim: int | None = None  # D of the signatures it reads (None: not declared).


@states.typed_state
@dataclasses.dataclass(frozen=True)
class GeneratorState(states.TypedState):
  """A `Generator`'s state (checkpointed as the dict of its entries that are not None).

  Attributes:
    params: the module's params φ.
    opt: their optimizer's state.
    rng: uint32 [2] the DP-SGD noise key's data (None without privacy).
  """

  params: Tree
  opt: Tree
  rng: jax.Array | None = None


def make_generator(
  module: LoraGenerator,
  *,
  loss: str,
  optimizer: optax.GradientTransformation,
  scale: float | None = None,
  server_steps: int = 1,
  signature_dim: int = 0,
  privacy: tuple[float, float] | None = None,
) -> Generator:
  """The `Generator` for `module`, trained by `loss` ("vjp" or "product_distill"), with
  DP-SGD steps when `privacy=(clip_norm, noise_multiplier)` (module docstring).

  Args:
    scale: the LoRA scale s of the products that "product_distill" fits (s a b); "vjp" works on
      the factors and does not read it.
    signature_dim: D, the width of the signatures [C, D] it is given (0: none; then the
      module needs client embeddings).
  """
  if loss not in GENERATOR_LOSSES:
    raise ValueError(f"generator loss {loss!r}; allowed: {GENERATOR_LOSSES}")
  if loss == "product_distill" and scale is None:
    raise ValueError(
      "make_generator(loss='product_distill') fits the products s a b: give scale=s (hl.lora.lora_scale(alpha, rank))"
    )

  def init(rng):
    params = module.init(rng, jnp.zeros((signature_dim,)), jnp.zeros((), jnp.int32))
    rng = jax.random.key_data(jax.random.fold_in(rng, 13)) if privacy is not None else None
    return GeneratorState(params=params, opt=optimizer.init(params), rng=rng)

  def generate_with(params, signatures, client_ids):
    return jax.vmap(lambda s, i: module.apply(params, s, i))(signatures, client_ids)

  def generate(state, signatures, client_ids):
    return generate_with(state.params, signatures, client_ids)

  def sent_factors(params, signatures, client_ids, base_lora, rank_masks):
    offsets = generate_with(params, signatures, client_ids)
    return lora_lib.truncate(jax.tree.map(lambda o, b: o + b, offsets, base_lora), rank_masks)

  def vjp_gradient(params, signatures, client_ids, base_lora, trained_lora, weights, rank_masks):
    """Σ_k p_k (∂θ_k/∂φ)^T (θ_k − θ̃_k) in one VJP of φ -> [p_k θ_k]_k."""

    def weighted_sent(p):
      sent = sent_factors(p, signatures, client_ids, base_lora, rank_masks)
      return jax.tree.map(lambda x: x * weights.reshape((-1,) + (1,) * (x.ndim - 1)), sent)

    sent = sent_factors(params, signatures, client_ids, base_lora, rank_masks)
    _, vjp = jax.vjp(weighted_sent, params)
    (grad,) = vjp(jax.tree.map(jnp.subtract, sent, trained_lora))
    return grad

  def distill_loss(params, signatures, client_ids, base_lora, trained_lora, weights, rank_masks):
    sent = sent_factors(params, signatures, client_ids, base_lora, rank_masks)
    total = 0.0
    for path, f in sent.items():
      diff = scale * (f["a"] @ f["b"] - trained_lora[path]["a"] @ trained_lora[path]["b"])
      total = total + 0.5 * jnp.sum(weights * jnp.sum(diff**2, axis=(1, 2)))
    return total

  def gradient(params, signatures, client_ids, base_lora, trained_lora, weights, rank_masks):
    """The step's gradient: Σ_k p_k g_k (`loss`'s rule)."""
    args = (signatures, client_ids, base_lora, trained_lora, weights, rank_masks)
    return vjp_gradient(params, *args) if loss == "vjp" else jax.grad(distill_loss)(params, *args)

  def client_gradients(params, signatures, client_ids, base_lora, trained_lora, rank_masks):
    """[C, ...] each client's own gradient g_k (its term of `gradient`, weight 1)."""

    def one(signature, client_id, trained, rank_mask):
      return gradient(
        params,
        signature[None],
        client_id[None],
        base_lora,
        jax.tree.map(lambda x: x[None], trained),
        jnp.ones((1,)),
        rank_mask[None],
      )

    return jax.vmap(one)(signatures, client_ids, trained_lora, rank_masks)

  def update(state, signatures, client_ids, base_lora, trained_lora, weights, rank_masks):
    key = jax.random.wrap_key_data(state.rng) if privacy is not None else None

    def step(carry, index):
      params, opt_state = carry
      if privacy is None:
        grad = gradient(params, signatures, client_ids, base_lora, trained_lora, weights, rank_masks)
      else:
        grads = client_gradients(params, signatures, client_ids, base_lora, trained_lora, rank_masks)
        grad = privacy_lib.private_mean(grads, weights, *privacy, jax.random.fold_in(key, index))
      updates, opt_state = optimizer.update(grad, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    steps = 1 if loss == "vjp" else server_steps
    (params, opt_state), _ = jax.lax.scan(step, (state.params, state.opt), jnp.arange(steps))
    rng = jax.random.key_data(jax.random.fold_in(key, steps)) if privacy is not None else None
    return GeneratorState(params=params, opt=opt_state, rng=rng)

  return Generator(init=init, generate=generate, update=update, signature_dim=signature_dim)
