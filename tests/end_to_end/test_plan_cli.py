"""`python -m experiments.plan`: the configured run's round planned for a target, through the CLI
(on this machine's CPU; on compile-only TPU devices where libtpu is installed: `make test-plan`)."""

import os
import re
import subprocess
import sys

import pytest

from tests.repo_paths import ROOT


def _run_plan(cache_dirs, target, *flags, config="configs/default.py:smoke"):
  """The plan CLI's finished process, run on the smoke config (or `config`)."""
  command = [
    sys.executable, "-m", "experiments.plan", "--config", config, f"--target={target}",
    f"--config.data.data_dir={cache_dirs['data_dir']}", f"--config.pretrain.cache_dir={cache_dirs['cache_dir']}",
    *flags,
  ]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _plan(cache_dirs, target, *flags, config="configs/default.py:smoke"):
  result = _run_plan(cache_dirs, target, *flags, config=config)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_the_plan_of_the_smoke_run_on_this_cpu_lists_chunks_and_the_best_ones_figures(cache_dirs):
  out = _plan(cache_dirs, "cpu", "--chunks=0,1")
  chunks = re.findall(r"clients_per_chunk=(\d+) \(\d+ per device\): ([\d.]+) MiB per device", out)
  assert [c for c, _ in chunks] == ["0", "1"], out
  assert float(chunks[0][1]) > float(chunks[1][1])  # All 4 clients at once hold more than one at a time.
  assert "best fitting: --config.fed.clients_per_chunk=0" in out and "FLOPs (compiler estimate)" in out
  evaluations = re.findall(r"evaluation \((\w+), eval_batch=128\): ([\d.]+) MiB per device \(fits\)", out)
  assert [name for name, _ in evaluations] == ["clients", "global"] and all(float(m) > 0 for _, m in evaluations)


@pytest.mark.slow  # 25 s; the DPO task built by the plan (a TypeError once).
def test_a_dpo_run_is_planned_with_its_pairs(cache_dirs):
  """The preference config's round ([C, S, B, 2, T] pairs, the DPO loss) planned on this CPU: the
  plan rebuilds the task in the planned dtype through the language model it wraps."""
  out = _plan(cache_dirs, "cpu", "--chunks=0", "--cost=false", config="configs/preference_tuning.py:smoke")
  assert "plan of fedit on cpu" in out and "best fitting: --config.fed.clients_per_chunk=0" in out, out
  assert "--config.model.remat=False --config.model.recompute_attention=False" in out, out  # As configured.


def _ways(out):
  """{flags: estimated µs} of the plan's "ways to run the round" lines, and the flags marked fastest."""
  ways = re.findall(r"^  (--config\.fed\.clients_per_chunk=\d+[^(]*?) \(\d+ a device at (?:once|a time)\): "
                    r"([\d.]+) µs(  <- the fastest)?$", out, re.M)  # fmt: skip
  return {flags: float(us) for flags, us, _ in ways}, [flags for flags, _, mark in ways if mark]


def test_the_plan_on_compile_only_tpu_devices_estimates_time_and_mfu_and_picks_the_faster_chunk(cache_dirs):
  """16 clients on a v5e-8, 2 a device: all at once fits, and the round of one client per device
  at a time is costed beside it; the best line names the faster, whose figures follow, and the
  run's time is its rounds times the round's."""
  pytest.importorskip("libtpu")
  out = _plan(cache_dirs, "v5e:2x4", "--config.data.num_clients=16", "--config.fed.clients_per_round=16")
  assert "16 clients a round (2 per device of the clients axis)" in out and "backbone in bfloat16" in out
  ways, fastest = _ways(out)
  assert list(ways) == ["--config.fed.clients_per_chunk=0", "--config.fed.clients_per_chunk=8"], out
  alone, together = ways["--config.fed.clients_per_chunk=8"], ways["--config.fed.clients_per_chunk=0"]
  assert alone != together  # Two programs: the chunk loop's and the vmapped one's.
  best = 8 if alone < together else 0
  assert fastest == [f"--config.fed.clients_per_chunk={best}"], out
  assert f"best fitting: --config.fed.clients_per_chunk={best} " in out, out
  shown = re.search(r"time \(TPU cost model estimate\): ([\d.]+) µs, estimated MFU [\d.]+%", out)
  assert shown and float(shown.group(1)) == min(alone, together), out
  assert "of 15.75 GiB (fits)" in out and "all-reduce" in out
  run = re.search(r"the run's 3 rounds: ([\d.]+) µs of device time, [\d.e+-]+ chip-hours on 8 chips", out)
  assert run and float(run.group(1)) == pytest.approx(3 * min(alone, together), abs=0.15), out  # Rounded to 0.1.


def test_the_plan_of_a_decoder_on_tpu_devices_weighs_recomputing_its_attention(cache_dirs):
  """The text smoke run on a v5e-8 (one client a device): its round with and without the
  attention's weights recomputed in the backward, both costed; the best line names the faster."""
  pytest.importorskip("libtpu")
  out = _plan(cache_dirs, "v5e:2x4", config="configs/instruction_tuning.py:smoke")
  ways, fastest = _ways(out)
  kept, recomputed = (
    f"--config.fed.clients_per_chunk=0 --config.model.recompute_attention={on}" for on in (False, True)
  )
  assert list(ways) == [kept, recomputed], out
  assert ways[kept] != ways[recomputed]  # One q kᵀ product more a layer, and no [T, T] weights kept.
  best = kept if ways[kept] < ways[recomputed] else recomputed
  assert fastest == [best], out
  assert "best fitting: --config.fed.clients_per_chunk=0 " in out and best.split()[-1] + " --config.data.feed" in out
  shown = re.search(r"time \(TPU cost model estimate\): ([\d.]+) µs", out)
  assert shown and float(shown.group(1)) == min(ways.values()), out


def test_the_fastest_way_fits_and_has_an_estimate_and_the_run_time_is_rounds_times_a_round():
  """`experiments.plan.fastest` on hand-made plans, and the run's time by hand count."""
  from experiments.plan import Way, fastest, run_time_line
  from hyperlora_jax import plan

  target = plan.target("cpu")
  way = lambda chunk, seconds, fits=True, attention=None: Way(
    chunk, 2, attention, plan.Plan(target, {"total": 1}, fits, None, seconds, 0, {})
  )  # fmt: skip
  ways = [way(0, 0.30), way(8, 0.25), way(0, 0.20, attention=True), way(8, 0.10, fits=False, attention=True)]
  assert fastest(ways) is ways[2]  # The quickest that fits; the one that does not fit is never chosen.
  assert fastest([way(0, 0.30), way(8, 0.30)]).chunk == 0  # Of equal times the earlier (the configured one).
  assert fastest([way(0, None), way(8, 0.1, fits=None)]).chunk == 8  # Fit unknown is not "does not fit".
  assert fastest([way(0, None), way(8, None)]).chunk == 0  # Nothing to compare: the largest chunk that fits.
  assert ways[2].flags() == "--config.fed.clients_per_chunk=0 --config.model.recompute_attention=True"
  # 30 rounds of 885.4 ms on 8 chips, evaluated every 5 rounds (6 times) or every 4 (7 times and the last).
  line = run_time_line(0.8854, 30, 5, 8)
  assert line.startswith("the run's 30 rounds: 26.56 s of device time, 0.059 chip-hours on 8 chips"), line
  assert "its 6 evaluation(s)" in line and "its 8 evaluation(s)" in run_time_line(0.8854, 30, 4, 8)
  assert run_time_line(0.8854, 30_000, 5, 8).startswith("the run's 30000 rounds: 7.38 h of device time, 59 chip-hours")


@pytest.mark.slow  # Two CLI runs (about 25 s on 2 cores).
def test_the_plan_holds_the_backbone_as_configured_and_names_its_size(cache_dirs):
  """compute.backbone_quantization=int8: the frozen backbone planned is the int8 one (its bytes
  about a quarter of float32's: the smoke ViT's kernels, a byte each, plus float norms, biases
  and scales), and the best-fitting line names it."""
  full = _plan(cache_dirs, "cpu", "--chunks=1", "--cost=false")
  int8 = _plan(cache_dirs, "cpu", "--chunks=1", "--cost=false", "--config.compute.backbone_quantization=int8")
  size = lambda out, kind: float(re.search(rf"backbone in {kind}: ([\d.]+) MiB in all", out).group(1))
  assert 0.25 < size(int8, "int8") / size(full, "float32") < 0.5, (full, int8)
  assert (
    "--config.fed.model_parallel=1 --config.compute.backbone_quantization=int8 --config.model.remat=False "
    "--config.data.feed=round" in int8
  )
  assert "frozen backbone in nf4" not in int8  # It fits: nothing smaller is tried.
  arguments = lambda out: float(re.search(r"arguments ([\d.]+) MiB", out).group(1))
  assert arguments(int8) != arguments(full)


def test_memory_settings_are_tried_configured_first_then_recomputed_then_split_then_smaller():
  from experiments.runner.memory import settings_to_try as memory_settings

  # (feed, recompute_attention, remat, model axis, quantization); None: the model has no such option.
  assert memory_settings(False, "none") == [
    ("round", None, False, 1, "none"), ("round", None, True, 1, "none"), ("round", None, True, 1, "int8"),
    ("round", None, True, 1, "nf4"),
  ]  # fmt: skip
  assert memory_settings(True, "int8") == [("round", None, True, 1, "int8"), ("round", None, True, 1, "nf4")]
  assert memory_settings(None, "none") == [
    ("round", None, None, 1, "none"),
    ("round", None, None, 1, "int8"),
    ("round", None, None, 1, "nf4"),
  ]
  assert memory_settings(False, "nf4") == [("round", None, False, 1, "nf4"), ("round", None, True, 1, "nf4")]
  assert memory_settings(True, "none", 1, 8) == [
    ("round", None, True, 1, "none"), ("round", None, True, 2, "none"), ("round", None, True, 4, "none"),
    ("round", None, True, 8, "none"), ("round", None, True, 1, "int8"), ("round", None, True, 1, "nf4"),
  ]  # fmt: skip
  assert memory_settings(True, "nf4", 2, 6) == [("round", None, True, 2, "nf4")]  # 4 does not divide 6 devices.
  # Devices with host memory: the round's inputs held there first, and in every setting after.
  assert memory_settings(False, "int8", 1, 2, "round", True) == [
    ("round", None, False, 1, "int8"), ("host", None, False, 1, "int8"), ("host", None, True, 1, "int8"),
    ("host", None, True, 2, "int8"), ("host", None, True, 1, "nf4"),
  ]  # fmt: skip
  assert memory_settings(True, "nf4", 1, 0, "host", True) == [("host", None, True, 1, "nf4")]
  # A decoder: its attention weights recomputed before its blocks, and in every setting after.
  assert memory_settings(False, "none", 1, 2, "round", True, False) == [
    ("round", False, False, 1, "none"), ("host", False, False, 1, "none"), ("host", True, False, 1, "none"),
    ("host", True, True, 1, "none"), ("host", True, True, 2, "none"), ("host", True, True, 1, "int8"),
    ("host", True, True, 1, "nf4"),
  ]  # fmt: skip
  assert memory_settings(True, "nf4", 1, 0, "round", False, True) == [("round", True, True, 1, "nf4")]


@pytest.mark.slow  # A CLI run compiling 4 settings (about 35 s on 2 cores).
def test_where_nothing_fits_the_plan_tries_recomputing_then_8_then_4_bits_and_says_so(cache_dirs):
  result = _run_plan(cache_dirs, "cpu", "--chunks=1", "--cost=false", "--memory_gib=0.00001")  # ~10 KiB: none fits.
  assert result.returncode != 0 and "no candidate fits cpu" in result.stdout + result.stderr
  tried = re.findall(r"model.remat=(\w+), model axis 1, frozen backbone in (\w+)", result.stdout)
  assert tried == [("False", "float32"), ("True", "float32"), ("True", "int8"), ("True", "nf4")], result.stdout
  assert result.stdout.count("DOES NOT FIT") == 4


@pytest.mark.slow  # A CLI run compiling 5 settings of the smoke decoder.
def test_where_nothing_fits_a_decoders_plan_recomputes_its_attention_before_its_blocks(cache_dirs):
  result = _run_plan(
    cache_dirs,
    "cpu",
    "--chunks=1",
    "--cost=false",
    "--memory_gib=0.00001",
    config="configs/instruction_tuning.py:smoke",
  )
  assert result.returncode != 0 and "no candidate fits cpu" in result.stdout + result.stderr
  tried = re.findall(r"model.recompute_attention=(\w+), model.remat=(\w+), model axis 1, frozen backbone in (\w+)",
                     result.stdout)  # fmt: skip
  assert tried == [
    ("False", "False", "float32"), ("True", "False", "float32"), ("True", "True", "float32"),
    ("True", "True", "int8"), ("True", "True", "nf4"),
  ], result.stdout  # fmt: skip


def test_a_host_feed_is_refused_by_name_on_compile_only_h100s(cache_dirs):
  """data.feed='host' on a GPU target (needs jax-cuda12-plugin), whose compile-only devices list no
  host memory: the plan stops naming the field instead of planning the block on the device."""
  pytest.importorskip("jax_plugins.xla_cuda12")
  result = _run_plan(cache_dirs, "h100", "--chunks=0", "--cost=false", "--config.data.feed=host")
  assert result.returncode != 0 and "data.feed: 'host' cannot be planned on h100" in result.stdout + result.stderr


def test_a_sweeps_plan_sums_each_distinct_runs_time_over_its_seeds():
  """`experiments.sweep.sweep_plan_lines` on hand-made rows: 3 seeds of 10 s and 2 seeds of 2 s
  (a round with loops: its time a lower bound) make 34 s, 0.0756 chip-hours on 8 chips; a run
  where nothing fits and one without a cost model are named, not added."""
  from experiments.sweep import sweep_plan_lines

  row = lambda method, seeds, seconds, loops=0: {
    "config": "configs/default.py", "method": method, "grid": ["lora.rank=4"], "seeds": seeds,
    "flags": "--config.fed.clients_per_chunk=0", "fits": True, "memory_bytes": 2**30,
    "round_seconds": None if seconds is None else seconds / 10, "run_seconds": seconds, "loops": loops,
  }  # fmt: skip
  nothing_fits = {"config": "configs/default.py", "method": "flexlora", "grid": [], "seeds": 1, "error": "no fit"}
  rows = [row("fedit", 3, 10.0), row("hyperlora", 2, 2.0, loops=20), nothing_fits, row("ffa_lora", 1, None)]
  lines = sweep_plan_lines(rows, "v5e:2x4", 8)
  assert lines[1] == (
    "  configs/default.py fedit lora.rank=4: 1.00 GiB per device, 10.00 s a run x 3 seed(s); "
    "--config.fed.clients_per_chunk=0"
  )
  assert "hyperlora lora.rank=4: 1.00 GiB per device, at least 2.00 s a run x 2 seed(s)" in lines[2]
  assert lines[3] == "  configs/default.py flexlora: NOTHING FITS (no fit)"
  assert "no time estimate x 1 seed(s)" in lines[4]
  assert lines[5].startswith("the sweep's 7 runs: at least 34.00 s of device time, at least 0.0756 chip-hours")
  assert lines[5].endswith("; 2 run(s) without an estimate (no cost model for the target, or nothing fits)")


def test_a_sweep_is_planned_on_tpu_devices_per_distinct_run_and_runs_nothing(cache_dirs, tmp_path):
  """`experiments.sweep --plan v5e:2x4`: HyperLoRA's smoke run (its server's SVDs: QR, Cholesky
  and eigh calls the TPU cost model cannot price, which once left it without a time) planned once
  for its two seeds: a positive time, a lower bound (the SVDs' loops), the sweep's total twice
  the run's; no workdir written."""
  pytest.importorskip("libtpu")
  command = [
    sys.executable, "-m", "experiments.sweep", "--configs", "configs/default.py:smoke", "--methods", "hyperlora",
    "--seeds", "0,1", "--runs_dir", str(tmp_path / "runs"), "--plan", "v5e:2x4",
    "--set", f"data.data_dir={cache_dirs['data_dir']}", "--set", f"pretrain.cache_dir={cache_dirs['cache_dir']}",
  ]  # fmt: skip
  result = subprocess.run(command, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
  out = result.stdout
  assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
  assert out.count("plan of hyperlora on v5e:2x4") == 1, out  # Two seeds, one program.
  unpriced = re.search(r"could not price \(not in the time estimate\): (.*)", out)
  assert unpriced and "Cholesky" in unpriced.group(1) and "EighTpu" in unpriced.group(1), out
  run = re.search(r"hyperlora: [\d.]+ MiB per device, at least ([\d.]+) µs a run x 2 seed\(s\)", out)
  total = re.search(r"the sweep's 2 runs: at least ([\d.]+) µs of device time", out)
  assert run and total and float(total.group(1)) == pytest.approx(2 * float(run.group(1)), abs=0.15), out
  assert not (tmp_path / "runs").exists()


def test_the_plan_module_defines_no_flags_on_import():
  """`experiments.sweep` and the tests import `experiments.plan` beside other commands' flags
  (`benchmarks.profile_round` has a `--chunks` too): importing both in one process must work (it
  raised DuplicateFlagError once, in CI, when a test had imported the plan first)."""
  code = "import experiments.plan, experiments.sweep, benchmarks.profile_round"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
