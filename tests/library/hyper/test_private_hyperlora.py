"""Client-level DP for HyperLoRA: the private product-space synthesis, the generator's DP-SGD
steps, the private mean change of its deviation targets, clipped signatures, the accountant's
releases per round, and the config rules, each against an independent formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from hyperlora_jax import lora, privacy
from hyperlora_jax.aggregators import AggregationContext
from hyperlora_jax.hyper.generator import LoraGenerator, make_generator
from hyperlora_jax.hyper.synthesis import PrivateRelease, SynthesisConfig, hyperlora_synthesizer, private_update
from tests.generator_case import generator_case

C, D_IN, D_OUT, R, SCALE = 4, 5, 7, 2, 2.0
WEIGHTS = jnp.array([0.5, 0.3, 0.2, 0.0])  # Data weights (ignored under DP); client 3 is absent.


def _tree(seed, clients=None):
  shape = (clients,) if clients else ()
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "lora": {
      "l1": {"a": jax.random.normal(k[0], shape + (D_IN, R)), "b": 0.5 * jax.random.normal(k[1], shape + (R, D_OUT))}
    },
    "head": {"kernel": jax.random.normal(k[2], shape + (3, 2))},
  }


def _best_rank_r(matrix, rank):
  u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_clipped_mean_weights_and_private_mean_by_hand():
  weights, count = privacy.clipped_mean_weights(
    jnp.array([25.0, 0.25, 100.0, 4.0]), jnp.array([0.1, 0.6, 0.3, 0.0]), 2.0
  )
  assert float(count) == 3.0
  np.testing.assert_allclose(weights, [2 / 5 / 3, 1 / 3, 2 / 10 / 3, 0.0], rtol=1e-6)  # min(1, C/‖x‖)/n.
  values = {"x": jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 10.0], [9.0, 9.0]])}
  quiet = privacy.private_mean(values, jnp.array([0.1, 0.6, 0.3, 0.0]), 1.0, 0.0, jax.random.key(0))
  np.testing.assert_allclose(quiet["x"], ([0.6, 0.8] + np.array([0.3, 0.4]) + [0.0, 1.0]) / 3, rtol=1e-6)
  wide = {"x": jnp.zeros((3, 40000))}
  noisy = privacy.private_mean(wide, jnp.ones(3), 2.0, 1.5, jax.random.key(1))
  assert np.std(np.asarray(noisy["x"])) == pytest.approx(1.5 * 2.0 / 3, rel=0.03)


def _private_synthesizer(clip, sigma, corrector="none"):
  cfg = SynthesisConfig(scale=SCALE, rank=R, corrector=corrector, learned_weights=False)
  return hyperlora_synthesizer(cfg, optax.adam(1e-2), meta_learning=False, privacy=(clip, sigma))


def test_private_synthesis_is_the_noisy_uniform_mean_of_clipped_product_changes_then_rank_r():
  global_params, starts_offset, trained = _tree(0), _tree(1, C), _tree(2, C)
  # Each client started from the global plus its own offset (the generator's), a 5 x 7 layer.
  starts = jax.tree.map(lambda g, o: g + 0.3 * o, global_params, starts_offset)
  clip = 1.5
  agg = _private_synthesizer(clip, 0.0)
  state = agg.init(global_params, jax.random.key(0))
  new, _, _ = agg.aggregate(state, global_params, trained, WEIGHTS, AggregationContext(client_starts=starts))

  # Independent: per client, ΔP_k = s(a_k b_k − a⁰_k b⁰_k) and the head's change, one joint norm.
  a, b = np.asarray(trained["lora"]["l1"]["a"]), np.asarray(trained["lora"]["l1"]["b"])
  a0, b0 = np.asarray(starts["lora"]["l1"]["a"]), np.asarray(starts["lora"]["l1"]["b"])
  change = SCALE * (a @ b - a0 @ b0)  # [C, 5, 7]
  head_change = np.asarray(trained["head"]["kernel"] - starts["head"]["kernel"])
  norms = np.sqrt((change**2).sum((1, 2)) + (head_change**2).sum((1, 2)))
  assert norms[:3].min() > clip  # Every participant is clipped here.
  factor = np.minimum(1.0, clip / norms) * (np.asarray(WEIGHTS) > 0) / 3  # Uniform over the 3 present.
  g_a, g_b = np.asarray(global_params["lora"]["l1"]["a"]), np.asarray(global_params["lora"]["l1"]["b"])
  target = SCALE * g_a @ g_b + np.einsum("c,cij->ij", factor, change)
  got = SCALE * new["lora"]["l1"]["a"] @ new["lora"]["l1"]["b"]
  np.testing.assert_allclose(got, _best_rank_r(target, R), atol=1e-5)
  np.testing.assert_allclose(
    new["head"]["kernel"], global_params["head"]["kernel"] + np.einsum("c,cij->ij", factor, head_change), atol=1e-6
  )


def test_private_update_noise_has_the_calibrated_std_and_the_synthesizer_draws_fresh_noise():
  d = 300
  zero_update = (jnp.zeros((C, d, 2)), jnp.zeros((C, 2, d)))  # No client moved.
  release = PrivateRelease(2.0, 1.5, jax.random.key(3))
  products, rest, used = private_update({"l": zero_update}, {"h": jnp.zeros((C, 5000))}, WEIGHTS, SCALE, release)
  assert np.std(np.asarray(products["l"])) == pytest.approx(1.5 * 2.0 / 3, rel=0.02)  # σC/n, n = 3.
  assert np.std(np.asarray(rest["h"])) == pytest.approx(1.5 * 2.0 / 3, rel=0.05)
  np.testing.assert_allclose(used, [1 / 3, 1 / 3, 1 / 3, 0.0])
  global_params = {"lora": {"l": {"a": jnp.zeros((6, R)), "b": jnp.zeros((R, 6))}}}
  clients = jax.tree.map(lambda x: jnp.broadcast_to(x, (C,) + x.shape), global_params)
  agg = _private_synthesizer(2.0, 1.5)
  state = agg.init(global_params, jax.random.key(0))
  first, _, state = agg.aggregate(state, global_params, clients, WEIGHTS, AggregationContext(client_starts=clients))
  second, _, _ = agg.aggregate(state, global_params, clients, WEIGHTS, AggregationContext(client_starts=clients))
  assert not np.allclose(first["lora"]["l"]["b"], second["lora"]["l"]["b"])


def test_a_private_synthesizer_refuses_meta_learning():
  cfg = SynthesisConfig(scale=SCALE, rank=R, learned_weights=True)
  with pytest.raises(ValueError, match="accountant"):
    hyperlora_synthesizer(cfg, optax.adam(1e-2), meta_learning=False, privacy=(1.0, 1.0))
  with pytest.raises(ValueError, match="accountant"):
    hyperlora_synthesizer(cfg._replace(learned_weights=False), optax.adam(1e-2), privacy=(1.0, 1.0))


TARGETS = (("enc/q", 6, 5), ("mlp", 5, 7))
SIG = 4


def _generator_case(privacy_args):
  module = LoraGenerator(targets=TARGETS, rank=R, hidden=8, layer_embed_dim=4)
  return (module, *generator_case(module, C, R, SIG, privacy=privacy_args))


def test_private_generator_step_is_sgd_on_the_mean_of_clipped_per_client_jacobian_products():
  clip = 0.05
  module, gen, state, signatures, ids, base, trained = _generator_case((clip, 0.0))
  new = gen.update(state, signatures, ids, base, trained, WEIGHTS, lora.rank_masks(None, C, R))
  flat, unravel = ravel_pytree(state["params"])

  def theta(flat_params, k):
    out = module.apply(unravel(flat_params), signatures[k], ids[k])
    return ravel_pytree(jax.tree.map(lambda o, b: o + b, out, base))[0]

  grads, jacobian_of, theta_of = [], jax.jit(jax.jacobian(theta)), jax.jit(theta)
  for k in range(C):  # g_k = J_kᵀ (θ_k − θ̃_k) from the explicit Jacobian, weight 1.
    residual = theta_of(flat, k) - ravel_pytree(jax.tree.map(lambda x: x[k], trained))[0]
    grads.append(np.asarray(jacobian_of(flat, k)).T @ np.asarray(residual))
  norms = np.linalg.norm(grads, axis=1)
  assert norms[:3].min() > clip
  mean = sum(g * min(1.0, clip / n) for g, n in zip(grads[:3], norms[:3])) / 3  # Client 3 absent.
  np.testing.assert_allclose(ravel_pytree(new["params"])[0], flat - 0.1 * mean, rtol=1e-4, atol=1e-7)


def test_private_generator_noise_has_the_calibrated_std_and_advances_its_key():
  _, quiet_gen, state, signatures, ids, base, trained = _generator_case((0.05, 0.0))
  _, noisy_gen, _, _, _, _, _ = _generator_case((0.05, 2.0))
  masks = lora.rank_masks(None, C, R)
  quiet = quiet_gen.update(state, signatures, ids, base, trained, WEIGHTS, masks)
  noisy = noisy_gen.update(state, signatures, ids, base, trained, WEIGHTS, masks)
  noise = (ravel_pytree(quiet["params"])[0] - ravel_pytree(noisy["params"])[0]) / 0.1
  assert noise.size > 700  # Std to about 3% (1/√(2·742)); the key is fixed.
  assert float(jnp.std(noise)) == pytest.approx(2.0 * 0.05 / 3, rel=0.08)
  assert not np.array_equal(noisy["rng"], state["rng"])


def test_private_deviation_targets_use_the_clipped_uniform_mean_change():
  from hyperlora_jax.federated import RoundOutcome
  from hyperlora_jax.hyper.plugins import generator_plugin

  seen = []
  probe = make_generator(
    LoraGenerator(targets=(("l1", D_IN, D_OUT),), rank=R, hidden=4, layer_embed_dim=2),
    loss="vjp",
    optimizer=optax.sgd(0.1),
    scale=SCALE,
    signature_dim=1,
    privacy=(1.0, 0.0),
  )
  probe = probe._replace(update=lambda state, *args: seen.append(args) or state)
  plugin = generator_plugin(probe, target="deviation", privacy=(0.5, 0.0))
  start, trained = _tree(1, C)["lora"], _tree(2, C)["lora"]
  outcome = RoundOutcome(
    new_global=_tree(3),
    client_params=trained,
    weights=WEIGHTS,
    client_ids=jnp.arange(C),
    signatures=jnp.zeros((C, 1)),
    rank_masks=jnp.ones((C, R)),
    previous_global=_tree(3),
    client_starts=start,
  )
  plugin.after_aggregation(plugin.init(jax.random.key(0)), outcome)
  targets = seen[0][3]
  with pytest.raises(ValueError, match="private generator"):  # A plug-in's noise needs the generator's key.
    plugin.after_aggregation({"params": {}, "opt": {}}, outcome)
  change = {k: np.asarray(trained["l1"][k] - start["l1"][k]) for k in ("a", "b")}
  norms = np.sqrt(sum((v**2).reshape(C, -1).sum(1) for v in change.values()))
  factor = np.minimum(1.0, 0.5 / norms) * [1, 1, 1, 0] / 3
  for k in ("a", "b"):  # θ̃_k less the clipped mean change (not the p-weighted one).
    mean_change = np.einsum("c,c...->...", factor, change[k])
    np.testing.assert_allclose(targets["l1"][k], np.asarray(trained["l1"][k]) - mean_change, atol=1e-6)


def test_clipped_signatures_keep_their_direction():
  from hyperlora_jax.hyper.signatures import make_signature_fn

  data = {
    "label": jnp.array([[0, 0, 0, 1], [0, 1, 2, 3]]),
    "mask": jnp.ones((2, 4)),
    "image": jnp.zeros((2, 4, 1, 1, 3), jnp.uint8),
  }
  plain = make_signature_fn(None, ("label",), 4, None)(data, jax.random.key(0))
  clipped = make_signature_fn(None, ("label",), 4, None, clip_norm=2.5)(data, jax.random.key(0))
  np.testing.assert_allclose(plain, [[3, 1, 0, 0], [1, 1, 1, 1]], rtol=1e-6)  # Norms √10 and 2.
  np.testing.assert_allclose(clipped[0], np.array([3, 1, 0, 0]) * 2.5 / math.sqrt(10), rtol=1e-6)
  np.testing.assert_allclose(clipped[1], [1, 1, 1, 1], rtol=1e-6)  # Inside the ball: unchanged.


def test_releases_per_round_compose_as_one_gaussian_with_multiplier_over_root_m():
  from dp_accounting import dp_event, rdp, NeighboringRelation

  # Without subsampling (everyone every round) m Gaussian releases of multiplier σ are, in
  # RDP, exactly m composed Gaussian events: compare with dp_accounting composing them itself.
  sigma, rounds, delta = 3.0, 4, 1e-5
  accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
  accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma / 2), 3 * rounds))
  assert privacy.epsilon(rounds, sigma, 20, 20, delta, releases_per_round=3) == pytest.approx(
    accountant.get_epsilon(delta), rel=1e-6
  )
  assert privacy.epsilon(rounds, sigma, 10, 20, delta, releases_per_round=3) == pytest.approx(
    privacy.epsilon(rounds, sigma / math.sqrt(3), 10, 20, delta)
  )
  assert privacy.epsilon(rounds, sigma, 10, 20, delta, releases_per_round=3) > privacy.epsilon(
    rounds, sigma, 10, 20, delta
  )


def _private_config(smoke_config):
  from configs import hyperlora

  config = hyperlora.get_config("smoke,ablation=private")
  config.data.data_dir, config.pretrain.cache_dir = smoke_config.data.data_dir, smoke_config.pretrain.cache_dir
  config.dp.noise_multiplier, config.dp.signature_noise_multiplier = 1.0, 4.0
  return config


@pytest.mark.parametrize(
  "field, value, named",
  [
    ("hyperlora.synthesizer", "learned", "hyperlora.synthesizer"),
    ("hyperlora.corrector", "learned", "hyperlora.corrector"),
    ("hyperlora.signature", "label+embedding", "hyperlora.signature"),
    ("dp.signature_noise_multiplier", 0.0, "dp.signature_noise_multiplier"),
    ("hyperlora.signature_noise_std", 0.5, "hyperlora.signature_noise_std"),
    ("dp.generator_clip_norm", 0.0, "dp.generator_clip_norm"),
    ("method", "pfedhn", "dp.noise_multiplier"),
  ],
)
def test_private_hyperlora_config_errors_name_the_field(smoke_config, field, value, named):
  from experiments.runner.config_validation import ConfigError
  from experiments.runner.experiment import build_experiment

  config = _private_config(smoke_config)
  block, name = field.split(".") if "." in field else (None, field)
  (config[block] if block else config)[name] = value
  with pytest.raises(ConfigError, match=f"^{named}"):
    build_experiment(config, log=lambda _: None)


def test_a_private_hyperlora_run_reports_the_composed_epsilon_and_stores_clipped_signatures(smoke_config, tmp_path):
  from experiments.runner import reporting
  from experiments.runner.experiment import build_experiment
  from experiments.runner.train import train_and_evaluate

  config = _private_config(smoke_config)
  config.fed.num_rounds, config.dp.signature_clip_norm = 2, 0.5
  train_and_evaluate(config, str(tmp_path), progress=False, log=lambda _: None)
  records = reporting.read_metrics(str(tmp_path))
  expected = [
    privacy.epsilon(
      r,
      1.0,
      config.fed.clients_per_round,
      config.data.num_clients,
      1e-5,
      signature_noise_multiplier=4.0,
      releases_per_round=3,
    )
    for r in (1, 2)
  ]
  assert [r["dp_epsilon"] for r in records] == pytest.approx(expected)
  assert all(math.isfinite(r["global_accuracy"]) for r in records if "global_accuracy" in r)
  assert "meta_loss" not in records[-1]
  assert f"privacy spent          ε = {expected[-1]:.1f}" in reporting.summary(records, "run")
  noisy = build_experiment(config, log=lambda _: None).signatures
  config.dp.signature_noise_multiplier = 1e-6  # Noise too small to hide the clipping.
  clipped = build_experiment(config, log=lambda _: None).signatures
  norms = np.linalg.norm(clipped, axis=-1)
  assert norms.max() == pytest.approx(0.5, abs=1e-3)
  # The noise comes after the clipping, at σ_s x C = 4.0 x 0.5 per coordinate (the same keys):
  # noised first and clipped after, a one-class client's class would be read off its signature.
  noise = noisy - clipped
  assert 0.6 * 2.0 < noise.std() < 1.4 * 2.0
