"""`hyperlora_jax.plan`: what XLA planned for a round, read back right (memory, collectives, the
cost-analysis traps corrected), on this machine's CPU; on compile-only TPU devices where libtpu
is installed, and on compile-only H100s where jax-cuda12-plugin is (`make test-plan`)."""

import dataclasses

import numpy as np
import pytest

from hyperlora_jax import plan
from tests.library.test_federated_contracts import batches, setup


def _round_plan(target, steps=2, clients=8, **kwargs):
  fed, frozen, adapter = setup(num_clients=clients)
  ids, weights = np.arange(clients, dtype=np.int32), np.full(clients, 1 / clients, np.float32)
  return plan.plan_round(fed, adapter, frozen, batches(clients, steps), ids, weights, target, **kwargs)


def test_collectives_are_counted_once_per_op_with_the_bytes_of_their_results():
  hlo = """
  %all-reduce.1 = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %p), replica_groups={{0,1}}, to_apply=%add
  %ags = (bf16[4,8]{1,0}, bf16[2]{0}) all-gather-start(bf16[2,8]{1,0} %x, bf16[1]{0} %y), dimensions={0}
  %agd = (bf16[4,8]{1,0}, bf16[2]{0}) all-gather-done((bf16[4,8]{1,0}, bf16[2]{0}) %ags)
  ROOT %cp = s32[3]{0} collective-permute(s32[3]{0} %z), source_target_pairs={{0,1}}
  %dot = f32[8,8]{1,0} dot(f32[8,16]{1,0} %a, f32[16,8]{1,0} %b)
  """
  assert plan.collectives_of(hlo) == {
    "all-reduce": (1, 8 * 16 * 4),
    "all-gather": (1, 4 * 8 * 2 + 2 * 2),  # The -done half is not a second op.
    "collective-permute": (1, 3 * 4),
  }


@dataclasses.dataclass
class _Compiled:
  """What `cost_of` reads of a compiled program."""

  analysis: dict
  text: str

  def cost_analysis(self):
    return [self.analysis]

  def as_text(self):
    return self.text


def test_the_tpu_time_gets_back_a_second_per_concat_bitcast_and_zero_crop_and_loops_are_reported():
  text = (
    '%a = f32[2] custom-call(), custom_call_target="ConcatBitcast"\n'
    '%b = f32[2] custom-call(), custom_call_target="ZeroCrop"\n'
    '%c = f32[2] custom-call(), custom_call_target="ConcatBitcast"\n'
    "%w = (s32[]) while(%t), condition=%cond, body=%body\n"
  )
  flops, seconds, loops = plan.cost_of(_Compiled({"flops": 1e9, "optimal_seconds": -2.75}, text))
  assert flops == 1e9 and seconds == pytest.approx(0.25) and loops == 1
  assert plan.cost_of(_Compiled({}, "")) == (None, None, 0)  # No cost analysis (GPU).
  # v6e (libtpu 0.0.42): a decoder round's 46 ConcatBitcasts and 2 + 2 PrepareAsyncCall halves
  # read -49.99 s; 0.0114 s once all 50 are added back (the same round on v5e has no such halves).
  v6e = (
    '%a = f32[2] custom-call(), custom_call_target="ConcatBitcast"\n' * 46
    + (
      '%p = f32[2] custom-call(), custom_call_target="PrepareAsyncCallStart"\n'
      '%q = f32[2] custom-call(), custom_call_target="PrepareAsyncCallDone"\n'
    )
    * 2
  )
  assert plan.cost_of(_Compiled({"optimal_seconds": -49.98863}, v6e))[1] == pytest.approx(0.01137)
  # A time still negative (a lowering call not known yet) is no time, not a negative one.
  assert plan.cost_of(_Compiled({"flops": 1e9, "optimal_seconds": -3.0}, text))[1] is None
  # The linear-algebra calls (an SVD's QR, Cholesky and eigh on a TPU) take a second off each too,
  # and are counted as ops the time leaves out; a gather's helper call takes nothing off.
  svd = (
    '%q = f32[2] custom-call(), custom_call_target="QrDecompositionBlock"\n'
    '%c = f32[2] custom-call(), custom_call_target="Cholesky"\n'
    '%e = f32[2] custom-call(), custom_call_target="EighTpu"\n'
    '%g = f32[2] custom-call(), custom_call_target="AssumeGatherIndicesInBound"\n'
  )
  assert plan.cost_of(_Compiled({"optimal_seconds": -2.5}, svd))[1] == pytest.approx(0.5)
  assert plan.cycles_by_op(svd) == ({}, {"QrDecompositionBlock": 1, "Cholesky": 1, "EighTpu": 1})
  # A conditional costs its dearest branch, so a branch's calls take nothing off (an SVD of
  # [384, 384] on a v5e: 73 calls, 20 outside its conditionals, read -20.0 s); a while body's do.
  nested = (
    "%body (p: f32[2]) -> f32[2] {\n"
    '  %q = f32[2] custom-call(), custom_call_target="QrDecompositionBlock"\n'
    "}\n"
    "%cond (p: f32[2]) -> pred[] {\n  %lt = pred[] compare(%a, %b), direction=LT\n}\n"
    "%branch (p: f32[2]) -> f32[2] {\n"
    '  %c = f32[2] custom-call(), custom_call_target="Cholesky"\n'
    '  %e = f32[2] custom-call(), custom_call_target="EighTpu"\n'
    "}\n"
    "%other (p: f32[2]) -> f32[2] {\n  %m = f32[2] multiply(%p, %p)\n}\n"
    "ENTRY %main (x: f32[2]) -> f32[2] {\n"
    '  %c0 = f32[2] custom-call(), custom_call_target="Cholesky"\n'
    "  %w = f32[2] while(%x), condition=%cond, body=%body\n"
    "  %k = f32[2] conditional(%i, %w, %w), branch_computations={%branch, %other}\n"
    "}\n"
  )
  assert plan.cost_of(_Compiled({"optimal_seconds": -1.75}, nested))[1] == pytest.approx(0.25)


def test_a_tpu_programs_linear_algebra_is_left_out_of_its_time_not_made_negative():
  """v5e (needs libtpu): an SVD, a QR, a Cholesky and an inverse compiled for one chip: the cost
  model reads -1 s per linear-algebra custom call (before the correction: at or below -8 s here);
  corrected, the time is positive, the calls are listed as unpriced, and a matmul beside them
  still costs what it costs alone."""
  pytest.importorskip("libtpu")
  import jax
  import jax.numpy as jnp

  device = plan.target("v5e:2x4").devices[0]
  placed = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))

  def linear_algebra(x, y):
    square = y @ y.T + 4 * jnp.eye(16)
    return (jnp.linalg.svd(x, full_matrices=False)[1].sum() + jnp.linalg.qr(x)[0].sum()
            + jnp.linalg.cholesky(square).sum() + jnp.linalg.inv(square).sum())  # fmt: skip

  compiled = jax.jit(linear_algebra).lower(placed(64, 16), placed(16, 16)).compile()
  analysis = compiled.cost_analysis()
  raw = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["optimal_seconds"]
  _, seconds, _ = plan.cost_of(compiled)
  _, unpriced = plan.cycles_by_op(compiled.as_text())
  assert raw <= -8 and seconds is not None and 0 < seconds < 1e-3, (raw, seconds)
  assert {"QrDecompositionBlock", "Cholesky", "EighTpu", "LuDecompositionBlock"} <= set(unpriced), unpriced
  matmul = jax.jit(lambda a, b: a @ b).lower(placed(512, 512), placed(512, 512)).compile()
  both = jax.jit(lambda x, y, a, b: (linear_algebra(x, y), a @ b))
  together = both.lower(placed(64, 16), placed(16, 16), placed(512, 512), placed(512, 512)).compile()
  assert plan.cost_of(together)[1] >= plan.cost_of(matmul)[1] > 0


def test_the_flops_of_s_steps_are_the_unrolled_rounds_though_xla_counts_a_loop_body_once():
  """The cost of a 6-step round, extrapolated from the loop-free rounds of 2 and 3 steps, equals
  that of the whole round compiled unrolled; read from the round with its step loop, 4 more steps
  barely count (the trap)."""
  import jax

  cpu = plan.target("cpu")
  fed, frozen, adapter = setup(num_clients=8)
  ids, weights = np.arange(8, dtype=np.int32), np.full(8, 1 / 8, np.float32)
  unrolled = dataclasses.replace(fed, client_update=dataclasses.replace(fed.client_update, unroll=True))
  state = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), adapter))
  direct, _, _ = plan.cost_of(jax.jit(unrolled.step).lower(state, frozen, batches(8, 6), ids, weights).compile())
  assert _round_plan(cpu, steps=6).flops == pytest.approx(direct, rel=1e-9)
  looped_state = jax.eval_shape(lambda: fed.init(jax.random.key(0), adapter))
  looped = [
    plan.cost_of(jax.jit(fed.step).lower(looped_state, frozen, batches(8, s), ids, weights).compile())[0]
    for s in (2, 6)
  ]
  two, three = (_round_plan(cpu, steps=s).flops for s in (2, 3))
  assert looped[1] - looped[0] < 0.1 * 4 * (three - two)
  no_cost = _round_plan(cpu, steps=6, cost=False)  # The looped program's figures are not given.
  assert no_cost.flops is None and no_cost.estimated_seconds is None


def test_memory_is_the_compiled_programs_and_fit_compares_it_with_the_usable_memory():
  cpu = plan.target("cpu")
  report = _round_plan(cpu, cost=False)
  m = report.memory
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"] > 0
  assert report.fits is True
  assert report.estimated_seconds is None and report.mfu is None  # Only the TPU compiler models time.
  small = dataclasses.replace(cpu, memory_bytes=m["total"] - 1)
  assert _round_plan(small, cost=False).fits is False
  gpu_like = dataclasses.replace(cpu, memory_bytes=m["total"] + 1, usable_fraction=0.75)  # JAX's 75% GPU cap.
  assert _round_plan(gpu_like, cost=False).fits is False
  assert any("DOES NOT FIT" in line for line in _round_plan(small, cost=False).lines())


def test_a_cohort_the_clients_axis_does_not_divide_is_refused_by_name():
  cpu = plan.target("cpu")
  with pytest.raises(ValueError, match="clients_per_chunk=3"):
    _round_plan(cpu, clients_per_chunk=3)
  with pytest.raises(ValueError, match="target 'v9z:2x2'; known"):
    plan.target("v9z:2x2")


def test_a_round_planned_for_compile_only_tpu_devices():
  """v5e:2x4 (needs libtpu): the round fits a v5e's 15.75 GiB, the cost model gives a positive
  time, and the clients' updates are combined across devices (an all-reduce)."""
  pytest.importorskip("libtpu")
  v5e = plan.target("v5e:2x4")
  assert len(v5e.devices) == 8 and v5e.memory_bytes == int(15.75 * plan.GIB)
  report = _round_plan(v5e)
  assert report.fits and report.flops > 0 and report.estimated_seconds > 0 and 0 < report.mfu < 1
  assert "all-reduce" in report.collectives


def test_a_round_planned_for_eight_compile_only_h100s():
  """h100x8 (needs jax-cuda12-plugin): memory only (XLA:GPU has no cost analysis), against the
  75% of 79.1 GiB JAX's allocator takes by default; the updates are combined across devices."""
  pytest.importorskip("jax_plugins.xla_cuda12")
  h100s = plan.target("h100x8")
  assert len(h100s.devices) == 8 and h100s.usable_bytes == int(84942979072 * 0.75)
  report = _round_plan(h100s)
  assert report.fits and report.flops is None and report.estimated_seconds is None
  assert "all-reduce" in report.collectives


def test_a_round_fed_from_host_memory_holds_its_batches_there_on_compile_only_tpu_devices():
  """v5e:2x4 (needs libtpu), 32 clients by chunks of 16: with `host_feed` the batches' bytes leave
  the device's arguments for its host memory, byte for byte, and the plan says so."""
  pytest.importorskip("libtpu")
  v5e = plan.target("v5e:2x4")
  on_device = _round_plan(v5e, clients=32, clients_per_chunk=16, cost=False)
  on_host = _round_plan(v5e, clients=32, clients_per_chunk=16, cost=False, host_feed=True)
  moved = on_device.memory["arguments"] - on_host.memory["arguments"]
  assert "host_arguments" not in on_device.memory and on_host.memory["host_arguments"] == moved > 0
  assert any("in host memory" in line for line in on_host.lines())


def test_a_round_is_not_planned_from_host_memory_on_compile_only_h100s_which_list_none():
  """Compile-only H100s (needs jax-cuda12-plugin) list no memories: refused by name, not planned
  as if the batches were on the device."""
  pytest.importorskip("jax_plugins.xla_cuda12")
  with pytest.raises(ValueError, match="host_feed: h100's devices list no pinned host memory"):
    _round_plan(plan.target("h100"), cost=False, host_feed=True)


def test_a_program_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit_with_its_figure():
  message = (
    "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
    "for HLO temporaries (28.37G) exceeds available HBM (15.75G).\nmore context"
  )
  report = plan.refused_plan(message, plan.target("cpu"))
  assert report.fits is False and report.memory["total"] == pytest.approx(28.37 * plan.GIB, rel=1e-6)
  assert "refused" in report.lines()[1] and "28.37G" in report.lines()[1]


def test_a_chunked_rounds_cost_is_its_chunks_in_turn():
  """32 clients by chunks of 4: the cost is eight chunks' (read from a round of 4 clients), within
  the server's small share of the whole round's; its memory is below the whole round's (at 8
  clients the chunk loop's own buffers outweigh what 4 fewer clients save)."""
  cpu = plan.target("cpu")
  whole, chunked = _round_plan(cpu, steps=3, clients=32), _round_plan(cpu, steps=3, clients=32, clients_per_chunk=4)
  assert chunked.flops == pytest.approx(whole.flops, rel=0.1)
  assert chunked.memory["temporaries"] < whole.memory["temporaries"]


def test_any_program_is_planned_with_its_arguments_bytes_and_its_flops_hand_counted():
  """`plan_program` of x [64, 256] @ w [256, 10] (float32, then int8 weights): arguments are the
  bytes of the two inputs, FLOPs 2 x 64 x 256 x 10 (no loop to undercount)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  cpu = plan.target("cpu")
  one = SingleDeviceSharding(cpu.devices[0])
  x, w = jax.ShapeDtypeStruct((64, 256), jnp.float32), jax.ShapeDtypeStruct((256, 10), jnp.float32)
  report = plan.plan_program(lambda x, w: x @ w, (x, w), (one, one), cpu)
  assert report.memory["arguments"] == (64 * 256 + 256 * 10) * 4
  assert report.flops == 2 * 64 * 256 * 10 and report.loops == 0 and report.fits
  w8 = jax.ShapeDtypeStruct((256, 10), jnp.int8)
  report8 = plan.plan_program(lambda x, w: x @ w.astype(jnp.float32), (x, w8), (one, one), cpu)
  assert report8.memory["arguments"] == 64 * 256 * 4 + 256 * 10


LOOPED_HLO = """
%inner_cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = s32[] constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %ar)
}
%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[], f32[4]{0}) while(%p), condition=%inner_cond, body=%inner_body
  %ag = f32[8]{0} all-gather(f32[4]{0} %y), dimensions={0}
  ROOT %t2 = (s32[], f32[4]{0}) tuple(%i, %y)
}
%outer_cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %lt2 = pred[] fusion(%i, %c), kind=kLoop, calls=%wrapped_compare
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %w2 = (s32[], f32[4]{0}) while(%t0), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %ar2 = f32[2]{0} all-reduce(f32[2]{0} %z), to_apply=%add
}
"""


def test_collectives_inside_loops_count_once_per_iteration():
  """An all-reduce in a loop of 3 (its count read from the condition, `i < 3`, as the TPU
  compiler writes it) inside a loop of 5 (`known_trip_count`, as XLA:CPU and GPU write it) runs
  15 times; an all-gather in the outer loop 5 times; one outside once."""
  runs = plan.loop_multipliers(LOOPED_HLO)
  assert runs["inner_body"] == 15 and runs["outer_body"] == 5 and runs["ENTRY"] == 1
  assert plan.collectives_of(LOOPED_HLO) == {"all-reduce": (16, 15 * 16 + 8), "all-gather": (5, 5 * 32)}


SHARED_HLO = """
%cond4 (p: (s32[], f32[4])) -> pred[] {
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%cond6 (p: (s32[], f32[4])) -> pred[] {
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%reduce_step (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %ar)
}
%caller (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]{0}) while(%p), condition=%cond6, body=%reduce_step
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %w1 = (s32[], f32[4]{0}) while(%t0), condition=%cond4, body=%reduce_step
  %c1 = f32[4]{0} call(%x), to_apply=%caller
  %c2 = f32[4]{0} call(%x), to_apply=%caller
}
"""


def test_a_computation_reached_from_several_call_sites_runs_the_sum_of_their_counts():
  """One loop body shared by a loop of 4 in ENTRY and a loop of 6 in a computation ENTRY calls
  twice runs 4 + 2 x 6 = 16 times (the first site's count alone would say 4 or 6)."""
  runs = plan.loop_multipliers(SHARED_HLO)
  assert runs["caller"] == 2 and runs["reduce_step"] == 16 and runs["cond6"] == 14 and runs["cond4"] == 5
  assert plan.collectives_of(SHARED_HLO) == {"all-reduce": (16, 16 * 16)}


def test_the_loop_count_of_a_compiled_program_is_read_from_its_text():
  import jax
  import jax.numpy as jnp

  text = (
    jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, c: c * 2 + jnp.sin(c), x))
    .lower(jnp.ones(4))
    .compile()
    .as_text()
  )
  assert max(plan.loop_multipliers(text).values()) == 8  # The body 7 times, its condition 8.


def test_collectives_of_a_loop_compiled_for_tpu_devices_count_every_iteration():
  """v5e:2x4 (needs libtpu): a loop of 3 steps, each summing over the sharded axis: 3 all-reduces
  a run, not 1."""
  pytest.importorskip("libtpu")
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  v5e = plan.target("v5e:2x4")
  sharded = NamedSharding(v5e.mesh(), PartitionSpec("clients"))
  body = lambda i, c: c * jnp.sum(c, axis=0, keepdims=True)  # A cross-device sum every step.
  report = plan.plan_program(
    lambda x: jax.lax.fori_loop(0, 3, body, x), (jax.ShapeDtypeStruct((8, 128), jnp.float32),), (sharded,), v5e
  )
  assert report.collectives["all-reduce"][0] == 3, report.collectives


CYCLES_HLO = """
%fused_mul (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %inner = f32[8]{0} fusion(%p), kind=kLoop, calls=%leaf, backend_config={"window_config":{"estimated_cycles":"999"}}
}

%body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]) parameter(0)
  %fusion.3 = f32[8]{0} fusion(%x), kind=kOutput, calls=%fused_mul, metadata={op_name="jit(step)/vmap()/closed_call/transpose(jvp(DecoderLM))/block_3/attn/value/dot_general"}, backend_config={"window_config":{"estimated_cycles":"100"}}
  %fusion.4 = f32[8]{0} fusion(%x), kind=kOutput, calls=%fused_mul, metadata={op_name="jit(step)/vmap()/closed_call/transpose(jvp(DecoderLM))/block_4/attn/value/dot_general"}, backend_config={"window_config":{"estimated_cycles":"50"}}
  %scatter_offload_custom_fusion.6 = f32[64]{0} fusion(%x), kind=kCustom, calls=%fused_mul, metadata={op_name="jit(step)/vmap()/closed_call"}, backend_config={"window_config":{"estimated_cycles":"9223372036854775807"}}
}

%cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/vmap()/closed_call/jvp(DecoderLM)/lm_head/dot_general"}, backend_config={"window_config":{"estimated_cycles":"600"}}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %copy = f32[8]{0} copy(%fusion)
}
"""


def test_the_cost_models_cycles_are_summed_by_op_over_layers_and_loops_and_unpriced_ops_are_counted():
  """A hand count on a TPU-style module: the loop body (4 trips) holds the same op of two layers
  (100 + 50 cycles) and a scatter the cost model gave INT64_MAX; ENTRY an op of 600 cycles; the
  fused computation's own inner estimate (999) is part of its caller's and is not added again.
  So: backward attn/value/dot_general 4 x 150 = 600, forward lm_head/dot_general 600, one
  unpriced kind run 4 times; shares 1/2 each. Counting the body once, keeping block numbers,
  adding the sentinel or the inner fusion would each give other figures."""
  cycles, unpriced = plan.cycles_by_op(CYCLES_HLO)
  assert cycles == {"backward attn/value/dot_general": 600, "forward lm_head/dot_general": 600}
  assert unpriced == {"scatter_offload_custom_fusion": 4}
  assert plan.time_shares(cycles) == (("backward attn/value/dot_general", 0.5), ("forward lm_head/dot_general", 0.5))
  assert (
    plan.format_shares(plan.time_shares(cycles))
    == "backward attn/value/dot_general 50%, forward lm_head/dot_general 50%"
  )
  assert plan.time_shares({}) == ()
  assert plan.op_label("jit(step)/FederatedRound.step/add") == "forward FederatedRound.step/add"
  assert plan.cycles_by_op("%x = f32[2] add(%a, %b)") == ({}, {})  # Other compilers write none.


def test_a_decoder_rounds_tpu_plan_says_where_its_time_goes_and_prices_every_op():
  """v6e:2x4 (needs libtpu): a FedIT round of a 2-block Llama decoder (vocabulary 512, 16 clients,
  2 steps of 2 x 16 tokens): the plan's shares of the cost model's cycles are positive, at most
  1 in all, and name the decoder's matmuls; and no op is left unpriced: the next-token loss's
  backward subtracts the one-hot part by a select on accelerators, where a scatter at the targets
  was, on a v6e, a custom fusion offloaded to its SparseCores that the cost model gives no
  cycles (`scatter_offload_custom_fusion`; with the scatter back this test fails)."""
  pytest.importorskip("libtpu")
  import jax
  import jax.numpy as jnp
  import optax

  from hyperlora_jax import aggregators, lora
  from hyperlora_jax.client import local_update
  from hyperlora_jax.federated import FederatedRound
  from hyperlora_jax.models.llama import DecoderLM
  from hyperlora_jax.tasks.causal_lm import CausalLM
  from hyperlora_jax.tasks.common import frozen_tree

  model = DecoderLM(vocab_size=512, width=128, depth=2, num_heads=4, mlp_dim=256, dtype=jnp.bfloat16)
  example = jnp.zeros((1, 8), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), example))
  targets = lora.find_targets(model, variables, example, jnp.ones_like(example), target_regex=r".*attn/(query|value)")
  trainable = jax.eval_shape(lambda: {"lora": lora.init_lora(jax.random.key(1), targets, 4), "head": {}})
  task = CausalLM(model, lora.lora_scale(8.0, 4), jnp.bfloat16)
  fed = FederatedRound(local_update(task.loss_fn, optax.adam(1e-3), steps=2), aggregators.fedit(), num_clients=16)
  frozen = jax.eval_shape(lambda v: frozen_tree(v, dtype=jnp.bfloat16), variables)
  tokens = jax.ShapeDtypeStruct((16, 2, 2, 16), jnp.int32)
  block = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}
  block["mask"] = jax.ShapeDtypeStruct((16, 2, 2), jnp.float32)
  ids, weights = jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.float32)
  report = plan.plan_round(fed, trainable, frozen, block, ids, weights, plan.target("v6e:2x4"), clients_per_chunk=0)
  shares = dict(report.time_shares)
  assert shares and all(s > 0 for s in shares.values()) and sum(shares.values()) <= 1 + 1e-9
  assert any(label.endswith("dot_general") for label in shares), shares
  assert report.unpriced == {}, report.unpriced
  assert any("where the estimated time goes" in line for line in report.lines())


def test_recomputed_attention_holds_no_attention_weights_on_compile_only_tpu_devices():
  """v5e (needs libtpu): a 3-block decoder's gradient over 4 sequences of 512 tokens (16 heads,
  so each block's attention weights are 4 x 16 x 512 x 512 bfloat16 = 32 MiB) holds at least one
  block's weights fewer bytes of temporaries in HBM with `recompute_attention` than without
  (measured: 161.3 -> 109.7 MiB). Without the optimization barrier in its backward, XLA merges the
  recomputed logits with the forward's (common subexpressions) and the saving is nothing: this
  test fails so (checked). (Smaller programs report no temporaries at all on this target.)"""
  pytest.importorskip("libtpu")
  import jax
  import jax.numpy as jnp

  from hyperlora_jax.models.llama import DecoderLM

  device = jax.sharding.SingleDeviceSharding(plan.target("v5e:2x2").devices[0])
  ids = jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=device)

  def temporaries(recompute: bool) -> int:
    model = DecoderLM(vocab_size=128, width=128, depth=3, num_heads=16, num_kv_heads=2, mlp_dim=256,
                      dtype=jnp.bfloat16, recompute_attention=recompute)  # fmt: skip
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    loss = lambda v, tokens: jnp.sum(model.apply(v, tokens) ** 2)
    return jax.jit(jax.grad(loss)).lower(variables, ids).compile().memory_analysis().temp_size_in_bytes

  weights_per_block = 4 * 16 * 512 * 512 * 2
  kept, recomputed = temporaries(False), temporaries(True)
  assert kept - recomputed >= weights_per_block, (kept, recomputed)
