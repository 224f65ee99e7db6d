"""HyperLoRA's server: the product-space synthesizer S_ψ and the residual corrector C_ω.

For every targeted layer l (kernel layout, see `hyperlora_jax.lora`):

  1. Synthesis. Each participant k returns factors (a_k, b_k), trained from its start
     (a⁰_k, b⁰_k) (the global factors + the generator's offset for k). Its update in product
     space is ΔP_k = s a_k b_k − s a⁰_k b⁰_k. S_ψ scores every (client, layer) pair from the
     client's signature and update statistics (log ‖ΔP_k‖_F, cosine of ΔP_k with the
     data-weighted mean update, the client's train loss) and a learned layer embedding;
     weights are  w_{k,l} = softmax_k(log p_k + score_{k,l})  over the participants. The new
     product is built in product space, P_l = s a b + Σ_k w_{k,l} ΔP_k (a, b: the global
     factors): no factor cross-terms. Without offsets (and every client at full rank) every
     start is the global, and P_l = Σ_k w_{k,l} s a_k b_k, the weighted product average.
     With offsets, aggregating changes keeps each client's offset out of the global: were
     the products themselves averaged, the global would absorb the mean offset every round
     and clients would start from it plus the offset again: that feedback (the offset's
     a-part times the global b, re-added each round) grows the global b geometrically
     (RELIABILITY.md tells the history).
  2. Re-factorization to rank r. a = U_r R, b = Rᵀ U_rᵀ P_l / s, with U_r the top-r left
     singular vectors of P_l and R the orthogonal r x r rotation that best aligns a with the
     previous global a (Procrustes). s a b = U_r U_rᵀ P_l is the best rank-r approximation
     (Eckart-Young), and the alignment keeps the factors' gauge continuous from round to
     round, which the generator's per-client offsets rely on. The meta-gradient is the exact
     derivative of this map (`aligned_basis`: a = P a_prev (a_prevᵀ P a_prev)^(-1/2) with P
     = U_r U_rᵀ, whose derivative needs only σ_r > σ_{r+1}; where the top r singular values
     are not separated, as when the target has rank < r, that term is taken as zero).
  3. Correction, `corrector`:
       "none"    nothing;
       "fair"    LoRA-FAIR's ΔB fit of (a, b) toward P_l (cosine objective, λ, steps);
       "learned" C_ω: error feedback of the truncation residual. The server keeps
                 E_l = T_l − s a b, the part of the last target the rank-r factors missed, and
                 the next round re-factorizes T_l = P_l + g_l E_l with a gate g_l ∈ (0, 1)
                 from a small MLP over the layer embedding and (‖E_l‖/‖P_l‖, client
                 dispersion). E is server-side only: nothing full-rank is sent.

  With zero-initialized output layers (the default), S_ψ's weights are exactly p_k: the
  uniform limit is the exact weighted product average followed by the best rank-r
  approximation (FlexLoRA's update, in an aligned gauge).

How ψ and ω learn (the meta-objective). No raw data reaches the server. Each participant
holds out one batch of its stream from its local steps; after aggregation the server sends
the candidate global adapter, each participant evaluates its loss on the held-out batch with
the model it would start from next round (candidate ⊕ its local leaves ⊕ G_φ(s_k)) and
returns the gradient with respect to the candidate's shared leaves (counted in bytes). The
server chains it through the synthesis (autodiff of this pure function) and takes one optax
step on (ψ, ω): meta-loss = Σ_k p_k CE_k(held-out batch | aggregate_{ψ,ω}(clients)).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax import privacy as privacy_lib
from hyperlora_jax import states
from hyperlora_jax.aggregators.base import Aggregator, AggregationContext, Capabilities, aggregate_layers
from hyperlora_jax.aggregators.fair import fit_delta_b
from hyperlora_jax.aggregators.products import weighted_product
from hyperlora_jax.aggregators.robust import merge_rest, without_layers
from hyperlora_jax.pytree import Tree

CORRECTORS = ("none", "fair", "learned")


class SynthesizerScores(nn.Module):
  """S_ψ: per-(client, layer) features [C, L, F] -> scores [C, L] (zero at init)."""

  num_layers: int
  hidden: int = 32
  layer_embed_dim: int = 8

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    clients = features.shape[0]
    layer_embedding = self.param(
      "layer_embedding", nn.initializers.normal(1.0), (self.num_layers, self.layer_embed_dim)
    )
    x = jnp.concatenate([features, jnp.broadcast_to(layer_embedding, (clients,) + layer_embedding.shape)], -1)
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0]


class ResidualGate(nn.Module):
  """C_ω: per-layer statistics [L, F] -> error-feedback gates g_l ∈ (0, 1) (0.5 at init)."""

  num_layers: int
  hidden: int = 16

  @nn.compact
  def __call__(self, stats: jax.Array) -> jax.Array:
    embedding = self.param("layer_embedding", nn.initializers.normal(1.0), (self.num_layers, 4))
    x = nn.gelu(nn.Dense(self.hidden)(jnp.concatenate([stats, embedding], -1)))
    return jax.nn.sigmoid(nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0])


def product_gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """G_kj = ⟨a_k b_k, a_j b_j⟩_F without forming products. a [C, d_in, r], b [C, r, d_out] -> [C, C].

  Returns:
    [C, C], symmetric.
  """
  return jnp.einsum("kir,jis,kro,jso->kj", a, a, b, b)


def client_layer_features(a: jax.Array, b: jax.Array, weights: jax.Array, scale: float) -> jax.Array:
  """[C, 2]: log ‖s a_k b_k‖_F and the cosine of a_k b_k with Σ_j p_j a_j b_j (applied to the
  update factors: log ‖ΔP_k‖_F and the cosine of ΔP_k with the mean update).

  Args:
    a: [C, d_in, r]; b: [C, r, d_out].
    weights: [C] summing to 1.
    scale: the LoRA scale s.
  Returns:
    [C, 2].
  """
  gram = product_gram(a, b)
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 1e-20))
  mean_norm = jnp.sqrt(jnp.maximum(weights @ gram @ weights, 1e-20))
  cosine = (gram @ weights) / (norms * mean_norm)
  return jnp.stack([jnp.log(scale * norms), cosine], -1)


def synthesis_weights(scores: jax.Array, weights: jax.Array) -> jax.Array:
  """w_{k,l} = softmax_k(log p_k + score_{k,l}) over clients with p_k > 0 (all 0 if none).
  [C, L] -> [C, L].

  Args:
    scores: [C, L], S_ψ's score of client k for layer l.
    weights: [C] data weights p_k.
  Returns:
    [C, L], each column summing to 1 (or all 0).
  """
  present = weights[:, None] > 0
  logits = jnp.where(present, jnp.log(jnp.maximum(weights, 1e-30))[:, None] + scores, -1e30)
  return jnp.where(present, jax.nn.softmax(logits, axis=0), 0.0)


def refactorize(target: jax.Array, rank: int, scale: float, previous_a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(a, b) with s a b = U_r U_rᵀ target (the best rank-r approximation), a = U_r R aligned
  with `previous_a` (`aligned_basis`), b = aᵀ target / s. Differentiable in both inputs, with
  the exact derivative (`aligned_basis`).

  target [d_in, d_out]; previous_a [d_in, r] -> a [d_in, r], b [r, d_out].
  Returns:
    (a [d_in, r], b [r, d_out]).
  """
  a = aligned_basis(target, previous_a, rank)
  return a, a.T @ target / scale


def _safe_divide(numerator: jax.Array, denominator: jax.Array, tolerance: jax.Array) -> jax.Array:
  """numerator / denominator, 0 where |denominator| <= tolerance."""
  ok = jnp.abs(denominator) > tolerance
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def _aligned_basis_parts(target: jax.Array, previous_a: jax.Array, rank: int):
  u, s, vt = jnp.linalg.svd(target, full_matrices=False)
  u_r = u[:, :rank]
  left, s_c, right = jnp.linalg.svd(u_r.T @ previous_a)
  return u_r @ (left @ right), (u, s, vt.T, s_c, right)  # Procrustes: argmin_R ‖U_r R − a_prev‖_F.


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def aligned_basis(target: jax.Array, previous_a: jax.Array, rank: int) -> jax.Array:
  """a = U_r R [d_in, r]: the top-r left singular vectors U_r of `target` [d_in, d_out],
  rotated by the orthogonal R that best aligns them with `previous_a` [d_in, r] (Procrustes).

  Gauge-free, a = P a_prev (a_prevᵀ P a_prev)^(-1/2) with the projector P = U_r U_rᵀ, so it
  is a function of the top-r subspace alone. Its JVP is exact: P's derivative (first-order
  perturbation of the top-r eigenspace of T Tᵀ, in factored form, no [d_in, d_in] matrix) needs
  σ_r > σ_{r+1}; the polar factor's needs only a_prevᵀ P a_prev invertible (sums σ_i + σ_j,
  never differences). Terms whose denominators vanish (a target of rank < r) are taken as zero,
  so the derivative stays finite.
  Returns:
    [d_in, rank].
  """
  return _aligned_basis_parts(target, previous_a, rank)[0]


@aligned_basis.defjvp
def _aligned_basis_jvp(rank, primals, tangents):
  target, previous_a = primals
  d_target, d_previous = tangents
  a, (u, s, v, s_c, right) = _aligned_basis_parts(target, previous_a, rank)
  tolerance = 10 * jnp.finfo(target.dtype).eps * jnp.maximum(s[0], jnp.finfo(target.dtype).tiny)
  u_r, u_out, v_r, v_out, s_r, s_out = u[:, :rank], u[:, rank:], v[:, :rank], v[:, rank:], s[:rank], s[rank:]
  # dP a_prev: kept x discarded directions of the SVD's range, then the null space of Tᵀ (Q).
  coupling = (u_r.T @ d_target @ v_out) * s_out[None, :] + s_r[:, None] * (u_out.T @ d_target @ v_r).T
  mix = _safe_divide(coupling, s_r[:, None] ** 2 - s_out[None, :] ** 2, tolerance * s[0])  # [r, k - r]
  inverse_s_r = _safe_divide(jnp.ones_like(s_r), s_r, tolerance)
  outside = lambda x: x - u @ (u.T @ x)  # Q x
  kept = u_r.T @ previous_a  # [r, r]
  d_y = (
    u_r @ (mix @ (u_out.T @ previous_a))
    + u_out @ (mix.T @ kept)
    + outside(d_target @ (v_r @ (inverse_s_r[:, None] * kept)))
    + u_r @ (inverse_s_r[:, None] * (v_r.T @ (d_target.T @ outside(previous_a))))
    + u_r @ (u_r.T @ d_previous)
  )  # d(P a_prev)
  # The polar factor a = y (yᵀy)^(-1/2) of y = P a_prev = (U_r L) diag(s_c) R: with H = Rᵀ S R,
  # da = (I - a aᵀ) dy H⁻¹ + a Ω, Ω skew, Ω H + H Ω = aᵀ dy - dyᵀ a.
  z = right.T
  k = a.T @ d_y
  tolerance_c = 10 * jnp.finfo(target.dtype).eps * jnp.maximum(s_c[0], jnp.finfo(target.dtype).tiny)
  omega = z @ _safe_divide(z.T @ (k - k.T) @ z, s_c[:, None] + s_c[None, :], tolerance_c) @ z.T
  h_inverse = z @ (_safe_divide(jnp.ones_like(s_c), s_c, tolerance_c)[:, None] * z.T)
  return a, (d_y - a @ (a.T @ d_y)) @ h_inverse + a @ omega


class PrivateRelease(NamedTuple):
  """Client-level DP for the synthesis (`hyperlora_jax.privacy`): each participant's update,
  its product changes ΔP_k of every layer together with its changes of every other leaf, is
  clipped to L2 norm `clip_norm`; participants weigh the same (1/n); N(0, (σ C / n)²) noise,
  σ = `noise_multiplier`, is added to every coordinate of the mean change (the products
  [d_in, d_out] and the other leaves). `key` draws the noise."""

  clip_norm: float
  noise_multiplier: float
  key: jax.Array


def private_update(
  updates: dict, rest_updates: Tree, weights: jax.Array, scale: float, release: PrivateRelease
) -> tuple[dict, Tree, jax.Array]:
  """The noisy uniform mean of the clipped updates (`PrivateRelease`).

  Args:
    updates: {layer: (a [C, d_in, 2r], b [C, 2r, d_out])} with s a_k b_k = ΔP_k (`update_factors`).
    rest_updates: the other leaves' changes [C, ...].
    weights: [C] (0 = absent).
    scale: the LoRA scale s.
    release: the clip norm, noise multiplier and key.
  Returns:
    ({layer: [d_in, d_out] mean ΔP + noise}, the other leaves' mean change + noise, the clipped
    weights [C] used: Σ_k w_k ΔP_k is the mean of the clipped ΔP_k).
  """
  squares = privacy_lib.squared_norms(rest_updates) + sum(
    scale**2 * jnp.diagonal(product_gram(*u)) for u in updates.values()
  )
  mean_weights, count = privacy_lib.clipped_mean_weights(squares, weights, release.clip_norm)
  std = release.noise_multiplier * release.clip_norm / count
  product_key, rest_key = jax.random.split(release.key)
  mean_products = {p: scale * weighted_product(u[0], u[1], mean_weights) for p, u in updates.items()}
  mean_rest = jax.tree.map(lambda x: jnp.tensordot(mean_weights, x, axes=1), rest_updates)
  return (
    privacy_lib.add_gaussian_noise(mean_products, std, product_key),
    privacy_lib.add_gaussian_noise(mean_rest, std, rest_key),
    mean_weights,
  )


class SynthesisConfig(NamedTuple):
  scale: float
  rank: int
  corrector: str = "none"
  learned_weights: bool = True
  fair_lam: float = 0.01
  fair_steps: int = 20
  fair_learning_rate: float = 1e-3


def update_factors(trained: dict, start: dict) -> tuple[jax.Array, jax.Array]:
  """Factors of the product update a b − a⁰ b⁰ as one rank-2r product, per client.

  trained, start: {"a": [C, d_in, r], "b": [C, r, d_out]} -> ([C, d_in, 2r], [C, 2r, d_out]).
  Returns:
    (a [C, d_in, 2r], b [C, 2r, d_out]).
  """
  return (jnp.concatenate([trained["a"], start["a"]], axis=-1), jnp.concatenate([trained["b"], -start["b"]], axis=-2))


def synthesize(
  params: Tree,
  modules: tuple[SynthesizerScores, ResidualGate],
  cfg: SynthesisConfig,
  global_params: Tree,
  client_params: Tree,
  weights: jax.Array,
  signatures: jax.Array,
  client_loss: jax.Array,
  residual: dict,
  client_starts: Tree | None = None,
  release: PrivateRelease | None = None,
) -> tuple[Tree, dict, dict]:
  """The new global params, the new residual memory and what was used to build them (a pure
  function of ψ, ω): {"weights": [C, L] synthesis weights w_{k,l}, "gates": [L] corrector
  gates (learned corrector only)}.

  Args:
    params: {"synth": ψ, "corr": ω}.
    global_params: any tree with LoRA layers (`lora.layers`); other leaves are averaged.
    client_params: [C, ...] returned params; weights [C] (sum 1, 0 = absent);
    signatures [C, D]; client_loss [C]; residual {layer: [d_in, d_out]} (E of the last round).
    client_starts: [C, ...] where each client started (None: the global params).
    release: client-level DP (`PrivateRelease`): the new product is s a b + the noisy mean of
      the clipped ΔP_k, the other leaves the global's plus their noisy mean change; S_ψ's
      scores and the clients' dispersion (a C_ω statistic) are not read.
  """
  scores_module, gate_module = modules
  client_layers = lora_lib.layers(client_params)
  global_layers = lora_lib.layers(global_params)
  paths = list(client_layers)
  clients = weights.shape[0]
  start_layers = (
    lora_lib.layers(client_starts)
    if client_starts is not None
    else {p: jax.tree.map(lambda x: jnp.broadcast_to(x, (clients,) + x.shape), global_layers[p]) for p in paths}
  )
  updates = {p: update_factors(client_layers[p], start_layers[p]) for p in paths}
  private_rest = None
  if release is None:
    layer_features = jnp.stack(
      [client_layer_features(*updates[p], weights, cfg.scale) for p in paths], axis=1
    )  # [C, L, 2]
    per_client = jnp.concatenate([signatures, client_loss[:, None]], -1)  # [C, D + 1]
    features = jnp.concatenate(
      [layer_features, jnp.broadcast_to(per_client[:, None], (per_client.shape[0], len(paths), per_client.shape[1]))],
      -1,
    )
    scores = (
      cast(jax.Array, scores_module.apply(params["synth"], features))
      if cfg.learned_weights
      else jnp.zeros(features.shape[:2])
    )
    synth_weights = synthesis_weights(scores, weights)  # [C, L]
    products = {
      p: cfg.scale
      * (global_layers[p]["a"] @ global_layers[p]["b"] + weighted_product(*updates[p], synth_weights[:, i]))
      for i, p in enumerate(paths)
    }
    dispersion = [jnp.std(layer_features[:, i, 1]) for i in range(len(paths))]
  else:
    starts = (
      client_starts
      if client_starts is not None
      else jax.tree.map(lambda x: jnp.broadcast_to(x, (clients,) + x.shape), global_params)
    )
    rest_updates = jax.tree.map(jnp.subtract, without_layers(client_params), without_layers(starts))
    mean_changes, mean_rest, _ = private_update(updates, rest_updates, weights, cfg.scale, release)
    products = {p: cfg.scale * global_layers[p]["a"] @ global_layers[p]["b"] + mean_changes[p] for p in paths}
    private_rest = jax.tree.map(jnp.add, without_layers(global_params), mean_rest)
    present = (weights > 0).astype(jnp.float32)
    synth_weights = jnp.broadcast_to(
      (present / jnp.maximum(jnp.sum(present), 1.0))[:, None], (clients, len(paths))
    )  # Uniform.
    dispersion = [jnp.zeros(())] * len(paths)  # Not read.
  targets, used = products, {"weights": synth_weights}
  if cfg.corrector == "learned":
    stats = jnp.stack(
      [
        jnp.stack([jnp.linalg.norm(residual[p]) / (jnp.linalg.norm(products[p]) + 1e-12), dispersion[i]])
        for i, p in enumerate(paths)
      ]
    )
    gates = cast(jax.Array, gate_module.apply(params["corr"], stats))
    targets = {p: products[p] + gates[i] * residual[p] for i, p in enumerate(paths)}
    used["gates"] = gates

  def refactorized(layer, global_layer, weights, target):
    del layer, weights
    a, b = refactorize(target, cfg.rank, cfg.scale, global_layer["a"])
    if cfg.corrector == "fair":
      b = b + fit_delta_b(
        a, b, target / cfg.scale, lam=cfg.fair_lam, steps=cfg.fair_steps, learning_rate=cfg.fair_learning_rate
      )
    return {"a": a, "b": b}, target - cfg.scale * a @ b

  new_global, missed = aggregate_layers(refactorized, global_params, client_params, weights, target=targets)
  if private_rest is not None:
    new_global = merge_rest(new_global, private_rest)
  return new_global, (missed if cfg.corrector == "learned" else {}), used


# The synthesizer's per-round diagnostics, kept in its state (the last one only with the learned
# corrector): `weight_entropy`, `weight_divergence`, the mean gate.
DIAGNOSTIC_METRICS = ("synth_weight_entropy", "synth_weight_kl", "corrector_gate")


def weight_entropy(synth_weights: jax.Array) -> jax.Array:
  """Mean over layers of the entropy (nats) of each layer's weights over clients. [C, L] -> [].

  Args:
    synth_weights: [C, L].
  Returns:
    Scalar.
  """
  logs = jnp.log(jnp.where(synth_weights > 0, synth_weights, 1.0))
  return jnp.mean(-jnp.sum(synth_weights * logs, axis=0))


def weight_divergence(synth_weights: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over layers of KL(w_{·,l} ‖ p): how far S_ψ moved from the FedAvg weights p
  (0 = the uniform limit). synth_weights [C, L], weights [C] -> [].

  Returns:
    Scalar.
  """
  present = synth_weights > 0
  ratio = jnp.where(present, synth_weights / jnp.maximum(weights[:, None], 1e-30), 1.0)
  kl = jnp.sum(jnp.where(present, synth_weights * jnp.log(ratio), 0.0), axis=0)
  return jnp.mean(jnp.maximum(kl, 0.0))  # ≥ 0; rounding can give -1e-9 when w = p.


def _synthesis_metrics(used: dict, weights: jax.Array) -> dict:
  """The aggregator's diagnostics from `synthesize`'s third output."""
  metrics = {
    "synth_weight_entropy": weight_entropy(used["weights"]),
    "synth_weight_kl": weight_divergence(used["weights"], weights),
  }
  if "gates" in used:
    metrics["corrector_gate"] = jnp.mean(used["gates"])
  return metrics


@states.typed_state
@dataclasses.dataclass(frozen=True)
class SynthesizerState(states.TypedState):
  """The state of `hyperlora_synthesizer` (checkpointed as the dict of its entries that are not None).

  Attributes:
    params: {"synth": S_ψ's params, "corr": C_ω's}.
    opt: their optimizer's state.
    residual: {layer: [d_in, d_out]} the learned corrector's running residual ({} without it).
    meta_loss: f32 [] the round's held-out meta-objective (None under DP).
    meta_step_skipped: int32 [] the round's meta-steps whose loss or gradient was non-finite
      (ψ, ω and their optimizer then stayed put; None under DP).
    synth_weight_entropy, synth_weight_kl: f32 [] the round's diagnostics (`weight_entropy`,
      `weight_divergence`).
    corrector_gate: f32 [] the mean gate g_l over layers (None without the learned corrector).
    rng: uint32 [2] the noise key's data (None without DP).
  """

  params: Tree
  opt: Tree
  residual: dict
  meta_loss: jax.Array | None = None
  meta_step_skipped: jax.Array | None = None
  synth_weight_entropy: jax.Array | None = None
  synth_weight_kl: jax.Array | None = None
  corrector_gate: jax.Array | None = None
  rng: jax.Array | None = None


class CrossRoundDerivativeWarning(UserWarning):
  """The synthesizer's meta-optimizer has a non-finite derivative at a zero gradient, so a
  derivative taken through several rounds (through ψ's update) would be NaN."""


def update_derivative_is_finite(optimizer: optax.GradientTransformation) -> bool:
  """Whether `optimizer.update`'s derivative is finite at a zero gradient, after one step (a
  zero second moment: `optax.adam` with eps_root=0 has sqrt's infinite derivative there).

  Args:
    optimizer: any optax optimizer.
  Returns:
    A Python bool.
  """
  params = {"w": jnp.zeros(3)}

  def second_update(g):
    state = optimizer.init(params)
    _, state = optimizer.update({"w": jnp.zeros(3)}, state, params)
    updates, _ = optimizer.update({"w": g}, state, params)
    return jnp.sum(updates["w"])

  return bool(jnp.all(jnp.isfinite(jax.grad(second_update)(jnp.zeros(3)))))


def hyperlora_synthesizer(
  cfg: SynthesisConfig,
  optimizer: optax.GradientTransformation,
  *,
  hidden: int = 32,
  meta_learning: bool = True,
  meta_steps: int = 1,
  privacy: tuple[float, float] | None = None,
) -> Aggregator:
  """S_ψ and C_ω as a meta-learned `Aggregator` (module docstring).

  It owns one held-out step of each client's block (`heldout_steps=1`) and reads the
  context's `signatures`, `client_loss` and `heldout_loss`. `meta_learning=False` keeps ψ, ω
  at their initial values (the uniform limit). `meta_steps` optimizer steps on (ψ, ω) per round,
  all on this round's meta-objective; the aggregate is the one of the last (ψ, ω) evaluated,
  so 1 step aggregates with the round's starting (ψ, ω) and then updates them. The layers are
  read from the global params.
  State: a `SynthesizerState`; its metrics are "meta_loss", "meta_step_skipped" and the
  diagnostics "synth_weight_entropy", "synth_weight_kl" and, with the learned corrector,
  "corrector_gate".

  `privacy=(clip_norm, noise_multiplier)`: client-level DP (`PrivateRelease`, one release a
  round). It needs the uniform synthesizer and no meta-learning (ψ, ω would learn from
  per-client held-out gradients outside the accountant), holds out no steps and reports no
  meta-loss; the state adds `rng`, the noise key's data.

  The aggregate is differentiable (the re-factorization's exact derivative, `aligned_basis`).
  A derivative through several rounds also differentiates ψ's update, `optimizer.update`:
  `optax.adam` needs eps_root > 0 for it (e.g. `optax.adam(1e-3, eps_root=1e-16)`), else a
  zero meta-gradient entry makes it NaN; an optimizer with that defect draws a
  `CrossRoundDerivativeWarning` here (meta-learning alone never differentiates it).

  Args:
    cfg: the synthesizer's configuration (scale, rank, corrector, ...).
    optimizer: ψ's and ω's optax optimizer.
    hidden: the width of S_ψ's and C_ω's hidden layers.
    meta_learning: learn ψ, ω (False: the uniform limit).
    meta_steps: optimizer steps on (ψ, ω) per round.
    privacy: (clip_norm, noise_multiplier), or None.
  Returns:
    An `Aggregator`.
  """
  diagnostic_metrics = DIAGNOSTIC_METRICS if cfg.corrector == "learned" else DIAGNOSTIC_METRICS[:2]
  if privacy is not None and (meta_learning or cfg.learned_weights):
    raise ValueError(
      "a private HyperLoRA synthesizer needs learned_weights=False and meta_learning=False: "
      "S_ψ and C_ω would learn from per-client held-out gradients that the privacy "
      "accountant does not cover"
    )
  if meta_learning and not update_derivative_is_finite(optimizer):
    warnings.warn(
      "hyperlora_synthesizer: the meta-optimizer's update has a non-finite derivative at a zero "
      "gradient (optax.adam with eps_root=0), so a derivative taken through several rounds would be "
      "NaN; give it eps_root > 0 (optax.adam(lr, eps_root=1e-16)) if you differentiate through rounds",
      CrossRoundDerivativeWarning,
      stacklevel=2,
    )

  def modules_for(global_params):
    num_layers = len(lora_lib.layers(global_params))
    return SynthesizerScores(num_layers=num_layers, hidden=hidden), ResidualGate(num_layers=num_layers)

  def init(global_params, rng=None, signature_dim=0):
    if rng is None:
      raise ValueError("the HyperLoRA synthesizer's init needs an rng (its ψ, ω are random)")
    targets = {path: (f["a"].shape[0], f["b"].shape[1]) for path, f in lora_lib.layers(global_params).items()}
    modules = modules_for(global_params)
    k1, k2 = jax.random.split(rng)
    params = {
      "synth": modules[0].init(k1, jnp.zeros((1, len(targets), 3 + signature_dim))),
      "corr": modules[1].init(k2, jnp.zeros((len(targets), 2))),
    }
    residual = (
      {path: jnp.zeros(shape, jnp.float32) for path, shape in targets.items()} if cfg.corrector == "learned" else {}
    )
    state = SynthesizerState(
      params=params,
      opt=optimizer.init(params),
      residual=residual,
      **{name: jnp.zeros((), jnp.float32) for name in diagnostic_metrics},
    )
    if privacy is None:
      return state.replace(meta_loss=jnp.zeros((), jnp.float32), meta_step_skipped=jnp.zeros((), jnp.int32))
    return state.replace(rng=jax.random.key_data(jax.random.fold_in(rng, 11)))

  def private_aggregate(state, global_params, client_params, weights, context: AggregationContext):
    assert privacy is not None  # Only built with it.
    clip_norm, noise_multiplier = privacy
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    new_global, residual, used = synthesize(
      state.params,
      modules_for(global_params),
      cfg,
      global_params,
      client_params,
      weights,
      jnp.zeros((weights.shape[0], 0)),
      jnp.zeros(weights.shape),
      state.residual,
      context.client_starts if context is not None else None,
      PrivateRelease(clip_norm, noise_multiplier, noise_key),
    )
    return (
      new_global,
      {},
      state.replace(
        residual=residual, rng=jax.random.key_data(key), **jax.lax.stop_gradient(_synthesis_metrics(used, weights))
      ),
    )

  def aggregate(state, global_params, client_params, weights, context: AggregationContext):
    modules = modules_for(global_params)
    signatures = context.signatures
    if signatures is None:
      signatures = jnp.zeros((weights.shape[0], 0), jnp.float32)

    def objective(params):
      new_global, residual, used = synthesize(
        params,
        modules,
        cfg,
        global_params,
        client_params,
        weights,
        signatures,
        context.client_loss,
        state.residual,
        context.client_starts,
      )
      return context.heldout_loss(new_global), (new_global, residual, _synthesis_metrics(used, weights))

    if meta_learning:
      participants = jnp.sum(weights) > 0

      def meta_step(params, opt_state):
        """One step on (ψ, ω); (its loss, aggregate, residual, diagnostics, skipped) too."""
        (meta_loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # No participant (or a non-finite meta-gradient): ψ, ω and their optimizer stay put.
        sound = jnp.isfinite(meta_loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        ok = participants & sound
        new_params, new_opt_state = jax.tree.map(
          lambda n, o: jnp.where(ok, n, o), (new_params, new_opt_state), (params, opt_state)
        )
        return new_params, new_opt_state, (meta_loss, aux, (participants & ~sound).astype(jnp.int32))

      params, opt_state, (meta_loss, (new_global, residual, diagnostics), skipped) = meta_step(state.params, state.opt)
      if meta_steps > 1:  # The rest in a scan: one compiled step, whatever their number.

        def more(carry, _):
          params, opt_state, skipped = carry
          params, opt_state, (loss, aux, step_skipped) = meta_step(params, opt_state)
          return (params, opt_state, skipped + step_skipped), (loss, aux)

        (params, opt_state, skipped), (losses, auxes) = jax.lax.scan(
          more, (params, opt_state, skipped), None, length=meta_steps - 1
        )
        meta_loss = losses[-1]
        new_global, residual, diagnostics = jax.tree.map(lambda x: x[-1], auxes)
    else:
      meta_loss, (new_global, residual, diagnostics) = objective(state.params)
      params, opt_state, skipped = state.params, state.opt, jnp.zeros((), jnp.int32)
    return (
      new_global,
      {},
      SynthesizerState(
        params=params,
        opt=opt_state,
        residual=residual,
        meta_loss=meta_loss,
        meta_step_skipped=skipped,
        **jax.lax.stop_gradient(diagnostics),
      ),
    )

  if privacy is not None:
    return Aggregator(
      init,
      private_aggregate,
      Capabilities(
        name=f"hyperlora_synthesizer[dp {privacy[0]}, {privacy[1]}]",
        plain_server_step=True,
        heterogeneous_ranks=True,
        metrics=diagnostic_metrics,
      ),
    )
  return Aggregator(
    init,
    aggregate,
    Capabilities(
      name="hyperlora_synthesizer",
      plain_server_step=True,
      heterogeneous_ranks=True,
      heldout_steps=1,
      metrics=("meta_loss", "meta_step_skipped") + diagnostic_metrics,
    ),
  )
