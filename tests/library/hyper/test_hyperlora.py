"""HyperLoRA: signatures, synthesizer S_ψ (uniform limit, gauge), corrector C_ω, meta-objective,
new clients, and whole runs (one trace, exact resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.runner import reporting
from hyperlora_jax.aggregators import AggregationContext
from hyperlora_jax.hyper import signatures
from hyperlora_jax.hyper.synthesis import (
  ResidualGate,
  SynthesisConfig,
  SynthesizerScores,
  hyperlora_synthesizer,
  product_gram,
  refactorize,
)
from experiments.runner.config_validation import ConfigError
from experiments.runner.experiment import build_experiment
from experiments.runner.train import train_and_evaluate

C, D_IN, D_OUT, R, SCALE, SIG = 4, 7, 6, 2, 2.0, 3
WEIGHTS = jnp.array([0.4, 0.3, 0.2, 0.1])


def _clients(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "lora": {
      "l1": {"a": jax.random.normal(k[0], (C, D_IN, R)), "b": jax.random.normal(k[1], (C, R, D_OUT))},
      "l2": {"a": jax.random.normal(k[2], (C, D_IN, R)), "b": jax.random.normal(k[0], (C, R, D_OUT))},
    },
    "head": {"kernel": jax.random.normal(k[1], (C, 3, 2))},
  }


def _global():
  return jax.tree.map(lambda x: x[0], _clients(5))


def _init(cfg, seed=0):
  agg = hyperlora_synthesizer(cfg, optax.adam(1e-2, eps_root=1e-16))
  return agg, agg.init(_global(), jax.random.key(seed), SIG)


def _jitted(agg, context):
  """`agg.aggregate` under jit with `context` fixed, as a round runs it (eagerly, each of its
  hundreds of ops would compile on its own)."""
  return jax.jit(lambda state, global_params, clients, weights: agg.aggregate(
    state, global_params, clients, weights, context))  # fmt: skip


def _best_rank_r(matrix, rank):
  u, s, vt = np.linalg.svd(np.asarray(matrix), full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_uniform_limit_is_the_exact_weighted_product_average_then_best_rank_r():
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="none")
  clients = _clients()
  for learned in (True, False):  # S_ψ at its zero-initialized output, and S_ψ switched off.
    cfg = cfg._replace(learned_weights=learned)
    agg, state = _init(cfg)
    context = AggregationContext(jnp.ones((C, SIG)), jnp.ones(C), lambda g: 0.0)
    new, _, _ = _jitted(agg, context)(state, _global(), clients, WEIGHTS)
    for path, f in clients["lora"].items():
      exact = SCALE * np.einsum("c,cir,cro->io", WEIGHTS, f["a"], f["b"])
      np.testing.assert_allclose(
        SCALE * new["lora"][path]["a"] @ new["lora"][path]["b"], _best_rank_r(exact, R), atol=1e-4
      )
    np.testing.assert_allclose(
      new["head"]["kernel"], np.einsum("c,cij->ij", WEIGHTS, clients["head"]["kernel"]), rtol=1e-5
    )


def test_refactorization_keeps_the_previous_gauge():
  target = jax.random.normal(jax.random.key(1), (D_IN, R)) @ jax.random.normal(jax.random.key(2), (R, D_OUT))
  u = np.linalg.svd(np.asarray(target), full_matrices=False)[0][:, :R]
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(R, R)))[0]
  previous = u @ rotation
  a, b = refactorize(target, R, SCALE, jnp.asarray(previous))
  np.testing.assert_allclose(a, previous, atol=1e-4)  # Same basis, same rotation.
  np.testing.assert_allclose(SCALE * a @ b, target, atol=1e-4)  # And the same product.


@pytest.mark.parametrize("d_in, d_out, rank", [(7, 5, 2), (5, 9, 3), (6, 6, 2), (4, 4, 4)])
def test_the_refactorizations_derivative_is_exact(d_in, d_out, rank):
  """Tall (a null space of Tᵀ), wide, square and full-rank targets: reverse and forward mode
  equal central finite differences in float64, in both inputs. A basis held fixed
  (straight-through) is another number, as the second check shows."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(d_in * 10 + d_out)
    target, previous = jnp.asarray(rng.normal(size=(d_in, d_out))), jnp.asarray(rng.normal(size=(d_in, rank)))
    w_a, w_b = jnp.asarray(rng.normal(size=(d_in, rank))), jnp.asarray(rng.normal(size=(rank, d_out)))
    loss = jax.jit(
      lambda t, p: jnp.sum(w_a * refactorize(t, rank, SCALE, p)[0]) + jnp.sum(w_b * refactorize(t, rank, SCALE, p)[1])
    )
    d_target, d_previous = jnp.asarray(rng.normal(size=target.shape)), jnp.asarray(rng.normal(size=previous.shape))
    h = 1e-6
    finite_difference = (
      loss(target + h * d_target, previous + h * d_previous) - loss(target - h * d_target, previous - h * d_previous)
    ) / (2 * h)
    g_target, g_previous = jax.jit(jax.grad(loss, argnums=(0, 1)))(target, previous)
    reverse = jnp.sum(g_target * d_target) + jnp.sum(g_previous * d_previous)
    _, forward = jax.jit(lambda *tangents: jax.jvp(loss, (target, previous), tangents))(d_target, d_previous)
    np.testing.assert_allclose([reverse, forward], [finite_difference] * 2, rtol=1e-6)
    if rank < min(d_in, d_out):  # A fixed basis misses the subspace's turn.
      fixed = lambda t: loss(t, previous) - jnp.sum(w_a * refactorize(t, rank, SCALE, previous)[0])
      basis = refactorize(target, rank, SCALE, previous)[0]
      straight_through = jnp.sum(jax.grad(lambda t: jnp.sum(w_b * (basis.T @ t / SCALE)))(target) * d_target)
      moved = (fixed(target + h * d_target) - fixed(target - h * d_target)) / (2 * h)
      assert abs(float(straight_through) - float(moved)) > 1e-3 * abs(float(moved))


def test_the_meta_gradient_is_the_derivative_of_the_held_out_loss():
  """The gradient S_ψ and C_ω step on equals finite differences of the held-out loss (a basis
  held fixed gives 0.096 where they say 0.179)."""
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  with jax.enable_x64(True):
    agg, state = _init(cfg)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), state["params"])
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
    clients = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _clients())
    global_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _global())
    target = jax.random.normal(jax.random.key(3), (D_IN, D_OUT), jnp.float64)
    residual = {p: 0.1 * jax.random.normal(jax.random.key(9), (D_IN, D_OUT), jnp.float64) for p in ("l1", "l2")}
    signature = jax.random.normal(jax.random.key(4), (C, SIG), jnp.float64)
    from hyperlora_jax.hyper.synthesis import synthesize

    def held_out(p):
      new, _, _ = synthesize(
        p,
        (SynthesizerScores(2), ResidualGate(2)),
        cfg,
        global_params,
        clients,
        jnp.asarray(WEIGHTS, jnp.float64),
        signature,
        jnp.ones(C, jnp.float64),
        residual,
      )
      return sum(jnp.sum(jnp.tanh(SCALE * f["a"] @ f["b"] - target)) for f in new["lora"].values())

    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(11), p.shape, p.dtype), params)
    h = 1e-6
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * h * d, params, direction)
    held_out = jax.jit(held_out)
    finite_difference = (held_out(shifted(1)) - held_out(shifted(-1))) / (2 * h)
    gradient = jax.jit(jax.grad(held_out))(params)
    directional = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(gradient), jax.tree.leaves(direction)))
    np.testing.assert_allclose(directional, finite_difference, rtol=1e-5)


def test_a_derivative_through_two_meta_learned_rounds_is_finite_with_eps_root():
  """With optax.adam (eps_root=0) as the meta-optimizer, the derivative through two rounds was
  NaN while the forward pass was finite: such an optimizer is named when the synthesizer is
  built, and with eps_root > 0 the two-round derivative is finite."""
  import flax.linen as nn
  import hyperlora_jax as hl

  with pytest.warns(hl.hyper.CrossRoundDerivativeWarning, match="eps_root > 0"):
    hyperlora_synthesizer(SynthesisConfig(scale=SCALE, rank=R), optax.adam(1e-3))

  class Linear(nn.Module):  # x [B, 5] -> [B, 3]
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="out")(x)

  model = Linear()
  frozen = model.init(jax.random.key(0), jnp.zeros((1, 5)))
  adapter = {"out": {"a": 0.3 * jnp.ones((5, 2)), "b": 0.1 * jnp.ones((2, 3))}}

  def loss_fn(trainable, frozen, batch, rng):
    return jnp.mean((hl.lora.apply(model, frozen, trainable, batch["x"], scale=1.0) - batch["y"]) ** 2), {}

  synthesizer = hyperlora_synthesizer(SynthesisConfig(scale=1.0, rank=2), optax.adam(1e-3, eps_root=1e-16))
  fed = hl.FederatedRound(hl.local_update(loss_fn, optax.sgd(0.1), steps=2), synthesizer, num_clients=4)
  x = np.random.default_rng(0).normal(size=(4, 3, 8, 5)).astype(np.float32)
  batches = {"x": x, "y": np.tanh(x[..., :3])}

  def two_rounds(start):
    state = fed.init(jax.random.key(2), start)
    state, _ = fed.step(state, frozen, batches, jnp.arange(4), jnp.full(4, 0.25))
    state, metrics = fed.step(state, frozen, batches, jnp.arange(4), jnp.full(4, 0.25))
    return metrics["meta_loss"]

  value, gradient = jax.jit(jax.value_and_grad(two_rounds))(adapter)
  assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gradient))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(gradient))


def test_product_gram_matches_explicit_products():
  f = _clients()["lora"]["l1"]
  products = np.einsum("cir,cro->cio", f["a"], f["b"])
  np.testing.assert_allclose(product_gram(f["a"], f["b"]), np.einsum("kio,jio->kj", products, products), rtol=1e-4)


def test_learned_corrector_feeds_back_the_truncation_residual():
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  agg, state = _init(cfg)
  context = AggregationContext(jnp.zeros((C, SIG)), jnp.ones(C), lambda g: 0.0)
  clients = _clients()
  aggregate = _jitted(agg, context)
  new, _, state1 = aggregate(state, _global(), clients, WEIGHTS)
  f = clients["lora"]["l1"]
  exact = SCALE * np.einsum("c,cir,cro->io", WEIGHTS, f["a"], f["b"])
  residual = exact - SCALE * np.asarray(new["lora"]["l1"]["a"] @ new["lora"]["l1"]["b"])
  np.testing.assert_allclose(state1["residual"]["l1"], residual, atol=1e-4)
  assert np.linalg.norm(residual) > 0.1  # Four rank-2 clients: rank 2 cannot hold it all.
  # Next round, with the same clients, the gate (0.5 at init) adds half the residual back.
  new2, _, _ = aggregate(state1, new, clients, WEIGHTS)
  np.testing.assert_allclose(
    SCALE * new2["lora"]["l1"]["a"] @ new2["lora"]["l1"]["b"], _best_rank_r(exact + 0.5 * residual, R), atol=1e-4
  )


def test_the_corrector_adds_the_last_residual_to_another_cohorts_product():
  """With the same clients twice, the residual is orthogonal to the rank-r part and its sign
  does not show; with another cohort in the second round, the target is that cohort's exact
  product plus the gate (0.5 at init) times the first round's residual, and a sign flip shows."""
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  agg, state = _init(cfg)
  context = AggregationContext(jnp.zeros((C, SIG)), jnp.ones(C), lambda g: 0.0)
  first, second = _clients(0), _clients(1)
  aggregate = _jitted(agg, context)
  new, _, state1 = aggregate(state, _global(), first, WEIGHTS)
  residual = np.asarray(state1["residual"]["l1"])
  new2, _, _ = aggregate(state1, new, second, WEIGHTS)
  f = second["lora"]["l1"]
  exact = SCALE * np.einsum("c,cir,cro->io", WEIGHTS, f["a"], f["b"])
  got = SCALE * np.asarray(new2["lora"]["l1"]["a"] @ new2["lora"]["l1"]["b"])
  np.testing.assert_allclose(got, _best_rank_r(exact + 0.5 * residual, R), atol=1e-4)
  assert np.max(np.abs(got - _best_rank_r(exact - 0.5 * residual, R))) > 1e-2  # The sign shows.


def test_meta_objective_trains_the_synthesizer_through_the_aggregation():
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  agg, state = _init(cfg)
  clients = _clients()
  target = jax.random.normal(jax.random.key(3), (D_IN, D_OUT))
  meta_loss = lambda g: sum(jnp.sum((SCALE * f["a"] @ f["b"] - target) ** 2) for f in g["lora"].values())
  context = AggregationContext(jax.random.normal(jax.random.key(4), (C, SIG)), jnp.ones(C), meta_loss)
  losses, aggregate = [], _jitted(agg, context)
  for _ in range(30):
    _, _, new_state = aggregate(state, _global(), clients, WEIGHTS)
    losses.append(float(new_state["meta_loss"]))
    state = new_state.replace(residual=state.residual)  # Same round replayed: only ψ, ω learn.
  assert losses[-1] < losses[0] - 1e-3
  assert not np.allclose(jax.tree.leaves(state["params"]["synth"])[-1], 0.0)


def test_several_meta_steps_a_round_equal_as_many_replays_of_one():
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  clients = _clients()
  target = jax.random.normal(jax.random.key(3), (D_IN, D_OUT))
  meta_loss = lambda g: sum(jnp.sum((SCALE * f["a"] @ f["b"] - target) ** 2) for f in g["lora"].values())
  context = AggregationContext(jax.random.normal(jax.random.key(4), (C, SIG)), jnp.ones(C), meta_loss)
  # SGD, not Adam: Adam would turn float noise in a near-zero gradient into a full step.
  one = hyperlora_synthesizer(cfg, optax.sgd(1e-3))
  three = hyperlora_synthesizer(cfg, optax.sgd(1e-3), meta_steps=3)
  state = one.init(_global(), jax.random.key(0), SIG)
  replayed, aggregate_once = state, _jitted(one, context)
  for _ in range(3):  # The same round three times, one step each: only ψ, ω move.
    new_global, _, after = aggregate_once(replayed, _global(), clients, WEIGHTS)
    replayed = after.replace(residual=state.residual)
  got_global, _, got = _jitted(three, context)(state, _global(), clients, WEIGHTS)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6), got["params"], replayed["params"])
  assert not np.allclose(jax.tree.leaves(got["params"]["synth"])[-1], jax.tree.leaves(state["params"]["synth"])[-1])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5), got_global, new_global)
  np.testing.assert_allclose(float(got["meta_loss"]), float(after["meta_loss"]), rtol=1e-4)
  assert int(got["meta_step_skipped"]) == 0


def test_no_participant_leaves_the_learned_parameters_untouched():
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="learned")
  agg, state = _init(cfg)
  context = AggregationContext(jnp.zeros((C, SIG)), jnp.ones(C), lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)))
  _, _, new_state = _jitted(agg, context)(state, _global(), _clients(), jnp.zeros(C))
  jax.tree.map(np.testing.assert_array_equal, new_state["params"], state["params"])


def test_label_histogram_and_feature_statistics():
  hist = signatures.label_histogram(jnp.array([0, 2, 2, 1, 2]), jnp.array([1, 1, 1, 0, 1.0]), 4)
  np.testing.assert_allclose(hist, 4 * np.array([1, 0, 3, 0]) / 4)
  feats = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
  mask = np.array([1] * 7 + [0, 0], np.float32)
  basis = signatures.random_basis(5, 3)
  stats = signatures.feature_statistics(jnp.asarray(feats), jnp.asarray(mask), basis)
  kept = feats[:7]
  cov = np.cov(kept.T, bias=True)
  proj = np.asarray(basis).T @ cov @ np.asarray(basis)
  np.testing.assert_allclose(stats[:5], kept.mean(0), atol=1e-5)
  np.testing.assert_allclose(stats[5:], proj[np.triu_indices(3)], atol=1e-5)
  assert stats.shape == (signatures.signature_dim(("features",), 10, 5, 3),)


def test_signature_kinds_are_validated_by_field(smoke_config):
  smoke_config.method = "hyperlora"
  smoke_config.hyperlora.signature = "label+colour"
  with pytest.raises(ConfigError, match=r"hyperlora\.signature: .*colour"):
    build_experiment(smoke_config, log=lambda _: None)
  smoke_config.hyperlora.signature = ""
  with pytest.raises(ConfigError, match=r"hyperlora\.signature: the generator needs"):
    build_experiment(smoke_config, log=lambda _: None)
  smoke_config.hyperlora.signature, smoke_config.hyperlora.corrector = "label", "svd"
  with pytest.raises(ConfigError, match=r"hyperlora\.corrector"):
    build_experiment(smoke_config, log=lambda _: None)


def test_signatures_for_every_client_with_noise(smoke_config):
  smoke_config.method = "hyperlora"
  exp = build_experiment(smoke_config, log=lambda _: None)
  width = smoke_config.model.width
  dim = signatures.signature_dim(("label", "features"), exp.data.num_classes, width, 8)
  assert exp.signatures.shape == (exp.data.num_clients, dim) and np.all(np.isfinite(exp.signatures))
  hist = exp.signatures[:, : exp.data.num_classes]
  np.testing.assert_allclose(hist.mean(1), 1.0, rtol=1e-5)
  smoke_config.hyperlora.signature_noise_std = 0.5
  noisy = build_experiment(smoke_config, log=lambda _: None).signatures
  assert 0.3 < np.std(noisy - exp.signatures) < 0.7


def test_hyperlora_run_traces_once_resumes_exactly_and_evaluates_new_clients(smoke_config, tmp_path):
  smoke_config.method = "hyperlora"
  smoke_config.data.heldout_clients = 2
  smoke_config.fed.num_rounds, smoke_config.checkpoint_every = 4, 2
  straight = train_and_evaluate(smoke_config, str(tmp_path / "straight"), progress=False, log=lambda _: None)
  assert straight["round_traces"] == 1
  last = straight["records"][-1]
  for key in (
    "new_client_global",
    "new_client_generated",
    "new_client_global_finetuned",
    "new_client_generated_finetuned",
  ):
    assert 0.0 <= last[key] <= 1.0
  assert all(np.isfinite(r["meta_loss"]) for r in straight["records"])
  killed = str(tmp_path / "killed")
  train_and_evaluate(smoke_config, killed, stop_after_round=3, progress=False, log=lambda _: None)
  train_and_evaluate(smoke_config, killed, progress=False, log=lambda _: None)
  assert reporting.read_metrics(str(killed)) == reporting.read_metrics(str(tmp_path / "straight"))


@pytest.mark.parametrize(
  "overrides",
  [
    {"generator": False, "synthesizer": "uniform", "corrector": "none"},
    {"corrector": "fair", "signature": "embedding"},
  ],
)
def test_ablations_run(smoke_config, tmp_path, overrides):
  smoke_config.method, smoke_config.fed.num_rounds = "hyperlora", 2
  for key, value in overrides.items():
    smoke_config.hyperlora[key] = value
  result = train_and_evaluate(smoke_config, str(tmp_path), progress=False, log=lambda _: None)
  assert result["round_traces"] == 1 and 0.0 <= result["records"][-1]["global_accuracy"] <= 1.0


@pytest.mark.parametrize("private", [False, True])
def test_typed_synthesizer_and_generator_states_checkpoint_in_the_dict_layout_of_old_runs(tmp_path, private):
  """`SynthesizerState` / `GeneratorState` are written as the dicts they replaced (the keys
  below, absent entries left out), and such a dict checkpoint restores into them (a run
  checkpointed before the states were typed resumes)."""
  import orbax.checkpoint as ocp

  from experiments.runner.workdir import checkpoint_manager, restore_state
  from hyperlora_jax import states
  from hyperlora_jax.hyper.generator import GeneratorState, LoraGenerator, make_generator
  from hyperlora_jax.hyper.synthesis import SynthesizerState

  privacy = (1.0, 0.5) if private else None
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector="none" if private else "learned", learned_weights=not private)
  agg = hyperlora_synthesizer(cfg, optax.adam(1e-2, eps_root=1e-16), meta_learning=not private, privacy=privacy)
  generator = make_generator(
    LoraGenerator(targets={"l1": (D_IN, D_OUT)}, rank=R, hidden=8),
    loss="vjp",
    optimizer=optax.adam(1e-2),
    signature_dim=SIG,
    privacy=privacy,
  )
  synth_state = agg.init(_global(), jax.random.key(0), SIG)
  context = AggregationContext(jnp.ones((C, SIG)), jnp.ones(C), lambda g: 0.0)
  _, _, synth_state = agg.aggregate(synth_state, _global(), _clients(), WEIGHTS, context)
  state = {"agg": synth_state, "plugins": {"generator": generator.init(jax.random.key(1))}}
  assert isinstance(synth_state, SynthesizerState) and isinstance(state["plugins"]["generator"], GeneratorState)
  layout = states.as_tree(state)
  expected_agg = (
    {"params", "opt", "residual", "synth_weight_entropy", "synth_weight_kl", "rng"}
    if private
    else {
      "params",
      "opt",
      "residual",
      "meta_loss",
      "meta_step_skipped",
      "synth_weight_entropy",
      "synth_weight_kl",
      "corrector_gate",
    }
  )
  assert set(layout["agg"]) == expected_agg and type(layout["agg"]) is dict
  assert set(layout["plugins"]["generator"]) == ({"params", "opt", "rng"} if private else {"params", "opt"})
  assert ("rng" in synth_state) == private and ("meta_loss" in synth_state) == (not private)
  old = checkpoint_manager(str(tmp_path / "dict"))
  old.save(3, args=ocp.args.StandardSave(layout))
  old.wait_until_finished()
  fresh = {
    "agg": agg.init(_global(), jax.random.key(7), SIG),
    "plugins": {"generator": generator.init(jax.random.key(8))},
  }
  restored, step = restore_state(old, fresh)
  old.close()
  assert step == 3 and isinstance(restored["agg"], SynthesizerState)
  assert isinstance(restored["plugins"]["generator"], GeneratorState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
