"""One client's local update (`hyperlora_jax.client`): which steps run, against optax by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperlora_jax.client import local_update, masked_mean


def _quadratic_loss(params, frozen, batch, rng):
  """Mean over the batch's real examples of 0.5 |w - x|²; w [2, 3], x [B, 2, 3]."""
  del frozen, rng
  per_example = 0.5 * jnp.sum((params["w"][None] - batch["x"]) ** 2, axis=(1, 2))
  return masked_mean(per_example, batch["mask"]), {}


def _by_hand(optimizer, params, batches):
  """optax's own loop over the batches given (the steps that should run), one update each."""
  state = optimizer.init(params)
  for batch in batches:
    grads = jax.grad(lambda p: _quadratic_loss(p, None, batch, None)[0])(params)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize(
  "optimizer",
  [optax.adam(1e-2), optax.adamw(1e-2, weight_decay=0.1), optax.sgd(1e-2, momentum=0.9)],
  ids=["adam", "adamw", "momentum"],
)
def test_steps_without_examples_leave_params_and_optimizer_state_as_they_were(optimizer):
  # Steps: real, padding, real, padding. Only the two real steps may run: a padding step that
  # ran would move the parameters (momentum, Adam's moments, weight decay) and advance Adam's
  # step count, which changes the second real step's bias correction.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 2, 3)).astype(np.float32)
  mask = np.ones((4, 5), np.float32)
  mask[1] = mask[3] = 0.0
  start = {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
  trained, metrics = local_update(_quadratic_loss, optimizer)(
    start, None, {"x": jnp.asarray(x), "mask": jnp.asarray(mask)}, jax.random.key(0)
  )
  real = [{"x": jnp.asarray(x[s]), "mask": jnp.asarray(mask[s])} for s in (0, 2)]
  np.testing.assert_allclose(trained["w"], _by_hand(optimizer, start, real)["w"], rtol=1e-6, atol=1e-7)
  assert float(metrics["examples"]) == 10.0
  assert not np.allclose(trained["w"], _by_hand(optimizer, start, real[:1])["w"])  # The second real step ran.


def test_a_partly_masked_step_still_runs_on_its_real_examples():
  x = jnp.arange(2 * 4 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 2, 3) / 10
  mask = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
  start = {"w": jnp.zeros((2, 3))}
  trained, metrics = local_update(_quadratic_loss, optax.sgd(0.5))(
    start, None, {"x": x, "mask": mask}, jax.random.key(0)
  )
  # SGD on the mean of the real examples, by hand: w1 = w0 - 0.5 (w0 - x00); w2 = w1 - 0.5 (w1 - mean(x10, x11)).
  w1 = 0.5 * x[0, 0]
  w2 = w1 - 0.5 * (w1 - (x[1, 0] + x[1, 1]) / 2)
  np.testing.assert_allclose(trained["w"], w2, rtol=1e-6)
  assert float(metrics["examples"]) == 3.0


def test_vmapped_clients_read_their_steps_in_place_without_a_copy_of_the_block():
  """The round vmaps the update over a [C, S, B, ...] block. Scanning each client's S axis made
  XLA copy the whole block to [S, C, ...] (a transpose as large as the round's images: 2.9 GiB
  of temporaries for 64 clients of 10 x 32 images at 224 px on an H100 or this CPU); the steps
  are read by index, so the compiled program's temporaries stay far below the block's bytes."""

  def loss(params, frozen, batch, rng):
    x = batch["image"].astype(jnp.float32).reshape(batch["image"].shape[0], -1)[:, :8]
    return masked_mean(jnp.sum((x @ params["w"]) ** 2, -1), batch["mask"]), {}

  clients, steps, batch = 16, 6, 8
  block = {
    "image": jax.ShapeDtypeStruct((clients, steps, batch, 32, 32, 3), jnp.uint8),
    "mask": jax.ShapeDtypeStruct((clients, steps, batch), jnp.float32),
  }
  params = {"w": jax.ShapeDtypeStruct((clients, 8, 2), jnp.float32)}
  update = local_update(loss, optax.sgd(0.1))
  round_fn = jax.jit(jax.vmap(lambda p, b: update(p, {}, b, jax.random.key(0))[0]))
  memory = round_fn.lower(params, block).compile().memory_analysis()
  image_bytes = clients * steps * batch * 32 * 32 * 3
  assert memory.argument_size_in_bytes >= image_bytes
  assert memory.temp_size_in_bytes < image_bytes / 4
