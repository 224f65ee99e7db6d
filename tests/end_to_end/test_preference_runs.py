"""DPO runs end to end (configs/preference_tuning.py): the fixture Llama on an HH-RLHF file the
test writes, resumed, exported; every method on it."""

import json
import os

import numpy as np
import pytest

from configs import preference_tuning
from experiments.runner import methods, reporting
from experiments.runner.train import train_and_evaluate
from experiments.runner.workdir import recorded_config

from tests.repo_paths import ROOT

LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf_llama")
TOPICS = ("colors", "sums", "towns")


def _hh_file(path):
  """24 HH-RLHF dialogues, 8 per topic (the group field), chosen a right answer, rejected a wrong one."""
  with open(path, "w") as f:
    for i in range(8):
      for topic in TOPICS:
        prompt = f"\n\nHuman: Tell me about {topic} {i}.\n\nAssistant:"
        record = {"chosen": f"{prompt} {topic} {i}.", "rejected": f"{prompt} nothing.", "topic": topic}
        f.write(json.dumps(record) + "\n")
  return str(path)


def _config(tmp_path, cache_dirs, method="fedit", rounds=2):
  config = preference_tuning.get_config(
    f"smoke,method={method},rounds={rounds},checkpoint={LLAMA},layout=hh_rlhf,group=topic,"
    f"data={_hh_file(tmp_path / 'hh.jsonl')}"
  )
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  config.data.num_clients, config.fed.clients_per_round = 3, 3
  config.data.max_len = 96  # The fixture's tokenizer was trained on 9 sentences: long ids.
  config.client_optimizer.learning_rate = 1e-2
  return config


def test_a_dpo_run_learns_the_preference_resumes_and_exports_a_peft_adapter(tmp_path, cache_dirs):
  """FedIT with the DPO loss on the fixture Llama: the held-out preference accuracy starts at 0
  (the adapter is the identity, every margin 0) and rises, the train loss falls below log 2;
  killed after round 2 of 3 and resumed, the records are the straight run's; the workdir's
  config is rebuilt as a preference run's, and `experiments.export` writes its global adapter."""
  from experiments import export

  config = _config(tmp_path, cache_dirs, rounds=3)
  straight = train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  records = straight["records"]
  assert records[-1]["global_accuracy"] > 0.5 and records[-1]["train_loss"] < np.log(2)
  killed = str(tmp_path / "killed")
  train_and_evaluate(config, killed, stop_after_round=2, progress=False)
  train_and_evaluate(config, killed, progress=False)
  assert reporting.read_metrics(killed) == reporting.read_metrics(str(tmp_path / "straight"))
  rebuilt = recorded_config(killed)
  assert rebuilt.task == "preference_tuning" and rebuilt.dpo.beta == config.dpo.beta
  export.main(["--workdir", killed, "--out", str(tmp_path / "adapters")])
  adapter = json.load(open(tmp_path / "adapters" / "global" / "adapter_config.json"))
  assert adapter["task_type"] == "CAUSAL_LM" and adapter["base_model_name_or_path"] == os.path.abspath(LLAMA)


@pytest.mark.slow  # FedIT runs above in make test; HyperLoRA's signatures read the chosen sequences.
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_runs_dpo(method, tmp_path, cache_dirs):
  config = _config(tmp_path, cache_dirs, method=method, rounds=1)
  result = train_and_evaluate(config, str(tmp_path / method), progress=False)
  record = result["records"][-1]
  assert result["round_traces"] == 1 and 0 <= record["personalized_accuracy_mean"] <= 1
  assert np.isfinite(record["train_loss"])
