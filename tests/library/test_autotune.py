"""The measured `clients_per_chunk`, its cache and the run's record of it; the compute options
(bf16 backbone, rematerialized ViT blocks)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from hyperlora_jax import autotune, models
from hyperlora_jax.tasks.image_classification import ImageClassification, backbone_dtype, frozen_tree
from experiments.runner.workdir import ENVIRONMENT_FILE
from experiments.runner.image_experiment import initial_trainable
from experiments.runner.train import train_and_evaluate


def test_chunk_candidates_are_divisors_near_the_targets():
  assert autotune.chunk_candidates(10) == [1, 2, 10]
  assert autotune.chunk_candidates(64) == [1, 4, 16, 64]
  assert autotune.chunk_candidates(48) == [1, 4, 16, 48]
  assert autotune.chunk_candidates(7) == [1, 7]
  assert autotune.chunk_candidates(1) == [1]


def test_measure_times_every_candidate_and_picks_the_fastest():
  fn = lambda x: jnp.sin(x) @ jnp.ones((8, 8))
  xs = jnp.ones((12, 4, 8))
  choice = autotune.measure_clients_per_chunk(fn, xs, repeats=1)
  assert sorted(choice.seconds) == [1, 4, 12]
  assert choice.clients_per_chunk == min(choice.seconds, key=choice.seconds.get)
  assert not choice.cached


def test_measure_times_the_candidates_interleaved_so_a_drifting_machine_slows_them_alike():
  """On a machine slowing down while it is measured (each timed call 1 s longer than the one
  before), timing one candidate after the other would charge the drift to the last ones (best
  times 1, 3, 5 s); interleaved, every round times each candidate once (1, 2, 3 s)."""
  ticks = iter(range(1000))
  elapsed = [0.0]

  def drifting_clock():  # Called before and after each timed call: the i-th call lasts i + 1 s.
    tick = next(ticks)
    if tick % 2:
      elapsed[0] += tick // 2 + 1
    return elapsed[0]

  fn = lambda x: jnp.sin(x) @ jnp.ones((8, 8))
  choice = autotune.measure_clients_per_chunk(fn, jnp.ones((12, 4, 8)), repeats=2, clock=drifting_clock)
  assert choice.seconds == {1: 1.0, 4: 2.0, 12: 3.0}


def test_measure_stops_at_the_first_candidate_out_of_memory_and_keeps_other_errors(monkeypatch):
  fn = lambda x: jnp.sin(x) @ jnp.ones((8, 8))
  xs = jnp.ones((12, 4, 8))
  tried, real_map = [], autotune.primitives.map_clients

  def map_clients_limited(f, inputs, k, error=None):  # As if chunks above 1 client did not fit.
    tried.append(k)
    if k > 1:
      raise jax.errors.JaxRuntimeError(error or "RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return real_map(f, inputs, k)

  monkeypatch.setattr(autotune.primitives, "map_clients", map_clients_limited)
  choice = autotune.measure_clients_per_chunk(fn, xs, candidates=[12, 4, 1], repeats=1)
  assert (choice.clients_per_chunk, sorted(choice.seconds), choice.out_of_memory) == (1, [1], (4,))
  assert tried == [1, 4]  # Traced smallest first; 12 never tried once 4 ran out.
  monkeypatch.setattr(
    autotune.primitives,
    "map_clients",
    lambda f, inputs, k: map_clients_limited(f, inputs, k, "INTERNAL: a compiler bug"),
  )
  with pytest.raises(jax.errors.JaxRuntimeError, match="compiler bug"):  # Not memory: not swallowed.
    autotune.measure_clients_per_chunk(fn, xs, candidates=[1, 4], repeats=1)
  monkeypatch.setattr(autotune.primitives, "map_clients", lambda f, inputs, k: map_clients_limited(f, inputs, 2))
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):  # Nothing fits: said so.
    autotune.measure_clients_per_chunk(fn, xs, candidates=[1, 4], repeats=1)


def test_cached_choice_measures_once_per_key_and_reports_an_unreadable_cache(tmp_path):
  path = str(tmp_path / "sub" / "chunks.json")
  calls = []
  measure = lambda k: lambda: calls.append(k) or autotune.ChunkChoice(k, {k: 0.5, 1: 0.9})
  first = autotune.cached_choice(path, {"model": "a"}, measure(4))
  assert first.out_of_memory == () and autotune.cached_choice(path, {"model": "a"}, measure(4)).out_of_memory == ()
  calls.clear()
  first = autotune.cached_choice(
    path, {"model": "c"}, lambda: calls.append(4) or autotune.ChunkChoice(4, {4: 0.5, 1: 0.9}, out_of_memory=(16,))
  )
  assert autotune.cached_choice(path, {"model": "c"}, measure(8)).out_of_memory == (16,)  # Kept in the cache.
  os.remove(path)
  calls.clear()
  first = autotune.cached_choice(path, {"model": "a"}, measure(4))
  again = autotune.cached_choice(path, {"model": "a"}, measure(8))  # Cached: not measured.
  other = autotune.cached_choice(path, {"model": "b"}, measure(2))  # Another key: measured.
  assert (first.clients_per_chunk, again.clients_per_chunk, other.clients_per_chunk) == (4, 4, 2)
  assert calls == [4, 2] and again.cached and not first.cached and again.seconds == {4: 0.5, 1: 0.9}
  assert len(json.load(open(path))["entries"]) == 2  # Both keys kept.
  with open(path, "w") as f:
    f.write("{torn")
  with pytest.raises(ValueError, match="unreadable"):
    autotune.cached_choice(path, {"model": "a"}, measure(4))
  assert open(path).read() == "{torn"  # Left for the user.


def test_a_changed_or_malformed_chunk_cache_entry_is_named_and_left(tmp_path):
  """An edited or malformed entry is named and left in place, never read as given nor a bare
  KeyError / TypeError."""
  path = str(tmp_path / "chunks.json")
  autotune.cached_choice(path, {"model": "a"}, lambda: autotune.ChunkChoice(4, {4: 0.5, 1: 0.9}))
  content = json.load(open(path))
  (key,) = content["entries"]
  content["entries"][key]["clients_per_chunk"] = 64  # Changed behind the digest.
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match="do not match their sha256"):
    autotune.cached_choice(path, {"model": "a"}, lambda: autotune.ChunkChoice(2, {2: 0.1}))
  with open(path, "w") as f:  # An earlier version's layout, one bad entry.
    json.dump({key: {"clients_per_chunk": "abc", "seconds": {}}}, f)
  with pytest.raises(ValueError, match=rf"entry '{key}' is malformed.*clients_per_chunk='abc'"):
    autotune.cached_choice(path, {"model": "a"}, lambda: autotune.ChunkChoice(2, {2: 0.1}))
  with open(path, "w") as f:
    json.dump({key: {"clients_per_chunk": 3, "seconds": {"3": 0.2}}}, f)
  assert autotune.cached_choice(path, {"model": "a"}, lambda: None).clients_per_chunk == 3  # Read as is.


def test_auto_chunk_is_measured_cached_recorded_and_kept_on_resume(cache_dirs, tmp_path):
  config = default.get_config("smoke,rounds=2")
  config.data.data_dir, config.pretrain.cache_dir = cache_dirs["data_dir"], str(tmp_path / "cache")
  os.makedirs(config.pretrain.cache_dir)
  for name in (
    os.listdir(cache_dirs["cache_dir"]) if os.path.isdir(cache_dirs["cache_dir"]) else []
  ):  # Reuse the session's backbone, not its chunk cache.
    os.symlink(os.path.join(cache_dirs["cache_dir"], name), os.path.join(config.pretrain.cache_dir, name))
  config.fed.clients_per_chunk = autotune.AUTO
  logs = []
  train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=logs.append)
  assert any("(measured;" in line for line in logs), logs
  recorded = json.load(open(tmp_path / "run" / ENVIRONMENT_FILE))
  assert recorded["clients_per_chunk"] in (1, 4)  # Smoke: 4 clients per round.
  assert recorded["backend"] == "cpu" and recorded["jax"] == jax.__version__
  logs.clear()
  train_and_evaluate(config, str(tmp_path / "run2"), progress=False, log=logs.append)
  assert any("(cached;" in line for line in logs) and not any("(measured;" in line for line in logs), logs
  # A resumed run keeps the chunk it recorded, whatever the cache now says.
  other = 4 if recorded["clients_per_chunk"] == 1 else 1
  recorded["clients_per_chunk"] = other
  json.dump(recorded, open(tmp_path / "run" / ENVIRONMENT_FILE, "w"))
  config.fed.num_rounds = 3
  logs.clear()
  train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=logs.append)
  assert not any("clients_per_chunk:" in line for line in logs)  # Not looked up again.
  assert json.load(open(tmp_path / "run" / ENVIRONMENT_FILE))["clients_per_chunk"] == other


def _small_vit(**arch):
  config = default.get_config()
  model = models.build_model("vit", 10, width=32, depth=2, num_heads=2, patch_size=4, **arch)
  images = jax.random.randint(jax.random.key(0), (3, 16, 16, 3), 0, 256).astype(jnp.uint8)
  variables = model.init(jax.random.key(1), models.preprocess_images(images))
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  trainable, _ = initial_trainable(model, backbone, images[:1], config.lora.target_regex, 4, jax.random.key(2))
  trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), trainable)
  return model, backbone, trainable, images


def test_bf16_backbone_computes_in_bf16_and_stays_close_to_float32():
  model, backbone, trainable, images = _small_vit()
  full = ImageClassification(model, 2.0, models.preprocess_images)
  half = ImageClassification(model, 2.0, models.preprocess_images, compute_dtype=jnp.bfloat16)
  frozen32, frozen16 = frozen_tree(backbone), frozen_tree(backbone, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen16["variables"]))
  logits32 = jax.jit(full.logits)(frozen32, trainable, images)
  logits16 = jax.jit(half.logits)(frozen16, trainable, images)
  assert logits16.dtype == jnp.float32
  assert 0 < float(jnp.abs(logits16 - logits32).max()) < 0.1 * float(jnp.abs(logits32).max()) + 0.05
  jaxpr = str(jax.make_jaxpr(half.logits)(frozen16, trainable, images))
  assert "bf16[3,17,32]" in jaxpr  # Token activations are bf16.
  grads = jax.jit(
    jax.grad(
      lambda t: half.loss_fn(t, frozen16, {"image": images, "label": jnp.arange(3), "mask": jnp.ones(3)}, None)[0]
    )
  )(trainable)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert backbone_dtype("auto", "cpu") == jnp.float32 and backbone_dtype("auto", "gpu") == jnp.bfloat16


def test_rematerialized_vit_gives_the_same_loss_and_lora_gradients():
  model, backbone, trainable, images = _small_vit()
  remat_model, *_ = _small_vit(remat=True)
  batch = {"image": images, "label": jnp.array([1, 2, 3]), "mask": jnp.ones(3)}
  frozen = frozen_tree(backbone)
  grad = lambda m: jax.jit(
    jax.value_and_grad(
      lambda t: ImageClassification(m, 2.0, models.preprocess_images).loss_fn(t, frozen, batch, None)[0]
    )
  )
  loss, grads = grad(model)(trainable)
  remat_loss, remat_grads = grad(remat_model)(trainable)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert float(jnp.abs(grads["lora"]["encoder/block_1/attn/value"]["b"]).max()) > 1e-4
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(grad(remat_model))(trainable))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize(
  "per_device, limit, expected, most_calls",
  [
    (256, 37, 32, 4),  # 256 refused, 16 fits; between them 32, 64, 128: 64 refused, 32 fits.
    (240, 40, 40, 5),  # 240 refused, 16 fits; 20 ... 120 between: 48 refused, 30 fits, 40 fits.
    (16, 16, 16, 1),  # All at once fits: one call.
    (6, 0, None, 3),  # Nothing fits: 6, 3 (the divisor under 4), 1, each refused.
    (64, 63, 32, 3),  # 64 refused, 16 fits, 32 fits: the largest divisor within 63.
  ],
)
def test_the_largest_fitting_chunk_is_found_by_ladder_then_bisection(per_device, limit, expected, most_calls):
  """Against a brute-force count: the largest divisor of the device's cohort within `limit`
  (a memory that grows with the chunk), in at most `most_calls` compiles; None where 1 fails."""
  from hyperlora_jax import plan

  calls = []
  chunk, tried = plan.largest_fitting_chunk(per_device, lambda c: calls.append(c) or c <= limit)
  brute = max((d for d in range(1, per_device + 1) if per_device % d == 0 and d <= limit), default=None)
  assert chunk == brute == expected
  assert [c for c, _ in tried] == calls and len(calls) <= most_calls
  assert all(verdict == (c <= limit) for c, verdict in tried)


def test_an_unknown_fit_counts_as_fitting():
  """`fits` None (the CPU: no limit known) takes the first candidate, all at once."""
  from hyperlora_jax import plan

  assert plan.largest_fitting_chunk(12, lambda c: None) == (12, [(12, None)])
