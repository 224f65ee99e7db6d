"""LoRA on Flax models: identity at b=0, factored == merged, kernel layout, targeting."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import lora, primitives
from hyperlora_jax.models import ViT


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(7, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


def _vit_and_params():
  model = ViT(num_classes=5, patch_size=4, width=16, depth=2, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  return model, model.init(jax.random.key(1), x), x


def _nonzero_lora(targets, rank, seed=2):
  factors = lora.init_lora(jax.random.key(seed), targets, rank)
  return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape), factors)


def test_default_targets_are_attention_query_and_value():
  model, params, x = _vit_and_params()
  targets = lora.find_targets(model, params, x)
  assert sorted(targets) == [f"encoder/block_{i}/attn/{n}" for i in range(2) for n in ("query", "value")]
  assert all(shape == (16, 16) for shape in targets.values())


def test_lora_with_zero_b_equals_base_model_exactly():
  model, params, x = _vit_and_params()
  factors = lora.init_lora(jax.random.key(3), lora.find_targets(model, params, x), rank=4)
  assert all(float(jnp.abs(f["a"]).max()) > 0 for f in factors.values())
  np.testing.assert_array_equal(
    lora.apply(model, params, factors, x, scale=2.0, return_features=True), model.apply(params, x, return_features=True)
  )


def test_factored_equals_merged_within_1e5():
  model, params, x = _vit_and_params()
  factors = _nonzero_lora(lora.find_targets(model, params, x, target_regex=r".*attn/.*|.*mlp/fc1"), 3)
  factored = lora.apply(model, params, factors, x, scale=1.5, return_features=True)
  merged = model.apply(lora.merge(params, factors, 1.5), x, return_features=True)
  base = model.apply(params, x, return_features=True)
  assert float(jnp.abs(factored - base).max()) > 1e-3  # LoRA changed the output.
  np.testing.assert_allclose(factored, merged, atol=1e-5)


def test_merge_takes_frozen_variables_and_returns_them_frozen():
  """`lora.merge` takes a FrozenDict (what older Flax code and checkpoints hold) and returns
  one."""
  import flax

  model, params, x = _vit_and_params()
  factors = _nonzero_lora(lora.find_targets(model, params, x, target_regex=r".*attn/query"), 2)
  merged = lora.merge(flax.core.freeze(params), factors, 1.5)
  assert isinstance(merged, flax.core.FrozenDict)
  jax.tree.map(np.testing.assert_array_equal, flax.core.unfreeze(merged), lora.merge(params, factors, 1.5))


def test_flax_kernel_layout_is_d_in_by_d_out():
  """a: [d_in, r], b: [r, d_out]; the update enters as x @ (s a b), not its transpose."""
  model = TwoLayer()
  x = jax.random.normal(jax.random.key(0), (4, 5))
  params = model.init(jax.random.key(1), x)
  targets = lora.find_targets(model, params, x, target_regex="hidden|out")
  assert targets == {"hidden": (5, 6), "out": (6, 7)}
  factors = _nonzero_lora(targets, rank=2)
  chex.assert_shape(factors["hidden"]["a"], (5, 2))
  chex.assert_shape(factors["hidden"]["b"], (2, 6))
  chex.assert_shape(lora.product(factors["out"]), params["params"]["out"]["kernel"].shape)
  s = 0.5
  w1, w2 = params["params"]["hidden"], params["params"]["out"]
  h = nn.relu(x @ (w1["kernel"] + s * lora.product(factors["hidden"])) + w1["bias"])
  expected = h @ (w2["kernel"] + s * lora.product(factors["out"])) + w2["bias"]
  np.testing.assert_allclose(lora.apply(model, params, factors, x, scale=s), expected, atol=1e-5)


def test_transposed_update_on_square_layer_is_detected():
  """On a square layer a transposed update runs without error; the layout test must see it."""
  model = nn.Dense(6, name="sq")
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = model.init(jax.random.key(1), x)
  factors = _nonzero_lora({"": (6, 6)}, rank=2)
  delta = lora.product(factors[""])
  correct = x @ (params["params"]["kernel"] + delta) + params["params"]["bias"]
  transposed = x @ (params["params"]["kernel"] + delta.T) + params["params"]["bias"]
  got = lora.apply(model, params, factors, x, scale=1.0)
  np.testing.assert_allclose(got, correct, atol=1e-5)
  assert float(jnp.abs(got - transposed).max()) > 1e-3


def test_base_delta_adds_full_rank_kernel_update():
  model = TwoLayer()
  x = jax.random.normal(jax.random.key(0), (4, 5))
  params = model.init(jax.random.key(1), x)
  delta = {"hidden": jax.random.normal(jax.random.key(5), (5, 6))}
  shifted = jax.tree.map(lambda v: v, params)
  shifted["params"]["hidden"]["kernel"] = params["params"]["hidden"]["kernel"] + delta["hidden"]
  np.testing.assert_allclose(
    lora.apply(model, params, {}, x, scale=1.0, base_delta=delta), model.apply(shifted, x), atol=1e-5
  )


def test_unmatched_regex_and_unknown_paths_fail_clearly():
  model = TwoLayer()
  x = jnp.ones((1, 5))
  params = model.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match="matches no nn.Dense"):
    lora.find_targets(model, params, x, target_regex="nothing_here")
  bogus = {"not/a/layer": {"a": jnp.ones((5, 1)), "b": jnp.ones((1, 6))}}
  with pytest.raises(ValueError, match="not/a/layer"):
    lora.apply(model, params, bogus, x, scale=1.0)


def test_per_client_gradients_under_vmap():
  """Each client's LoRA gets its own gradient when vmapped with a shared backbone."""
  model, params, x = _vit_and_params()
  targets = lora.find_targets(model, params, x)
  clients = jax.tree.map(lambda *f: jnp.stack(f), *[_nonzero_lora(targets, 2, seed=s) for s in (10, 20)])
  loss = lambda f: jnp.sum(lora.apply(model, params, f, x, scale=1.0, return_features=True) ** 2)
  batched = jax.jit(jax.vmap(jax.grad(loss)))(clients)
  first = jax.jit(jax.grad(loss))(jax.tree.map(lambda v: v[0], clients))
  chex.assert_trees_all_close(jax.tree.map(lambda v: v[0], batched), first, atol=1e-5)
  assert not np.allclose(batched["encoder/block_0/attn/query"]["a"][0], batched["encoder/block_0/attn/query"]["a"][1])


def test_product_mean_is_the_weighted_mean_of_products_and_runs_at_rank_c_times_r():
  """Three clients of a 6 -> 7 layer (non-square, rank 2): the stacked rank-6 layer's product
  is Σ p_k a_k b_k, which the factor mean's (Σ p a)(Σ p b) is not; a non-LoRA leaf is averaged;
  and a model run with the stacked layer equals the model merged with the mean kernel."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 7))
  head = rng.normal(size=(3, 7))
  p = np.array([0.5, 0.3, 0.2])
  stacked = {"hidden": {"a": jnp.asarray(a), "b": jnp.asarray(b)}, "head": jnp.asarray(head)}
  mean = lora.product_mean(stacked, jnp.asarray(p))
  assert mean["hidden"]["a"].shape == (6, 6) and mean["hidden"]["b"].shape == (6, 7)
  expected = sum(p[k] * a[k] @ b[k] for k in range(3))
  np.testing.assert_allclose(mean["hidden"]["a"] @ mean["hidden"]["b"], expected, rtol=1e-5)
  np.testing.assert_allclose(mean["head"], p @ head, rtol=1e-6)
  factor = primitives.weighted_mean(stacked, jnp.asarray(p))
  biased = np.einsum("k,kij->ij", p, a) @ np.einsum("k,kij->ij", p, b)
  np.testing.assert_allclose(factor["hidden"]["a"] @ factor["hidden"]["b"], biased, rtol=1e-5)
  assert np.abs(biased - expected).max() > 0.1  # The two means differ on these clients.
  # The forward pass at rank 6 on the 6 -> 7 output layer equals the merged mean kernel's.
  model = TwoLayer()
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  params = model.init(jax.random.key(0), x)
  as_layers = lambda layer: {"out": {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}}
  merged = lora.merge(params, as_layers(mean["hidden"]), 1.0)
  per_client = [lora.merge(params, as_layers({"a": a[k], "b": b[k]}), 1.0) for k in range(3)]
  np.testing.assert_allclose(
    merged["params"]["out"]["kernel"], sum(p[k] * per_client[k]["params"]["out"]["kernel"] for k in range(3)), atol=1e-6
  )
  out = lora.apply(model, params, as_layers(mean["hidden"]), x, scale=1.0)
  np.testing.assert_allclose(out, model.apply(merged, x), atol=1e-5)


class TiedLM(nn.Module):
  """tokens [B, T] -> logits [B, T, vocab] through the embedding table reused as the LM head."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 6, name="embed")
    return embed.attend(nn.Dense(6, name="mid")(embed(tokens)))


def test_a_tied_embedding_is_adapted_in_its_lookup_and_its_head_as_merge_does():
  """Before, `apply` adapted only the lookup while `merge` changed the whole table (max
  |factored - merged| was ~50): the head `attend` now gets s (q bᵀ) aᵀ, on a 11 x 6 table, and a
  base delta d gives q dᵀ there too."""
  model, tokens = TiedLM(), (jnp.arange(10) % 11).reshape(2, 5)
  variables = model.init(jax.random.key(0), tokens)
  targets = lora.find_targets(model, variables, tokens, target_regex="embed|mid")
  assert targets == {"embed": (11, 6), "mid": (6, 6)}
  adapter = _nonzero_lora(targets, 2)
  adapter = jax.tree.map(lambda x: x + 0.3, adapter)
  factored = lora.apply(model, variables, adapter, tokens, scale=1.5)
  merged = model.apply(lora.merge(variables, adapter, 1.5), tokens)
  np.testing.assert_allclose(factored, merged, atol=1e-5)
  lookup_only = model.apply(lora.merge(variables, {"mid": adapter["mid"]}, 1.5), tokens)
  assert float(jnp.abs(factored - lookup_only).max()) > 0.1  # The table's update matters.
  delta = {"embed": jax.random.normal(jax.random.key(5), (11, 6))}
  with_delta = lora.apply(model, variables, {}, tokens, scale=1.0, base_delta=delta)
  table = variables["params"]["embed"]["embedding"] + delta["embed"]
  by_hand = model.apply({"params": {**variables["params"], "embed": {"embedding": table}}}, tokens)
  np.testing.assert_allclose(with_delta, by_hand, atol=1e-5)


def test_a_regex_matching_an_unsupported_layer_names_it_instead_of_skipping_it():
  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="proj")(nn.LayerNorm(name="norm")(x))

  model, x = Normed(), jnp.ones((1, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"does not support: 'norm' \(nn.LayerNorm\)"):
    lora.find_targets(model, variables, x, target_regex="proj|norm")
  assert lora.find_targets(model, variables, x, target_regex="proj") == {"proj": (4, 3)}


class NNXConvEinsum:
  """An NNX model with a strided Conv [3, 3, 3, 5] and an Einsum kernel [5, 2, 4]: x [B, 8, 8, 3]
  -> [B, 16, 2, 4]."""

  @staticmethod
  def build():
    from flax import nnx

    class Model(nnx.Module):
      def __init__(self, rngs):
        self.conv = nnx.Conv(3, 5, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.ein = nnx.Einsum("btd,dhk->bthk", (5, 2, 4), rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)

      def __call__(self, x):
        h = self.conv(x)
        return self.ein(h.reshape(h.shape[0], -1, 5))

    return Model(nnx.Rngs(0))


def test_nnx_conv_and_einsum_take_lora_factored_equal_to_merged():
  from flax import nnx

  model = NNXConvEinsum.build()
  graphdef, state = nnx.split(model)
  targets = lora.find_targets_nnx(model, target_regex="conv|ein")
  assert targets == {"conv": (3 * 3 * 3, 5), "ein": (5, 2 * 4)}
  adapter = jax.tree.map(lambda p: p + 0.2, lora.init_lora(jax.random.key(1), targets, 2))
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  factored = jax.jit(lambda ad: lora.apply_nnx(graphdef, state, ad, x, scale=2.0))(adapter)
  base_output = nnx.merge(graphdef, state)(x)
  merged = nnx.merge(graphdef, jax.tree.map(jnp.array, state))  # A copy: merging shares variables.
  for name in ("conv", "ein"):
    layer = getattr(merged, name)
    layer.kernel[...] = layer.kernel[...] + (2.0 * adapter[name]["a"] @ adapter[name]["b"]).reshape(
      layer.kernel[...].shape
    )
  np.testing.assert_allclose(factored, merged(x), atol=1e-5)
  # Per-client (vmapped) adapters: each client's output is its own adapter's.
  stacked = jax.tree.map(lambda p: jnp.stack([p, 0 * p]), adapter)
  both = jax.vmap(lambda ad: lora.apply_nnx(graphdef, state, ad, x, scale=2.0))(stacked)
  np.testing.assert_allclose(both[0], factored, atol=1e-5)
  np.testing.assert_allclose(both[1], base_output, atol=1e-5)
  assert float(jnp.abs(factored - base_output).max()) > 0.1


def test_nnx_a_regex_over_an_unsupported_layer_and_a_mistyped_path_say_which():
  from flax import nnx

  model = NNXConvEinsum.build()
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match=r"does not support: 'norm' \(LayerNorm\)"):
    lora.find_targets_nnx(model, target_regex="conv|norm")
  factors = {"a": jnp.zeros((27, 2)), "b": jnp.zeros((2, 5))}
  x = jnp.ones((1, 8, 8, 3))
  with pytest.raises(ValueError, match="no layer there"):
    lora.apply_nnx(graphdef, state, {"cnv": factors}, x, scale=1.0)
  with pytest.raises(ValueError, match="no layer there"):
    lora.apply_nnx(graphdef, state, {"blocks/0/conv": factors}, x, scale=1.0)
  with pytest.raises(ValueError, match="of type LayerNorm, which LoRA does not support"):
    lora.apply_nnx(graphdef, state, {"norm": factors}, x, scale=1.0)
