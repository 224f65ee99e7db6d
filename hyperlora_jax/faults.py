"""Fault injection for simulated clients (pure functions; `FederatedRound(faults=...)`).

Each round, among the sampled (non-padding) clients, `round(fraction x participants)` clients get
each fault, drawn without overlap from the round's PRNG key (so reproducibly from the seed):

  dropout     the client trains, but its update is lost on the way up (weight 0);
  straggler   the client completes only `straggler_steps` (a fraction, at least one step) of its
              local steps, and sends that;
  nonfinite   the client sends NaN/Inf factors (what the round's non-finite check must catch);
  byzantine   the client sends a malicious update u' in place of its real one u = θ − θ⁰:
                sign_flip  u' = −scale u;   scale  u' = scale u;
                random     u' = scale ‖u‖ g/‖g‖, g ~ N(0, I) (per leaf).

All shapes are per round: C sampled clients (padding included), leaves [C, ...].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hyperlora_jax.pytree import Tree

BYZANTINE_KINDS = ("sign_flip", "scale", "random")
FAULT_KINDS = ("dropout", "straggler", "nonfinite", "byzantine")


@dataclasses.dataclass(frozen=True)
class Faults:
  """Fractions of each round's participants that get each fault (each in [0, 1], sum <= 1)."""

  dropout: float = 0.0
  straggler: float = 0.0
  straggler_steps: float = 0.5
  nonfinite: float = 0.0
  byzantine: float = 0.0
  byzantine_kind: str = "sign_flip"
  byzantine_scale: float = 1.0

  def __post_init__(self):
    fractions = {k: getattr(self, k) for k in FAULT_KINDS}
    for name, value in fractions.items():
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"faults.{name}: a fraction in [0, 1], got {value}")
    if sum(fractions.values()) > 1.0:
      raise ValueError(f"faults: the fractions {fractions} add up to more than 1")
    if not 0.0 < self.straggler_steps <= 1.0:
      raise ValueError(f"faults.straggler_steps: a fraction in (0, 1], got {self.straggler_steps}")
    if self.byzantine_kind not in BYZANTINE_KINDS:
      raise ValueError(f"faults.byzantine_kind: {self.byzantine_kind!r}; allowed: {BYZANTINE_KINDS}")

  @property
  def active(self) -> bool:
    return any(getattr(self, k) > 0 for k in FAULT_KINDS)


def draw(faults: Faults, key: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """{kind: [C] bool} disjoint fault masks over the valid clients ([C] bool).

  round(fraction x Σ valid) clients per kind, assigned in `FAULT_KINDS` order along a random
  permutation of the valid clients; padding clients get none.

  Args:
    faults: the fractions per kind.
    key: a PRNG key.
    valid: [C] bool, the real (not padding) clients.
  Returns:
    {kind: [C] bool}.
  """
  participants = jnp.sum(valid)
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0))  # Valid first.
  position = jnp.zeros(valid.shape, jnp.int32).at[order].set(jnp.arange(valid.shape[0], dtype=jnp.int32))
  masks, start = {}, jnp.zeros((), jnp.int32)
  for kind in FAULT_KINDS:
    count = jnp.round(getattr(faults, kind) * participants).astype(jnp.int32)
    masks[kind] = valid & (position >= start) & (position < start + count)
    start = start + count
  return masks


def steps_done(faults: Faults, stragglers: jax.Array, num_steps: int) -> jax.Array:
  """[C] int32 local steps each client completes (stragglers: max(1, ⌊straggler_steps x S⌋)).

  Args:
    faults: the fault configuration.
    stragglers: [C] bool.
    num_steps: S.
  Returns:
    [C] int32 in [1, S].
  """
  partial = max(1, int(faults.straggler_steps * num_steps))
  return jnp.where(stragglers, partial, num_steps).astype(jnp.int32)


def corrupt(faults: Faults, trained: Tree, starts: Tree, masks: dict[str, jax.Array], key: jax.Array) -> Tree:
  """`trained` [C, ...] with the non-finite and Byzantine clients' params replaced by what they
  send instead (relative to their starts [C, ...]).

  Args:
    faults: the fault configuration.
    trained, starts: the clients' trees, [C, ...] leaves.
    masks: `draw`'s.
    key: a PRNG key.
  Returns:
    The trees sent, [C, ...] leaves.
  """
  leaves, treedef = jax.tree.flatten(trained)
  start_leaves = jax.tree.leaves(starts)
  keys = jax.random.split(key, len(leaves) + 1)
  nan_or_inf = jax.random.bernoulli(keys[-1], 0.5, masks["nonfinite"].shape)
  out = []
  for leaf, start, leaf_key in zip(leaves, start_leaves, keys[:-1]):
    expand = lambda m, x=leaf: m.reshape((-1,) + (1,) * (x.ndim - 1))
    update = leaf - start
    if faults.byzantine_kind == "sign_flip":
      malicious = start - faults.byzantine_scale * update
    elif faults.byzantine_kind == "scale":
      malicious = start + faults.byzantine_scale * update
    else:
      noise = jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
      axes = tuple(range(1, leaf.ndim))
      norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))
      malicious = start + faults.byzantine_scale * norm(update) * noise / jnp.maximum(norm(noise), 1e-12)
    leaf = jnp.where(expand(masks["byzantine"]), malicious, leaf)
    bad = jnp.where(expand(nan_or_inf), jnp.inf, jnp.nan).astype(leaf.dtype)
    out.append(jnp.where(expand(masks["nonfinite"]), bad, leaf))
  return jax.tree.unflatten(treedef, out)


def client_inputs(faults: Faults, masks: dict[str, jax.Array], num_steps: int) -> tuple[jax.Array, ...]:
  """The per-client fault inputs `with_faults` reads, appended to the round's client inputs:
  ([C] steps done, [C] non-finite, [C] Byzantine).

  Args:
    faults: the fault configuration.
    masks: `draw`'s.
    num_steps: S.
  Returns:
    ([C] int32, [C] bool, [C] bool).
  """
  return steps_done(faults, masks["straggler"], num_steps), masks["nonfinite"], masks["byzantine"]


def with_faults(train_client: Callable, faults: Faults) -> Callable:
  """`train_client` ((inputs, steps_done) -> (trained, metrics, start)) with one client's
  injected faults, read from the last three entries of its inputs (`client_inputs`): a straggler
  stops after its steps; a non-finite or Byzantine client sends `corrupt`'s update instead of
  what it trained (drawn from its key, inputs[4], folded with 1).

  Args:
    train_client: one client's update.
    faults: the fault configuration.
  Returns:
    The same signature, faults injected.
  """

  def faulty(inputs):
    steps, nonfinite, byzantine = inputs[-3:]
    trained, metrics, start = train_client(inputs[:-3], steps)
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)
    key = jax.random.fold_in(jax.random.wrap_key_data(inputs[4]), 1)
    sent = corrupt(faults, one(trained), one(start), {"nonfinite": nonfinite[None], "byzantine": byzantine[None]}, key)
    return jax.tree.map(lambda x: x[0], sent), metrics, start

  return faulty


def fault_metrics(masks: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """{"faults_<kind>": int32 count} for the round's metrics.

  Args:
    masks: `draw`'s.
  Returns:
    {"faults_<kind>": scalar int32}.
  """
  return {f"faults_{kind}": jnp.sum(mask).astype(jnp.int32) for kind, mask in masks.items()}
