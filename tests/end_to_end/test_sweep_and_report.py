"""Sweeps (expansion, workdirs, parallel runs, skip/resume, index) and the report (tables, plots)."""

import json
import os

import numpy as np
import pytest

from experiments import sweep
from experiments.reports import report
from tests.repo_paths import ROOT


def _fake_run(path, method, seed, global_acc, rounds=3, new_client=None, benchmark="default", text_scores=None):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"benchmark": benchmark, "method": method, "seed": seed, "fed": {"num_rounds": rounds}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in range(1, rounds + 1):
      record = {
        "round": r,
        "global_accuracy": global_acc * r / rounds,
        "personalized_accuracy_mean": 0.5,
        "personalized_accuracy_worst": 0.25,
        "cum_bytes": 2e6 * r,
      }
      if new_client is not None and r == rounds:
        record["new_client_global"] = new_client
      if text_scores is not None and r == rounds:
        record.update(text_scores)
      f.write(json.dumps(record) + "\n")


def test_report_aggregates_seeds(tmp_path):
  _fake_run(tmp_path / "fedit" / "seed0", "fedit", 0, 0.4, new_client=0.2)
  _fake_run(tmp_path / "fedit" / "seed1", "fedit", 1, 0.6, new_client=0.4)
  _fake_run(tmp_path / "flora" / "seed0", "flora", 0, 0.9)
  os.makedirs(tmp_path / "unfinished")
  _fake_run(tmp_path / "unfinished" / "x", "flexlora", 0, 0.9, rounds=3)
  with open(tmp_path / "unfinished" / "x" / "config.json", "w") as f:
    json.dump({"method": "flexlora", "seed": 0, "fed": {"num_rounds": 10}}, f)
  rows = report.finished_runs(str(tmp_path))
  table = report.markdown_table(rows, reference="fedit", target=0.5)
  # Reference: fedit's final global accuracy with the same seed (seed 0: 40%). Curves are
  # acc * round / 3, so flora (90% at round 3) passes 40% at round 2.
  assert "| rounds to fedit's final global | rounds to 50% global |" in table
  # Absolute target 50%: fedit seed 0 (40%) never, seed 1 (60%) at round 3; flora at round 2.
  assert "| fedit | 2 | 50.0 ± 10.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 6.00 | 3.0 ± 0.0 (2/2) | 3.0 ± 0.0 (1/2) |" in table
  assert "| flora | 1 | 90.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 6.00 | 2.0 ± 0.0 (1/1) | 2.0 ± 0.0 (1/1) |" in table
  assert "| fedit | 30.0 ± 10.0 |" in table and "| flora | n/a |" in table  # New clients.
  assert "flexlora" not in table  # Unfinished runs are left out.
  gathered = tmp_path.parent / (tmp_path.name + "_gathered")  # A directory of links to runs.
  os.makedirs(gathered / "fedit")
  os.symlink(tmp_path / "fedit" / "seed1", gathered / "fedit" / "seed1")
  os.symlink(tmp_path / "flora", gathered / "flora")
  assert report.find_runs(str(gathered)) == [str(gathered / "fedit" / "seed1"), str(gathered / "flora" / "seed0")]


def test_the_report_tables_text_runs_multiple_choice_and_generation_scores(tmp_path):
  """mc_* and gen_* of the final records, mean ± std over seeds (a by-subject dict left out); a
  report without text runs has no such table."""
  scores = lambda mc, rouge: {
    "mc_accuracy_global": mc,
    "mc_accuracy_global_by_subject": {"math": mc},
    "gen_rouge_l_global": rouge,
  }
  _fake_run(tmp_path / "fedit" / "seed0", "fedit", 0, 0.4, text_scores=scores(0.3, 0.1))
  _fake_run(tmp_path / "fedit" / "seed1", "fedit", 1, 0.4, text_scores=scores(0.5, 0.3))
  table = report.markdown_table(report.finished_runs(str(tmp_path)), reference="fedit")
  assert "| method | gen_rouge_l_global | mc_accuracy_global |" in table
  assert "| fedit | 20.0 ± 10.0 | 40.0 ± 10.0 |" in table and "by_subject" not in table
  _fake_run(tmp_path / "plain" / "fedit", "fedit", 0, 0.4)
  assert "Text evaluation" not in report.markdown_table(report.finished_runs(str(tmp_path / "plain")))


def test_report_groups_benchmarks_and_plots_mean_curves(tmp_path):
  runs = tmp_path / "runs"
  for seed, acc in ((0, 0.3), (1, 0.6)):
    _fake_run(runs / "a" / "fedit" / f"seed{seed}", "fedit", seed, acc, benchmark="bench_a")
  _fake_run(runs / "b" / "fedit" / "seed0", "fedit", 0, 0.9, benchmark="bench_b/x")
  rows = report.finished_runs(str(runs))
  x, mean, std = report.mean_curve([r for r in rows if r["benchmark"] == "bench_a"], "global_accuracy", "round")
  np.testing.assert_allclose(x, [1, 2, 3])
  np.testing.assert_allclose(mean, [0.15, 0.3, 0.45])
  np.testing.assert_allclose(std, [0.05, 0.1, 0.15])
  out = tmp_path / "report.md"
  report.main([str(runs), "--out", str(out)])
  text = out.read_text()
  assert text.index("## bench_a") < text.index("## bench_b/x")
  assert "| fedit | 2 | 45.0 ± 15.0 |" in text and "| fedit | 1 | 90.0 ± 0.0 |" in text
  for png in ("bench_a.png", "bench_b__x.png"):
    path = runs / "plots" / png
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert f"](runs/plots/{png})" in text  # Linked relative to the report file.


def test_sweep_expands_configs_grid_methods_and_seeds():
  specs = sweep.expand(
    ["configs/label_skew.py:alpha=0.1", "configs/default.py"],
    ["fedit", "flora"],
    [0, 1],
    ["fed.num_rounds=7"],
    ["lora.rank=2,8"],
  )
  assert len(specs) == 2 * 2 * 2 * 2
  spec = specs[0]
  assert spec == sweep.RunSpec(
    "configs/label_skew.py:alpha=0.1", "fedit", 0, ("fed.num_rounds=7", "lora.rank=2"), ("lora.rank=2",)
  )
  config = sweep.make_config(spec, "smoke")
  assert (config.method, config.seed, config.fed.num_rounds, config.lora.rank) == ("fedit", 0, 7, 2)
  assert config.benchmark == "label_skew_100/alpha0.1" and config.model.width == 16
  assert sweep.workdir_of("runs", config.benchmark, spec) == "runs/label_skew_100/alpha0.1/fedit/lora.rank=2/seed0"
  with pytest.raises(ValueError, match="fed.no_such_field"):
    sweep.make_config(sweep.RunSpec("configs/default.py", "fedit", 0, ("fed.no_such_field=1",)))
  with pytest.raises(ValueError, match="no such config file"):
    sweep.make_config(sweep.RunSpec("configs/nope.py", "fedit", 0))


def test_parallel_sweep_runs_records_skips_and_reports_failures(tmp_path, cache_dirs):
  fixed = (
    f"data.data_dir={cache_dirs['data_dir']}",
    f"pretrain.cache_dir={cache_dirs['cache_dir']}",
    "fed.num_rounds=2",
  )
  specs = sweep.expand(["configs/default.py"], ["fedit", "flexlora"], [0], list(fixed), [])
  broken = sweep.RunSpec("configs/default.py", "fedit", 1, fixed + ("data.name=no_such_dataset",))
  runs = str(tmp_path / "runs")
  lines = []
  entries = sweep.run_sweep(specs + [broken], runs, jobs=2, variant="smoke", log=lines.append)
  index = json.loads((tmp_path / "runs" / "index.json").read_text())["runs"]
  assert [e["status"] for e in index] == ["finished", "finished", "failed"] == [e["status"] for e in entries]
  assert index[0]["workdir"] == os.path.join(runs, "default", "fedit", "seed0")
  assert index[0]["final"]["round"] == 2 and 0 <= index[0]["final"]["global_accuracy"] <= 1
  assert "no_such_dataset" in index[2]["error"]
  assert any(l.startswith("[FAILED]") for l in lines)
  lines.clear()
  again = sweep.run_sweep(specs, runs, jobs=2, variant="smoke", log=lines.append)
  assert [e["status"] for e in again] == ["finished", "finished"]
  assert again[0]["final"] == index[0]["final"] and again[0]["seconds"] == index[0]["seconds"]
  assert lines == ["sweep: 2 runs, 2 already finished, 0 to run (2 at a time)"]
  # One index for the runs dir: the failed run of the first sweep is still listed.
  merged = json.loads((tmp_path / "runs" / "index.json").read_text())["runs"]
  assert sorted(e["status"] for e in merged) == ["failed", "finished", "finished"]


def test_two_sweeps_writing_one_index_keep_each_others_entries(tmp_path):
  """Two sweeps on one runs directory keep each other's entries (a sweep writing the index it
  read at its start would show the other's finished run 'pending')."""
  runs_dir = str(tmp_path)
  a = {"workdir": "a", "status": "pending"}
  b = {"workdir": "b", "status": "pending"}
  sweep.write_index(runs_dir, [a])
  sweep.write_index(runs_dir, [b])  # Sweep B started after A's first write.
  sweep.write_index(runs_dir, [{**a, "status": "finished"}])
  sweep.write_index(runs_dir, [{**b, "status": "failed"}])
  assert sweep.read_index(runs_dir) == [{"workdir": "a", "status": "finished"}, {"workdir": "b", "status": "failed"}]


def test_a_benchmark_name_cannot_leave_the_runs_dir():
  spec = sweep.RunSpec("configs/default.py", "fedit", 0)
  for name in ("../x", "/abs/x", "a/../../x", ""):
    with pytest.raises(ValueError, match="benchmark"):
      sweep.workdir_of("runs", name, spec)
  assert sweep.workdir_of("runs", "label_skew/alpha0.1", spec) == "runs/label_skew/alpha0.1/fedit/seed0"


def _spawned_workers(pid: int) -> list[int]:
  """Pids of the multiprocessing workers `pid` spawned (Linux /proc)."""
  children = []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      children += [int(c) for c in f.read().split()]
  workers = []
  for child in children:
    try:
      with open(f"/proc/{child}/cmdline", "rb") as f:
        if b"spawn_main" in f.read():
          workers.append(child)
    except FileNotFoundError:
      pass
  return workers


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return "\nState:\tZ" not in f.read()  # A zombie has exited.
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads worker pids from Linux /proc")
def test_sweep_workers_die_when_the_sweep_is_killed(tmp_path, cache_dirs):
  """kill -9 of a sweep takes its workers with it (none left running queued runs)."""
  import signal
  import subprocess
  import sys
  import time

  command = [
    sys.executable,
    "-m",
    "experiments.sweep",
    f"--runs_dir={tmp_path}",
    "--jobs=2",
    "--seeds=0",
    "--methods=fedit,flexlora,ffa_lora",
    "--variant=smoke,rounds=100000",
    f"--set=data.data_dir={cache_dirs['data_dir']}",
    f"--set=pretrain.cache_dir={cache_dirs['cache_dir']}",
  ]
  sweep_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
  try:
    deadline = time.time() + 240
    workers = []
    while len(workers) < 2 and time.time() < deadline and sweep_process.poll() is None:
      time.sleep(1)
      workers = _spawned_workers(sweep_process.pid)
    assert len(workers) == 2, "the sweep never started its two workers"
    time.sleep(3)  # Inside their runs.
    assert all(_alive(w) for w in workers)
    sweep_process.send_signal(signal.SIGKILL)
    sweep_process.wait()
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
      time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived its sweep"
  finally:
    sweep_process.kill()
    for pid in _spawned_workers(sweep_process.pid) if _alive(sweep_process.pid) else []:
      os.kill(pid, signal.SIGKILL)


def test_reliability_table_groups_by_active_fault_settings_and_sums_what_was_detected(tmp_path):
  from experiments.reports import reliability_table

  defaults = {
    "faults": {"byzantine": 0.0, "byzantine_scale": 1.0, "dropout": 0.0},
    "robust": {"rule": "mean", "trim": 0.1},
    "dp": {"noise_multiplier": 0.0},
  }
  for seed, acc in ((0, 0.30), (1, 0.34)):
    path = tmp_path / f"byz{seed}"
    os.makedirs(path)
    config = {
      "method": "fedit",
      "seed": seed,
      "fed": {"num_rounds": 2},
      "faults": {"byzantine": 0.1, "byzantine_scale": 10.0, "dropout": 0.0},
      "robust": {"rule": "trimmed_mean", "trim": 0.3},
      "dp": {"noise_multiplier": 0.0},
    }
    (path / "config.json").write_text(json.dumps(config))
    rows = [
      {
        "round": r,
        "faults_byzantine": 1,
        "nonfinite_clients": r - 1,
        "global_accuracy": acc,
        "personalized_accuracy_mean": 0.5,
      }
      for r in (1, 2)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  summaries = [reliability_table.summarize_run(str(tmp_path / f"byz{s}"), defaults) for s in (0, 1)]
  assert summaries[0]["setting"] == (
    "faults.byzantine=0.1, faults.byzantine_scale=10.0, robust.rule=trimmed_mean, robust.trim=0.3"
  )
  config = {"faults": {"byzantine": 0.0, "byzantine_scale": 10.0}, "robust": {"rule": "median", "trim": 0.3}}
  assert reliability_table._setting(config, defaults) == "robust.rule=median"  # Inert fields left out.
  private = {
    "dp": {"noise_multiplier": 0.0, "signature_noise_multiplier": 2.0},
    "hyperlora": {"synthesizer": "uniform", "generator": True},
  }
  hyperlora_defaults = {**defaults, "hyperlora": {"synthesizer": "learned", "generator": True}}
  assert reliability_table._setting(private, hyperlora_defaults) == "hyperlora.synthesizer=uniform"
  assert summaries[0]["faults_byzantine"] == 2 and summaries[0]["nonfinite_clients"] == 1
  table = reliability_table.markdown_table(summaries)
  assert (
    "| faults.byzantine=0.1, faults.byzantine_scale=10.0, robust.rule=trimmed_mean, robust.trim=0.3 | fedit | 2 | "
    "32.0 ± 2.0 | 50.0 ± 0.0 | byzantine 2 | nonfinite_clients 1 | – |"
  ) in table


def test_a_workdir_holding_another_configs_run_is_refused_not_counted_as_finished(tmp_path, cache_dirs):
  """Fixed --set overrides are not in a workdir's path: a sweep with a different --set refuses
  a workdir holding the other config's run instead of counting it as its own finished run."""
  fixed = (
    f"data.data_dir={cache_dirs['data_dir']}",
    f"pretrain.cache_dir={cache_dirs['cache_dir']}",
    "fed.num_rounds=1",
  )
  runs, lines = str(tmp_path / "runs"), []
  specs = sweep.expand(["configs/default.py"], ["fedit"], [0], list(fixed), [])
  assert [e["status"] for e in sweep.run_sweep(specs, runs, variant="smoke", log=lines.append)] == ["finished"]
  other = sweep.expand(["configs/default.py"], ["fedit"], [0], list(fixed) + ["robust.clip_norm=1.0"], [])
  entries = sweep.run_sweep(other, runs, variant="smoke", log=lines.append)
  assert entries[0]["status"] == "failed" and "robust.clip_norm" in entries[0]["error"]
  assert lines[-1].endswith("1 refused: their workdirs hold another config's run")
  assert (
    json.loads((tmp_path / "runs" / "default" / "fedit" / "seed0" / "config.json").read_text())["robust"]["clip_norm"]
    == 0.0
  )  # Untouched.


def _diagnosed_run(path, method, seed, bias):
  _fake_run(path, method, seed, 0.5)
  lines = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for record in lines:
      record.update(
        aggregation_bias=bias * record["round"], aggregation_bias_per_layer={"q": bias}, client_drift=1.0, init_lag=0.1
      )
      f.write(json.dumps(record) + "\n")


def test_report_tabulates_and_plots_the_diagnostics_when_runs_have_them(tmp_path):
  runs = tmp_path / "runs"
  _diagnosed_run(runs / "fedit" / "seed0", "fedit", 0, 0.2)
  _diagnosed_run(runs / "fedit" / "seed1", "fedit", 1, 0.4)
  _fake_run(runs / "flora" / "seed0", "flora", 0, 0.5)  # Recorded before diagnostics existed.
  text = report.build_report(str(runs))
  # Bias = b × round over rounds 1-3: mean 2b per seed, so 0.4 and 0.8 → 0.6 ± 0.2.
  assert "| fedit | 0.6 ± 0.2 | 1 ± 0 | 0.1 ± 0 |" in text
  assert "| flora | – | – | – |" in text
  png = runs / "plots" / "default__diagnostics.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "default__diagnostics.png)" in text
  assert "diagnostics" not in report.build_report(str(runs / "flora"))  # None recorded: no section.


def test_data_scarcity_table_finds_where_federated_methods_overtake_local_only(tmp_path):
  from experiments.reports import data_scarcity

  pers = {"local_only": {8: 0.30, 64: 0.70, 0: 0.80}, "fedit": {8: 0.50, 64: 0.60, 0: 0.65}}
  for method, curve in pers.items():
    for cap, acc in curve.items():
      for seed, shift in ((0, -0.01), (1, 0.01)):
        path = tmp_path / method / f"cap{cap}" / f"seed{seed}"
        _fake_run(path, method, seed, 0.4)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "data": {"max_client_examples": cap}}))
        lines = [json.loads(line) for line in open(path / "metrics.jsonl")]
        lines[-1]["personalized_accuracy_mean"] = acc + shift
        lines[-1]["init_lag"] = 0.5 + shift
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  out = tmp_path / "scarcity.md"
  data_scarcity.main([str(tmp_path), "--out", str(out)])
  text = out.read_text()
  assert "| method | 8 | 64 | all |" in text
  assert "| fedit | 50.0 ± 1.0 | 60.0 ± 1.0 | 65.0 ± 1.0 |" in text
  assert "| local_only | 30.0 ± 1.0 | 70.0 ± 1.0 | 80.0 ± 1.0 |" in text
  assert "- fedit: above at 8; local-only ahead at 64, all" in text
  assert "| fedit | 8 | – | – | 0.5 ± 0.01 |" in text  # Diagnostics: only init_lag was recorded.
  assert (tmp_path / "scarcity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bias_settings_groups_by_grid_values_and_sorts_by_mean_bias(tmp_path):
  from experiments.reports import bias_settings

  entries = []
  for setting, biases, seed in (
    ("lora.rank=16", (0.3, 0.1), 0),
    ("lora.rank=16", (0.5, 0.3), 1),
    ("lora.rank=2", (0.02, 0.02), 0),
  ):
    workdir = tmp_path / "default" / "fedit" / setting / f"seed{seed}"
    os.makedirs(workdir)
    rows = [{"round": r + 1, "aggregation_bias": b, "client_drift": 2.0} for r, b in enumerate(biases)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries.append(
      {
        "workdir": str(workdir),
        "method": "fedit",
        "status": "finished",
        "final": {"global_accuracy": 0.25 + 0.1 * seed, "personalized_accuracy_mean": 0.5},
      }
    )
  entries.append({"workdir": str(tmp_path / "x"), "method": "fedit", "status": "failed"})
  assert bias_settings.setting_of(str(tmp_path / "default" / "fedit" / "seed0"), "fedit") == "default"
  table = bias_settings.bias_table([r for r in map(bias_settings.run_row, entries) if r])
  lines = table.splitlines()
  # Mean over rounds then over seeds: (0.2 + 0.4) / 2 = 0.3 ± 0.1; round 1: 0.4 ± 0.1; last: 0.2 ± 0.1.
  assert lines[2] == "| lora.rank=16 | fedit | 2 | 0.3 ± 0.1 | 0.4 ± 0.1 | 0.2 ± 0.1 | 2 ± 0 | 30 ± 5 | 50 ± 0 |"
  assert lines[3].startswith("| lora.rank=2 | fedit | 1 | 0.02 ± 0 |")
  extra = bias_settings.bias_table(
    [bias_settings.run_row(e, ("client_drift", "missing")) for e in entries[:1]], ("client_drift", "missing")
  )
  assert extra.splitlines()[2].endswith("| 2 ± 0 | – |")  # An added round mean, and one no run has.


def test_claims_table_counts_rounds_to_target_and_gains_by_hand():
  from experiments.reports import claims

  def run(method, seed, curve, pers, **extra):
    records = [
      {"round": 5 * (i + 1), "global_accuracy": g, "personalized_accuracy_mean": p}
      for i, (g, p) in enumerate(zip(curve, pers))
    ]
    return {
      "benchmark": "b",
      "method": method,
      "seed": seed,
      "rounds": records[-1]["round"],
      "global": curve[-1],
      "pers_mean": pers[-1],
      "records": records,
      **extra,
    }

  rows = [
    run(
      "hyperlora",
      0,
      [0.2, 0.31, 0.32],
      [0.3, 0.4, 0.50],
      new_client_generated=0.4,
      new_client_global=0.3,
      new_client_generated_finetuned=0.5,
    ),
    run(
      "hyperlora",
      1,
      [0.31, 0.32, 0.33],
      [0.3, 0.4, 0.48],
      new_client_generated=0.41,
      new_client_global=0.3,
      new_client_generated_finetuned=0.5,
    ),
    run("fedit", 0, [0.1, 0.2, 0.31], [0.1, 0.2, 0.30], new_client_global=0.2, new_client_global_finetuned=0.6),
    run("fedit", 1, [0.1, 0.31, 0.32], [0.1, 0.2, 0.32], new_client_global=0.3, new_client_global_finetuned=0.6),
    run("centralized", 0, [0.3, 0.4, 0.40], [0.3, 0.4, 0.4]),
    run("local_only", 0, [0.0, 0.0, 0.0], [0.4, 0.45, 0.49]),
  ]
  table = claims.claims_table(rows, "hyperlora", "fedit", [0.3], [0.9], 0.3).splitlines()
  # Rounds to 30% global: hyperlora 10 and 5 (7.5), fedit 15 and 10 (12.5): speed-up 1 − 7.5/12.5 = 40%.
  assert (
    "| 30% faster convergence (global) | b | hyperlora vs fedit, rounds until global ≥ 30%, 15 rounds | "
    "7.5 ± 2.5 vs 12.5 ± 2.5 rounds (speed-up 40%) | confirmed |"
  ) in table
  # 90% of centralized (0.36): nobody's global curve gets there.
  assert any(
    "rounds until global ≥ 90% of centralized's global (36.0%)" in line and line.endswith("| not reached |")
    for line in table
  )
  # Personalized 49 ± 1 vs FedIT 31 ± 1: +18 points (+58%), above the pooled std.
  assert (
    "| personalization gain (up to 20%) | b | hyperlora vs fedit, final personalized mean | "
    "49.0 ± 1.0 vs 31.0 ± 1.0: +18.0 points (+58%) | confirmed |"
  ) in table
  assert any(
    "hyperlora vs local_only" in line and "+0.0 points" in line and line.endswith("not confirmed |") for line in table
  )
  assert any("generated start vs global" in line and "+10.5 points" in line for line in table)
  # Against FedIT's global: 40.5 ± 0.5 vs 25 ± 5 at 0 steps (+15.5), 50 vs 60 fine-tuned (−10).
  assert (
    "| new clients served by the generator | b | hyperlora's generated start vs fedit's global, 0 local steps | "
    "40.5 ± 0.5 vs 25.0 ± 5.0: +15.5 points (+62%) | confirmed |"
  ) in table
  assert any(
    "both fine-tuned" in line and "-10.0 points" in line and line.endswith("| not confirmed |") for line in table
  )
  assert table[-1].endswith("| – | not measured |")


def test_shift_claim_compares_drops_from_mildest_to_most_severe_by_hand(tmp_path):
  from experiments.reports import claims

  # (method, alpha, seed, global, personalized): HyperLoRA's global drops 5 points from α = 1 to
  # α = 0.1, FedIT's 20; personalized, HyperLoRA drops 30 and FedIT 0.
  runs = [
    ("hyperlora", 1.0, 0, 0.5, 0.6),
    ("hyperlora", 1.0, 1, 0.6, 0.7),
    ("hyperlora", 0.1, 0, 0.45, 0.3),
    ("hyperlora", 0.1, 1, 0.55, 0.4),
    ("hyperlora", 0.5, 0, 0.9, 0.9),
    ("fedit", 1.0, 0, 0.5, 0.5),
    ("fedit", 1.0, 1, 0.6, 0.6),
    ("fedit", 0.1, 0, 0.3, 0.5),
    ("fedit", 0.1, 1, 0.4, 0.6),
  ]
  for method, alpha, seed, glob, pers in runs:
    workdir = tmp_path / f"{method}_{alpha}_{seed}"
    os.makedirs(workdir)
    config = {
      "benchmark": "default",
      "method": method,
      "seed": seed,
      "fed": {"num_rounds": 5},
      "data": {"dirichlet_alpha": alpha},
    }
    (workdir / "config.json").write_text(json.dumps(config))
    record = {
      "round": 5,
      "global_accuracy": glob,
      "personalized_accuracy_mean": pers,
      "personalized_accuracy_worst": pers,
      "cum_bytes": 0,
    }
    (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  os.makedirs(tmp_path / "unfinished")
  (tmp_path / "unfinished" / "config.json").write_text(json.dumps({**config, "fed": {"num_rounds": 9}}))
  (tmp_path / "unfinished" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  rows = claims.shift_rows(str(tmp_path), "data.dirichlet_alpha")
  assert len(rows) == len(runs) and {r["severity"] for r in rows} == {1.0, 0.5, 0.1}
  lines = claims.shift_claim(rows, "hyperlora", "fedit", "data.dirichlet_alpha", severe_when_lower=True)
  assert [line.split(" | ")[2].split(":")[0] for line in lines[:3]] == [
    "data.dirichlet_alpha=1.0",
    "data.dirichlet_alpha=0.5",
    "data.dirichlet_alpha=0.1",
  ]
  assert "50.0 ± 5.0 vs 35.0 ± 5.0: +15.0 points" in lines[2]
  assert "n/a" in lines[1]  # No FedIT run at α = 0.5.
  assert lines[3] == (
    "| robustness to shift (global) | default | drop from data.dirichlet_alpha=1.0 to 0.1 | "
    "hyperlora -5.0 vs fedit -20.0 points (pooled std 5.0) | confirmed |"
  )
  assert lines[7].endswith("hyperlora -30.0 vs fedit +0.0 points (pooled std 5.0) | not confirmed |")
  assert claims.shift_claim([], "hyperlora", "fedit", "data.dirichlet_alpha", True)[0].endswith("| not measured |")
  table = claims.claims_table(rows, "hyperlora", "fedit", [0.3], [], 0.3, lines)
  assert "not measured |" not in table.splitlines()[-1] and table.endswith(lines[-1])


def test_plateau_table_takes_the_change_over_the_last_window_by_hand():
  from experiments.reports import claims

  records = lambda glob, pers: [
    {"round": 5 * (i + 1), "global_accuracy": g, "personalized_accuracy_mean": p}
    for i, (g, p) in enumerate(zip(glob, pers))
  ]
  # Window 10 at rounds 5..20: the change is the value at 20 minus the value at 10.
  assert claims.accuracy_change(records([0.1, 0.2, 0.3, 0.5], [0, 0, 0, 0]), "global_accuracy", 10) == 0.5 - 0.2
  assert claims.accuracy_change(records([0.1], [0.1]), "global_accuracy", 10) is None  # Too short.
  rows = [
    {"benchmark": "b", "method": "fedit", "records": records([0.1, 0.2, 0.3, 0.26], [0.1, 0.2, 0.3, 0.3])},
    {"benchmark": "b", "method": "fedit", "records": records([0.1, 0.2, 0.3, 0.28], [0.1, 0.2, 0.3, 0.3])},
    {
      "benchmark": "b",
      "method": "local_only",
      "records": [
        {"round": r["round"], "personalized_accuracy_mean": r["personalized_accuracy_mean"]}
        for r in records([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.5])
      ],
    },
  ]
  lines = claims.plateau_table(rows, 10, 0.01).splitlines()
  # FedIT: global +6 and +8 (+7.0 ± 1.0), personalized +10 on both: not flat. Local-only: +30.
  assert lines[2] == "| b | fedit | +7.0 ± 1.0 | +10.0 ± 0.0 | no |"
  assert lines[3] == "| b | local_only | – | +30.0 ± 0.0 | no |"
  flat = [{**rows[0], "records": records([0.3, 0.3, 0.305, 0.3], [0.3, 0.3, 0.3, 0.2])}]
  assert claims.plateau_table(flat, 10, 0.01).splitlines()[2] == "| b | fedit | +0.0 ± 0.0 | -10.0 ± 0.0 | yes |"


def test_tuning_picks_each_methods_best_validation_setting_and_tabulates_the_test_runs():
  from experiments.studies import tune

  lr = "client_optimizer.learning_rate"

  def entry(method, overrides, pers, status="finished", glob=0.3):
    return {
      "method": method,
      "overrides": ["data.validation_fraction=0.2", *overrides],
      "status": status,
      "final": {"personalized_accuracy_mean": pers, "global_accuracy": glob},
    }

  validation = [
    entry("fedit", [f"{lr}=1e-3"], 0.30),
    entry("fedit", [f"{lr}=1e-2"], 0.36),
    entry("fedit", [f"{lr}=3e-2"], 0.90, status="failed"),  # Not finished: not a candidate.
    entry("hyperlora", [f"{lr}=3e-3", "generator.optimizer.learning_rate=1e-3"], 0.40),
    entry("hyperlora", [f"{lr}=3e-3", "generator.optimizer.learning_rate=1e-2"], 0.44),
  ]
  scores = {m: tune.validation_scores(validation, m, "personalized_accuracy_mean") for m in ("fedit", "hyperlora")}
  assert scores["fedit"] == {(f"{lr}=1e-3",): [0.30], (f"{lr}=1e-2",): [0.36]}
  picks = {m: tune.pick(s) for m, s in scores.items()}
  assert picks == {"fedit": (f"{lr}=1e-2",), "hyperlora": (f"{lr}=3e-3", "generator.optimizer.learning_rate=1e-2")}
  test = [entry("fedit", [f"{lr}=1e-2"], 0.35, glob=g) for g in (0.30, 0.34)]
  table = tune.tuning_table(scores, picks, test, "personalized_accuracy_mean")
  assert f"| fedit | {lr}=1e-2: 36.0 ± 0.0; {lr}=1e-3: 30.0 ± 0.0 | {lr}=1e-2 | 32.0 ± 2.0 | 35.0 ± 0.0 | 2 |" in table
  assert table.splitlines()[-1].endswith("| – | – | 0 |")  # HyperLoRA's test runs are not in yet.
  with pytest.raises(ValueError, match="no finished"):
    tune.pick({})


def test_tune_grid_flag_replaces_only_the_named_methods_grids():
  from experiments.studies import tune

  grids = tune.grids_with_overrides(
    ["hyperlora:client_optimizer.learning_rate=1e-3,3e-3", "hyperlora:generator.optimizer.learning_rate=1e-4"]
  )
  assert grids["hyperlora"] == ("client_optimizer.learning_rate=1e-3,3e-3", "generator.optimizer.learning_rate=1e-4")
  assert grids["fedit"] == tune.GRIDS["fedit"] and grids["pfedhn"] == tune.GRIDS["pfedhn"]
  for bad in ("client_optimizer.learning_rate=1e-3", "fedit:client_optimizer.learning_rate", "fedit:lr="):
    with pytest.raises(ValueError, match="expected METHOD:FIELD=V1,V2"):
      tune.grids_with_overrides([bad])
  # Scores are keyed by the replaced grid's fields: a fixed knob stays part of the setting.
  entries = [
    {
      "method": "hyperlora",
      "status": "finished",
      "final": {"personalized_accuracy_mean": 0.5},
      "overrides": [
        "data.validation_fraction=0.2",
        "client_optimizer.learning_rate=1e-3",
        "generator.optimizer.learning_rate=1e-4",
      ],
    }
  ]
  assert tune.validation_scores(entries, "hyperlora", "personalized_accuracy_mean", grids["hyperlora"]) == {
    ("client_optimizer.learning_rate=1e-3", "generator.optimizer.learning_rate=1e-4"): [0.5]
  }


def test_tune_links_a_test_run_to_a_finished_run_of_the_same_config_and_nothing_else(tmp_path):
  """`--reuse`: only a finished run whose recorded config equals the spec's stands in for it."""
  from experiments.studies import tune
  from experiments.runner import methods
  from experiments.runner.config_validation import used_config

  def recorded_run(path, spec, rounds):
    config = sweep.make_config(spec)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(used_config(config, methods.METHOD_BLOCKS)))
    (path / "metrics.jsonl").write_text(
      "".join(
        json.dumps(
          {
            "round": r,
            "personalized_accuracy_mean": 0.5,
            "personalized_accuracy_worst": 0.4,
            "global_accuracy": 0.3,
            "cum_bytes": 1.0,
          }
        )
        + "\n"
        for r in range(1, rounds + 1)
      )
    )

  fixed = ["fed.num_rounds=4"]
  (default_lr,) = sweep.expand(
    ["configs/default.py"], ["fedit"], [0], fixed + ["client_optimizer.learning_rate=3e-3"], []
  )
  (other_lr,) = sweep.expand(
    ["configs/default.py"], ["fedit"], [1], fixed + ["client_optimizer.learning_rate=1e-2"], []
  )
  (unfinished,) = sweep.expand(
    ["configs/default.py"], ["fedit"], [2], fixed + ["client_optimizer.learning_rate=3e-3"], []
  )
  old = tmp_path / "old"
  recorded_run(old / "a" / "seed0", sweep.RunSpec("configs/default.py", "fedit", 0, tuple(fixed)), rounds=4)
  recorded_run(old / "b" / "seed1", sweep.RunSpec("configs/default.py", "fedit", 1, tuple(fixed)), rounds=4)
  recorded_run(old / "c" / "seed2", sweep.RunSpec("configs/default.py", "fedit", 2, tuple(fixed)), rounds=3)
  test_dir = str(tmp_path / "test")
  lines = []
  assert tune.link_finished_twins([default_lr, other_lr, unfinished], test_dir, [str(old)], log=lines.append) == 1
  linked = tmp_path / "test" / "default" / "fedit" / "seed0"
  assert linked.is_symlink() and os.path.realpath(linked) == str(old / "a" / "seed0")
  assert not (tmp_path / "test" / "default" / "fedit" / "seed1").exists()  # lr 1e-2 was never run.
  assert not (tmp_path / "test" / "default" / "fedit" / "seed2").exists()  # Its twin stopped at round 3.
  assert tune.link_finished_twins([default_lr], test_dir, [str(old)], log=lines.append) == 0  # Already there.
  # The sweep counts the linked run as finished without running it.
  (entry,) = sweep.run_sweep([default_lr], test_dir, log=lines.append)
  assert entry["status"] == "finished" and entry["final"]["round"] == 4


def _final_run(path, method, seed, glob, pers, mb, benchmark="default", rounds=2, perplexity=None):
  """A finished run whose last record has these accuracies (round 1 at half of them); a text
  run's with `perplexity` = (global, personalized mean) (round 1 at twice them)."""
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"benchmark": benchmark, "method": method, "seed": seed, "fed": {"num_rounds": rounds}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in range(1, rounds + 1):
      text = (
        {}
        if perplexity is None
        else {
          "global_perplexity": perplexity[0] * rounds / r,
          "personalized_perplexity_mean": perplexity[1] * rounds / r,
        }
      )
      f.write(
        json.dumps(
          {
            "round": r,
            "global_accuracy": None if glob is None else glob * r / rounds,
            "personalized_accuracy_mean": pers * r / rounds,
            "personalized_accuracy_worst": 0.1,
            "cum_bytes": mb * 1e6 * r / rounds,
            **text,
          }
        )
        + "\n"
      )


def test_results_page_tabulates_every_method_and_variant_by_hand_and_tests_the_variants_claims(tmp_path):
  from experiments.reports import results_page

  runs, slow = tmp_path / "converge", tmp_path / "slow"
  for seed, (g, p) in enumerate([(0.40, 0.42), (0.50, 0.46)]):
    _final_run(runs / "fedit" / f"s{seed}", "fedit", seed, g, p, 3.0)
    _final_run(runs / "hyperlora" / f"s{seed}", "hyperlora", seed, 0.30, 0.50 + 0.1 * seed, 6.0)
    _final_run(slow / "hyperlora" / f"s{seed}", "hyperlora", seed, 0.45, 0.70 + 0.1 * seed, 6.0)
    _final_run(runs / "local_only" / f"s{seed}", "local_only", seed, None, 0.60, 0.0)
    _final_run(runs / "centralized" / f"s{seed}", "centralized", seed, 0.90, 0.90, 0.0)
  _final_run(runs / "fedit" / "other", "fedit", 0, 0.1, 0.1, 3.0, benchmark="label_skew/alpha0.1")
  page = results_page.build_page(
    str(runs),
    [("HyperLoRA", str(slow))],
    {"hyperlora": "HyperLoRA, default generator"},
    claims_row="HyperLoRA",
    targets=(0.4,),
  )
  default = page[page.index("### default") : page.index("### label_skew")]
  lines = [line for line in default.splitlines() if line.startswith("| ") and "---" not in line][1:]
  # METHODS order (fedit, local_only, centralized, hyperlora), the variant just before its method;
  # FedIT: global 40, 50 -> 45.0 ± 5.0; personalized 42, 46 -> 44.0 ± 2.0. Best federated personalized:
  # the variant (70, 80 -> 75.0 ± 5.0), bold; centralized (90) is a reference and never bold.
  assert lines == [
    "| FedIT | 2 | 45.0 ± 5.0 | 44.0 ± 2.0 | 3.00 |",
    "| local-only | 2 | – | 60.0 ± 0.0 | 0.00 |",
    "| centralized (reference) | 2 | 90.0 ± 0.0 | 90.0 ± 0.0 | 0.00 |",
    "| HyperLoRA | 2 | 45.0 ± 0.0 | **75.0 ± 5.0** | 6.00 |",
    "| HyperLoRA, default generator | 2 | 30.0 ± 0.0 | 55.0 ± 5.0 | 6.00 |",
  ]
  assert "### label_skew/alpha0.1 (2 rounds)" in page and "| FedIT | 1 | 10.0 | **10.0** | 3.00 |" in page
  claims_part = page[page.index("### The paper's claims") :]
  # Claims read the variant's runs: personalized 75 vs FedIT's 44 -> +70%; vs local-only 60 -> +25%.
  assert (
    "| personalization gain (up to 20%) | default | hyperlora vs fedit, final personalized mean | "
    "75.0 ± 5.0 vs 44.0 ± 2.0: +31.0 points (+70%) | confirmed |" in claims_part
  )
  assert (
    "hyperlora vs local_only, final personalized mean | 75.0 ± 5.0 vs 60.0 ± 0.0: +15.0 points (+25%) | "
    "confirmed |" in claims_part
  )
  with pytest.raises(ValueError, match="no such row"):
    results_page.build_page(str(runs), claims_row="HyperLoRA, slow")


def test_results_page_adds_a_text_benchmarks_last_perplexities_by_hand(tmp_path):
  """A text benchmark's table has the last round's global and personalized perplexities, mean ±
  std over seeds, the lowest personalized one of the federated rows bold; local-only has no
  global model; an image benchmark's table beside it has no perplexity columns."""
  from experiments.reports import results_page

  runs = tmp_path / "runs"
  for seed, (fedit, local) in enumerate([((300, 360), 250), ((280, 340), 270)]):
    _final_run(runs / "fedit" / f"s{seed}", "fedit", seed, 0.15, 0.14, 1.7, "instruction_tuning", perplexity=fedit)
    _final_run(
      runs / "local_only" / f"s{seed}",
      "local_only",
      seed,
      None,
      0.2,
      0.0,
      "instruction_tuning",
      perplexity=(1e9, local),
    )
  _final_run(runs / "fedit" / "image", "fedit", 0, 0.4, 0.4, 3.0)
  page = results_page.build_page(str(runs))
  text = page[page.index("### instruction_tuning") :]
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  # FedIT's last records: global 300, 280 -> 290 ± 10; personalized 360, 340 -> 350 ± 10;
  # local-only's 250, 270 -> 260 ± 10, the lowest: bold (as its 20% accuracy, the best).
  assert lines == [
    "| method | seeds | global % | personalized % | global perplexity | personalized perplexity | MB up+down |",
    "| FedIT | 2 | 15.0 ± 0.0 | 14.0 ± 0.0 | 290 ± 10 | 350 ± 10 | 1.70 |",
    "| local-only | 2 | – | **20.0 ± 0.0** | – | **260 ± 10** | 0.00 |",
  ]
  assert "| method | seeds | global % | personalized % | MB up+down |" in page[: page.index("### instruction_tuning")]


def test_results_page_majority_label_reads_the_runs_own_data(smoke_config):
  """The majority-label row rebuilt from a run's recorded config is label_prior's on that config."""
  from experiments.studies import label_prior
  from experiments.reports import results_page

  smoke_config.data.dirichlet_alpha = 0.1
  expected = np.nanmean(label_prior.majority_label_accuracy(*_labels_and_parts(smoke_config)))
  assert results_page.majority_label_accuracy(json.loads(smoke_config.to_json())) == pytest.approx(expected)
  assert 0.2 < expected < 1.0  # Strong label skew: far above chance (1/10).


def _labels_and_parts(config):
  from experiments.runner.federated_data import build_federated_data
  from experiments.runner.settings import data_block

  data = build_federated_data(data_block(config), config.seed, config.eval_batch)
  return data.train_pool.labels, data.test_pool.labels, data.train_parts, data.test_parts
