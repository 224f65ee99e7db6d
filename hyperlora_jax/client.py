"""One client's local update for any model and loss: a `lax.scan` over its steps, each reading
its batch by index (so a vmapped [C, S, ...] block is never transposed to [S, C, ...]).

A loss function is `loss_fn(trainable, frozen, batch, rng) -> (loss, aux)`:
  trainable  the pytree the client trains (a LoRA adapter, a head, ...);
  frozen     what it does not (the backbone's variables, and anything else the task needs);
  batch      one step's pytree of arrays, e.g. {"x": [B, ...], "y": [B]}; an optional
             "mask" [B] (1 = real example, 0 = padding) is the loss's to honour, and is used
             here to count examples and to skip empty steps (no optimizer update at all);
  rng        a PRNG key for this step (dropout, noise), distinct per client and step.
Classification, regression and next-token losses all fit (`masked_mean` helps with masks).

`local_update(loss_fn, optimizer)` returns a `ClientUpdate`, a pure function the round vmaps
over clients: the frozen tree enters unbatched (one copy for all clients).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from hyperlora_jax.pytree import Tree

LossFn = Callable[[Tree, Tree, Tree, jax.Array], tuple[jax.Array, Any]]


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of `values` [B] over unmasked entries (0 if none); plain mean when mask is None.

  Args:
    values: [B] per-example values.
    mask: [B] in {0, 1}, or None.
  Returns:
    Scalar.
  """
  if mask is None:
    return jnp.mean(values)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def example_count(batch: Tree) -> jax.Array:
  """Real examples in one step's batch: Σ mask if the batch has a "mask", else its size.

  Args:
    batch: one step's batch, a pytree of [B, ...] arrays (with a [B] "mask" if padded).
  Returns:
    Scalar float32.
  """
  if isinstance(batch, dict) and "mask" in batch:
    return jnp.sum(batch["mask"])
  return jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
  """`update(start, frozen, batches, rng, update_mask=None, steps_done=None) -> (trained, metrics)`.

  Runs one client's local steps from `start` with a fresh optimizer state.
  Attributes:
    loss_fn: `loss_fn(trainable, frozen, batch, rng) -> (scalar loss, aux)` (module docstring);
      checked when traced.
    optimizer: the client's optax optimizer.
    steps: S, the local steps a call expects (None: as many as `batches` has); a batch with
      another number of steps is refused, which catches batches given without the steps axis.
    unroll: `lax.scan`'s unroll of the steps (True: a program without a loop; `plan` compiles
      it so for XLA's cost analysis, which counts a loop body once). The results are the same.

  Args:
    start: the client's initial trainable pytree.
    frozen: the frozen pytree, passed to `loss_fn` as is.
    batches: pytree with a leading [S] steps axis (S local steps), then each step's batch
      (e.g. {"x": [S, B, ...], "y": [S, B], "mask": [S, B]}).
    rng: PRNG key; step s gets `fold_in(rng, s)`.
    update_mask: pytree like `start` of float scalars; 0 freezes a leaf (FFA-LoRA's A,
      RoLoRA's alternation, components beyond a client's rank) by zeroing its updates.
    steps_done: int scalar, the steps this client completes (a straggler); later steps
      change nothing and count no loss or examples (None: all S). A step whose batch has no
      example (all-zero "mask": a small client's padding) is skipped the same way.
  Returns:
    (trained pytree like `start`, {"loss": mean loss over steps with examples,
     "examples": examples seen, "first_loss" / "last_loss": the loss of the first / last
     step with examples (before its update; the same step when none has any), "aux":
     `loss_fn`'s aux of the last step}).
  """

  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  steps: int | None = None
  unroll: int | bool = 1

  def __call__(
    self,
    start: Tree,
    frozen: Tree,
    batches: Tree,
    rng: jax.Array,
    update_mask: Tree | None = None,
    steps_done: jax.Array | None = None,
  ) -> tuple[Tree, dict]:
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    if self.steps is not None and num_steps != self.steps:
      raise ValueError(
        f"local_update(steps={self.steps}): batches have {num_steps} steps on their leading "
        f"axis; one client's batches are [S, B, ...] (the round's [C, S, B, ...])"
      )
    check_loss_contract(self.loss_fn, start, frozen, jax.tree.map(lambda x: x[0], batches), rng)

    def step(carry, inputs):
      params, opt_state = carry
      key, index = inputs
      # The step's batch is read by index, not scanned over: under the round's vmap the block is
      # [C, S, ...], and scanning its S axis made XLA (GPU and CPU) copy the whole block to [S, C, ...].
      batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False), batches)
      (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(params, frozen, batch, key)
      updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
      if update_mask is not None:
        updates = jax.tree.map(lambda u, m: u * m, updates, update_mask)
      new_params = optax.apply_updates(params, updates)
      count = example_count(batch)
      # A step runs only with examples (padding steps of a small client are skipped: with
      # momentum, Adam or weight decay a zero gradient still moves the parameters) and before
      # a straggler's `steps_done`; a skipped step leaves parameters and optimizer state as they were.
      runs = count > 0
      if steps_done is not None:
        runs &= index < steps_done
      new_params, new_opt_state = jax.tree.map(
        lambda n, o: jnp.where(runs, n, o), (new_params, new_opt_state), (params, opt_state)
      )
      return (new_params, new_opt_state), (loss, jnp.where(runs, count, 0.0), aux)

    keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.arange(num_steps))
    (trained, _), (losses, counts, aux) = jax.lax.scan(
      step, (start, self.optimizer.init(start)), (keys, jnp.arange(num_steps)), unroll=self.unroll
    )
    active = (counts > 0).astype(losses.dtype)
    mean_loss = jnp.sum(losses * active) / jnp.maximum(jnp.sum(active), 1.0)
    first, last = jnp.argmax(active), num_steps - 1 - jnp.argmax(active[::-1])  # Steps with examples.
    return trained, {
      "loss": mean_loss,
      "examples": jnp.sum(counts),
      "first_loss": losses[first],
      "last_loss": losses[last],
      "aux": jax.tree.map(lambda x: x[-1], aux),
    }


def local_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, steps: int | None = None) -> ClientUpdate:
  """A client update of `loss_fn` steps with `optimizer`, `steps` of them if given (see `ClientUpdate`).

  Args:
    loss_fn: `loss_fn(trainable, frozen, batch, rng) -> (scalar loss, aux)`.
    optimizer: the client's optax optimizer (its state starts fresh every call).
    steps: S, the local steps every call must be given, or None (any).
  Returns:
    A `ClientUpdate`: a pure function the round vmaps over clients.
  """
  return ClientUpdate(loss_fn, optimizer, steps)


def check_loss_contract(loss_fn: LossFn, trainable: Tree, frozen: Tree, batch: Tree, rng: jax.Array) -> None:
  """Raises TypeError unless `loss_fn(trainable, frozen, batch, rng)` returns (scalar loss, aux);
  traced abstractly (no computation).

  Args:
    loss_fn: the loss to check.
    trainable, frozen, batch, rng: one client's arguments (arrays or ShapeDtypeStructs).
  Raises:
    TypeError: naming what `loss_fn` returned instead.
  """
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)
  out = jax.eval_shape(loss_fn, abstract(trainable), abstract(frozen), abstract(batch), abstract(rng))
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      f"loss_fn must return (loss, aux): a scalar loss and any aux pytree ({{}} for none), "
      f"the contract loss_fn(trainable, frozen, batch, rng) -> (loss, aux); it returned "
      f"{jax.tree.map(lambda s: f'{s.dtype}{list(s.shape)}', out)}"
    )
  loss = out[0]
  if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
      f"loss_fn must return (loss, aux) with a float scalar loss (the mean over the batch's "
      f"examples); its loss is {jax.tree.map(lambda s: f'{s.dtype}{list(s.shape)}', loss)}"
    )
