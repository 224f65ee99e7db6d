"""Two processes on localhost (gloo collectives) run one experiment: the same metrics as one
process with two devices, files written once, and a resume across processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from tests.cpu_devices import cpu_devices_env

from tests.repo_paths import ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(cache_dirs, workdir, rounds, extra=()):
  return [
    sys.executable,
    "-m",
    "experiments.main",
    "--config",
    "configs/default.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={cache_dirs['data_dir']}",
    f"--config.pretrain.cache_dir={cache_dirs['cache_dir']}",
    f"--config.fed.num_rounds={rounds}",
    "--config.checkpoint_every=2",
    *extra,
  ]


def _env(devices):
  return cpu_devices_env(devices)


def _run_two_processes(cache_dirs, workdir, rounds, command=_command):
  port = _free_port()
  procs = [
    subprocess.Popen(
      command(
        cache_dirs, workdir, rounds, (f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
      ),
      cwd=ROOT,
      env=_env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _assert_same_records(expected, got):
  """Nested records (per-layer diagnostics) compared leaf by leaf."""
  assert [r["round"] for r in got] == [r["round"] for r in expected]
  for want, have in zip(expected, got):
    want, have = traverse_util.flatten_dict(want, sep="/"), traverse_util.flatten_dict(have, sep="/")
    assert set(want) == set(have)
    for key, value in want.items():
      np.testing.assert_allclose(have[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices_and_resume(cache_dirs, tmp_path):
  single = tmp_path / "single"
  out = subprocess.run(
    _command(cache_dirs, single, 3), cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  multi = tmp_path / "multi"
  first = _run_two_processes(cache_dirs, multi, 2)
  assert "global accuracy" in first[0] and "global accuracy" not in first[1]  # Process 0 reports.
  assert len(_metrics(multi)) == 2  # Written once.
  second = _run_two_processes(cache_dirs, multi, 3)  # Resumes from round 2.
  assert "resumed from round 2" in second[0]
  expected, got = _metrics(single), _metrics(multi)
  assert [r["round"] for r in got] == [1, 2, 3]
  _assert_same_records(expected, got)


@pytest.mark.slow
def test_a_streamed_text_run_in_two_processes_matches_one_process_with_two_devices(cache_dirs, tmp_path):
  """A FedIT text run (the fixture Llama, a Dolly file, 3 clients padded to 4 over the clients
  axis) in two processes of one device each, the token rows streamed and each process reading
  only its clients': the records of one process with two devices holding them in memory.
  Process 0 tokenizes the records (before the others read them) and reports."""
  from test_text_runs import LLAMA, _dolly_file

  dolly = _dolly_file(tmp_path / "dolly.jsonl")

  def command(cache_dirs, workdir, rounds, extra=()):
    return [
      sys.executable,
      "-m",
      "experiments.main",
      "--config",
      f"configs/instruction_tuning.py:smoke,method=fedit,checkpoint={LLAMA},data={dolly}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={tmp_path / 'tokenized'}",
      f"--config.pretrain.cache_dir={cache_dirs['cache_dir']}",
      f"--config.fed.num_rounds={rounds}",
      "--config.data.num_clients=3",
      "--config.fed.clients_per_round=3",
      "--config.data.max_len=160",
      *extra,
    ]

  multi = tmp_path / "multi"
  outputs = _run_two_processes(cache_dirs, multi, 2, lambda *a: command(*a) + ["--config.data.stream=True"])
  assert "global accuracy" in outputs[0] and "global accuracy" not in outputs[1]
  assert "data: tokenized 24 records" in outputs[0] and "(streamed)" in outputs[0]
  assert len(os.listdir(tmp_path / "tokenized")) == 1  # No partial directory is left.
  single = tmp_path / "single"
  out = subprocess.run(
    command(cache_dirs, single, 2), cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  expected = _metrics(single)
  assert [r["round"] for r in expected] == [1, 2] and "global_perplexity" in expected[-1]
  _assert_same_records(expected, _metrics(multi))
