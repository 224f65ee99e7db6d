"""`peft.fold_base_delta` and `peft.alpha_for_scale`: FedEx-LoRA's and FLoRA's merged residuals
carried by an adapter alone, checked against numpy's SVD and hand counts of ranks."""

import numpy as np
import pytest

from hyperlora_jax import peft

SCALE = 2.0


def _low_rank(rng, d_in, d_out, rank):
  return rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out))


@pytest.mark.parametrize("d_in, d_out", [(12, 12), (12, 7), (5, 9)])
def test_a_folded_layer_is_the_residual_plus_the_adapter_at_the_sum_of_their_ranks(d_in, d_out):
  """A rank-2 residual plus a rank-2 adapter (s a b): the folded layer keeps rank 4 (a hand
  count: generic subspaces add) and s a' b' is the sum; square and non-square layers, so a
  transposed residual fails on shape or value."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(d_in, 2)).astype(np.float32), rng.normal(size=(2, d_out)).astype(np.float32)
  delta = _low_rank(rng, d_in, d_out, 2).astype(np.float32)
  folded, errors = peft.fold_base_delta({"layer": {"a": a, "b": b}, "other": {"a": a, "b": b}}, {"layer": delta}, SCALE)
  want = delta.astype(np.float64) + SCALE * (a.astype(np.float64) @ b)
  got = SCALE * (folded["layer"]["a"].astype(np.float64) @ folded["layer"]["b"])
  assert folded["layer"]["a"].shape == (d_in, 4) and folded["layer"]["b"].shape == (4, d_out)
  assert folded["layer"]["a"].dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  assert errors["layer"] < 1e-6 and set(errors) == {"layer"}
  np.testing.assert_array_equal(folded["other"]["a"], a)  # No residual: unchanged.


def test_max_rank_keeps_the_largest_singular_directions_and_reports_the_rest():
  """Truncated to 2 of rank 5, the error is that of the best rank-2 approximation (Eckart-Young):
  sqrt(σ3² + σ4² + σ5²) / ||M||, computed here from numpy's singular values."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(10, 2)), rng.normal(size=(2, 8))
  delta = _low_rank(rng, 10, 8, 3)
  total = delta + SCALE * a @ b
  sigma = np.linalg.svd(total, compute_uv=False)
  folded, errors = peft.fold_base_delta({"w": {"a": a, "b": b}}, {"w": delta}, SCALE, max_rank=2)
  assert folded["w"]["a"].shape == (10, 2)
  want = np.sqrt(np.sum(sigma[2:] ** 2)) / np.sqrt(np.sum(sigma**2))
  assert errors["w"] == pytest.approx(want, rel=1e-6)
  exact, _ = peft.fold_base_delta({"w": {"a": a, "b": b}}, {"w": delta}, SCALE)
  assert exact["w"]["a"].shape == (10, 5)


def test_a_residual_without_an_adapter_layer_and_the_refusals():
  rng = np.random.default_rng(2)
  delta = _low_rank(rng, 6, 4, 1).astype(np.float32)
  folded, _ = peft.fold_base_delta({}, {"w": delta}, SCALE)
  np.testing.assert_allclose(SCALE * folded["w"]["a"] @ folded["w"]["b"], delta, atol=1e-5)
  assert folded["w"]["a"].shape == (6, 1)
  with pytest.raises(ValueError, match="'w' is \\(4, 6\\), its layer's update \\(6, 4\\)"):
    peft.fold_base_delta({"w": {"a": np.zeros((6, 2)), "b": np.zeros((2, 4))}}, {"w": delta.T}, SCALE)
  with pytest.raises(ValueError, match="max_rank=-1"):
    peft.fold_base_delta({}, {}, SCALE, max_rank=-1)


def test_alpha_for_scale_keeps_the_scale_at_the_most_common_rank():
  """Ranks 4, 4, 6: save_peft's r is 4, so alpha = s * 4 (rsLoRA: s * 2); the rank-6 layer gets
  its alpha_pattern from save_peft."""
  adapter = {p: {"a": np.zeros((3, r)), "b": np.zeros((r, 3))} for p, r in (("x", 4), ("y", 4), ("z", 6))}
  assert peft.alpha_for_scale(adapter, 0.5) == 2.0
  assert peft.alpha_for_scale(adapter, 0.5, rslora=True) == 1.0
