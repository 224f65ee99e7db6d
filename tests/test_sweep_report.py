"""Sweep config building and the report's mean ± std table."""
import json
import os

import pytest

from experiments import report, sweep


def _fake_run(path, method, seed, global_acc, rounds=3, new_client=None):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"method": method, "seed": seed, "fed": {"num_rounds": rounds}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in range(1, rounds + 1):
      record = {"round": r, "global_accuracy": global_acc * r / rounds, "personalized_accuracy_mean": 0.5,
                "personalized_accuracy_worst": 0.25, "cum_bytes": 2e6 * r}
      if new_client is not None and r == rounds:
        record["new_client_global"] = new_client
      f.write(json.dumps(record) + "\n")


def test_report_aggregates_seeds(tmp_path):
  _fake_run(tmp_path / "fedit" / "seed0", "fedit", 0, 0.4, new_client=0.2)
  _fake_run(tmp_path / "fedit" / "seed1", "fedit", 1, 0.6, new_client=0.4)
  _fake_run(tmp_path / "flora" / "seed0", "flora", 0, 0.9)
  os.makedirs(tmp_path / "unfinished")
  _fake_run(tmp_path / "unfinished" / "x", "flexlora", 0, 0.9, rounds=3)
  with open(tmp_path / "unfinished" / "x" / "config.json", "w") as f:
    json.dump({"method": "flexlora", "seed": 0, "fed": {"num_rounds": 10}}, f)
  rows = [m for m in map(report.final_metrics, report.find_runs(str(tmp_path))) if m]
  table = report.markdown_table(rows, reference="fedit")
  # Reference: fedit's final global accuracy with the same seed (seed 0: 40%). Curves are
  # acc * round / 3, so flora (90% at round 3) passes 40% at round 2.
  assert "| rounds to fedit's final global |" in table
  assert "| fedit | 2 | 50.0 ± 10.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 6.00 | 3.0 ± 0.0 (2/2) |" in table
  assert "| flora | 1 | 90.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 6.00 | 2.0 ± 0.0 (1/1) |" in table
  assert "| fedit | 30.0 ± 10.0 |" in table and "| flora | n/a |" in table  # New clients.
  assert "flexlora" not in table  # Unfinished runs are left out.


def test_sweep_overrides_are_typed_and_checked():
  config = sweep.make_config("flexlora", 2, ["fed.num_rounds=7", "data.partition=k_classes_per_client"], "smoke")
  assert (config.method, config.seed, config.fed.num_rounds) == ("flexlora", 2, 7)
  assert config.data.partition == "k_classes_per_client" and config.model.width == 16
  with pytest.raises(ValueError, match="fed.no_such_field"):
    sweep.make_config("fedit", 0, ["fed.no_such_field=1"])
