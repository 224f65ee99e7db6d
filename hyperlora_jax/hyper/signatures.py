"""Client distribution signatures: what the HyperLoRA generator and synthesizer condition on.

A client computes its signature once, locally, from its training data and the frozen
backbone, and sends it up once (counted in bytes up of round 1). Kinds, combinable with '+':
  "label"     the normalized label histogram, times the number of classes (mean entry 1) [K]
  "features"  statistics of frozen-backbone features f(x) [d]: their mean [d] and a
              low-rank summary of their covariance, Qᵀ Σ Q for a fixed random orthonormal
              Q [d, q] shared by all clients (upper triangle, q(q+1)/2 numbers); unlike
              principal directions it has no sign ambiguity.
The learned per-client embedding (pFedHN-style) is the generator's, not a signature
(`hyperlora.signature` may name "embedding" to turn it on). For privacy a client may clip its
signature to L2 norm `clip_norm` and add Gaussian noise of standard deviation `noise_std`
(client-level DP: `noise_std` = σ_s · `clip_norm`, `hyperlora_jax.privacy`).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.privacy import clip_factors

SIGNATURE_KINDS = ("label", "features", "embedding")
STATISTIC_KINDS = ("label", "features")  # Computed from the client's data and sent (privacy).


def statistic_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
  """The kinds among `kinds` that are data statistics a client sends (not the embedding).

  Args:
    kinds: signature kinds, e.g. ("label", "features", "embedding").
  Returns:
    The data-statistic kinds, in order.
  """
  return tuple(k for k in kinds if k in STATISTIC_KINDS)


def parse_kinds(spec: str) -> tuple[str, ...]:
  """'label+features' -> ('label', 'features'); raises ValueError on an unknown kind.

  Args:
    spec: kinds joined by '+'.
  Returns:
    The kinds, in order.
  """
  kinds = tuple(k for k in spec.split("+") if k)
  unknown = [k for k in kinds if k not in SIGNATURE_KINDS]
  if unknown:
    raise ValueError(f"unknown signature kind(s) {unknown}; allowed: {'+'.join(SIGNATURE_KINDS)}")
  return kinds


def label_histogram(labels: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
  """labels, mask: [n] -> [K] histogram of the unmasked labels, normalized to mean 1.

  Returns:
    [K] float32.
  """
  counts = jnp.zeros(num_classes).at[labels].add(mask)
  return num_classes * counts / jnp.maximum(jnp.sum(counts), 1.0)


def feature_statistics(features: jax.Array, mask: jax.Array, basis: jax.Array) -> jax.Array:
  """features [n, d], mask [n], basis Q [d, q] -> [d + q(q+1)/2]: mean, then triu(Qᵀ Σ Q).

  Returns:
    [d + q(q+1)/2] float32.
  """
  count = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(features * mask[:, None], axis=0) / count
  projected = (features - mean) @ basis  # [n, q]
  covariance = (projected * mask[:, None]).T @ projected / count
  rows, cols = np.triu_indices(basis.shape[1])
  return jnp.concatenate([mean, covariance[rows, cols]])


def random_basis(dim: int, rank: int, seed: int = 0) -> jax.Array:
  """A fixed [dim, rank] orthonormal basis (QR of a seeded Gaussian), the same on all clients.

  Args:
    dim: d; rank: q <= d; seed: the Gaussian's seed.
  Returns:
    [dim, rank] with orthonormal columns.
  """
  gaussian = jax.random.normal(jax.random.key(seed), (dim, rank))
  return jnp.linalg.qr(gaussian)[0]


def signature_dim(kinds: tuple[str, ...], num_classes: int, feature_dim: int, covariance_rank: int) -> int:
  """Length D of a signature of `kinds` (the embedding adds nothing here).

  Args:
    kinds: signature kinds; num_classes: K; feature_dim: d; covariance_rank: q.
  Returns:
    D, an int.
  """
  dim = num_classes if "label" in kinds else 0
  if "features" in kinds:
    dim += feature_dim + covariance_rank * (covariance_rank + 1) // 2
  return dim


def make_signature_fn(
  featurize: Callable[..., jax.Array],
  kinds: tuple[str, ...],
  num_classes: int,
  basis: jax.Array | None,
  noise_std: float = 0.0,
  batch_size: int = 256,
  clip_norm: float | None = None,
  example_keys: tuple[str, ...] = ("image",),
) -> Callable[[dict, jax.Array], jax.Array]:
  """Builds the pure `signatures(client_data, rng) -> [N, D]` for all clients at once.

  Args:
    featurize: the examples' arrays named by `example_keys`, each [b, ...] -> frozen-backbone
      features [b, d]: images [b, H, W, 3] uint8 by default; e.g. (input_ids [b, T],
      attention_mask [b, T]) for text (`tasks.causal_lm.mean_hidden_state`).
    basis: Q [d, q] for the covariance summary (needed with "features").
    clip_norm: each signature is scaled to L2 norm at most this before the noise (None: not).
  `client_data` is {"image": [N, n, H, W, 3] (or the `example_keys` arrays [N, n, ...]),
  "label": [N, n], "mask": [N, n]} (padded); "label" is the class (for text: the record's
  group) the "label" kind counts. Clients are processed with `lax.map` and each client's
  examples in chunks of `batch_size`.
  """

  def one_client(args):
    data, key = args
    parts = []
    if "label" in kinds:
      parts.append(label_histogram(data["label"], data["mask"], num_classes))
    if "features" in kinds:
      n = data["label"].shape[0]
      pad = (-n) % batch_size
      arrays = tuple(jnp.pad(data[k], ((0, pad),) + ((0, 0),) * (data[k].ndim - 1)) for k in example_keys)
      features = jax.lax.map(
        lambda xs: featurize(*xs), tuple(a.reshape((-1, batch_size) + a.shape[1:]) for a in arrays)
      )
      features = features.reshape(-1, features.shape[-1])[:n]
      parts.append(feature_statistics(features, data["mask"], basis))
    signature = jnp.concatenate(parts) if parts else jnp.zeros((0,))
    if clip_norm is not None:
      signature = signature * clip_factors(jnp.linalg.norm(signature), clip_norm)
    return signature + noise_std * jax.random.normal(key, signature.shape)

  def signatures(client_data: dict, rng: jax.Array) -> jax.Array:
    """rng: one key (split over the clients) or [N] keys, one per client."""
    keys = rng if rng.shape else jax.random.split(rng, client_data["label"].shape[0])
    return jax.lax.map(one_client, (client_data, keys))

  return signatures


def compute_signatures(
  model: Any,
  backbone: Any,
  client_data: dict,
  kinds: tuple[str, ...],
  num_classes: int,
  *,
  preprocess: Callable[[jax.Array], jax.Array] | None = None,
  covariance_rank: int = 8,
  noise_std: float = 0.0,
  seed: int = 0,
  client_keys: jax.Array | None = None,
  clip_norm: float | None = None,
  featurize: Callable[..., jax.Array] | None = None,
  example_keys: tuple[str, ...] = ("image",),
) -> np.ndarray:
  """[N, D] signatures of every client (host array) with the frozen `model` (ViT-like:
  `apply(variables, images, return_features=True)`).

  preprocess: images [..., H, W, 3] uint8 -> the model's inputs (its own input convention).
  featurize, example_keys: instead of the ViT-like default, features of other examples (see
  `make_signature_fn`), e.g. a decoder's mean hidden state of `("input_ids", "attention_mask")`.

  client_keys: [N] noise keys, one per client (default: `key(seed)` split over the N clients),
  so clients computed in blocks get the keys they would get all at once.

  Args:
    model, backbone: the frozen model and its variables.
    client_data: {key: [N, n, ...]} each client's examples, with a "mask" [N, n] and "label".
    kinds: signature kinds; num_classes: K.
    covariance_rank: q of `feature_statistics`.
    noise_std, seed: Gaussian noise on each signature (privacy), and its seed.
    clip_norm: each signature clipped to this L2 norm first (None: not clipped).
  Returns:
    [N, D] float32 NumPy.
  """
  if not statistic_kinds(kinds):
    return np.zeros((client_data["label"].shape[0], 0), np.float32)
  if featurize is None:
    if preprocess is None:
      raise ValueError("compute_signatures: give preprocess= (images -> the model's inputs) or featurize=")
    to_inputs = preprocess
    featurize = lambda images: model.apply(backbone, to_inputs(images), return_features=True)
  basis = None
  if "features" in kinds:
    feature_dim = jax.eval_shape(featurize, *(client_data[k][0, :1] for k in example_keys)).shape[-1]
    basis = random_basis(feature_dim, min(covariance_rank, feature_dim), seed)
  fn = jax.jit(
    make_signature_fn(featurize, kinds, num_classes, basis, noise_std, clip_norm=clip_norm, example_keys=example_keys)
  )
  return np.asarray(fn(client_data, jax.random.key(seed) if client_keys is None else client_keys))
