"""A run's adapters out as PEFT directories: `python -m experiments.export` from a checkpoint, and
`export_every` while a run trains (`experiments/runner/export.py`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import instruction_tuning
from experiments import export as export_cli
from experiments.runner import export as export_lib
from experiments.runner import workdir as workdir_lib
from experiments.runner.train import train_and_evaluate
from hyperlora_jax import lora, peft
from hyperlora_jax.models import hf

from tests.repo_paths import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
EXPORTED = os.path.join(FIXTURES, "hf_llama_export")
TOLERANCE = 1e-5
QUIET = {"progress": False, "log": lambda _: None}


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(want)))


def _logits(adapter, scale, base_delta=None):
  """The project's logits of hf_llama with `adapter` on the fixture's input_ids [B, T, V]."""
  model, variables, _ = hf.load_causal_lm(os.path.join(FIXTURES, "hf_llama"))
  with np.load(os.path.join(FIXTURES, "hf_llama_export_outputs.npz")) as f:
    ids = jnp.asarray(f["input_ids"])
  return np.asarray(lora.apply(model, variables, adapter, ids, jnp.ones_like(ids), scale=scale, base_delta=base_delta))


def _updates(adapter, scale):
  """{path: s a b [d_in, d_out]}: what a layer adds, whatever factors give it (an SVD's signs may flip)."""
  return {p: scale * np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64) for p, f in adapter.items()}


@pytest.mark.parametrize("name", ["global", "client-1"])
def test_the_exported_fixture_attaches_in_peft_from_its_directory_alone(name):
  """The fixture script ran a FedEx-LoRA text run, exported it with the CLI and loaded each
  directory with `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` (base model and task type
  read from adapter_config.json). The project reads the same directory to the reference's logits;
  the folded residuals (rank up to 28 > the run's 16) are written with peft's rank and alpha
  patterns that keep one scale."""
  directory = os.path.join(EXPORTED, name)
  config = json.loads(open(os.path.join(directory, peft.ADAPTER_CONFIG)).read())
  assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tests/fixtures/hf_llama"
  assert config["rank_pattern"] and all(
    config["alpha_pattern"][k] / config["rank_pattern"][k] == config["lora_alpha"] / config["r"]
    for k in config["rank_pattern"]
  )
  adapter, config = peft.load_peft(directory)
  with np.load(os.path.join(FIXTURES, "hf_llama_export_outputs.npz")) as f:
    want, plain = f[name.replace("-", "_")], f["reference_plain"]
  got = _logits(adapter, peft.scale_from_config(config))
  assert _relative_error(got, want) <= TOLERANCE
  assert _relative_error(want, plain) > 1e-2  # The adapter changes the output.


def test_the_cli_exports_a_runs_global_model_with_its_merged_residuals_folded(tmp_path, cache_dirs, capsys):
  """The fixture's run again: the exported global adapter alone gives the project's logits of
  the run's global model on weights carrying the server's residuals (a plain export of the
  rank-16 factors would miss them), and its layers' updates are the fixture's (so the fixture
  is what the CLI writes today); a round the run did not keep and an unknown client are refused
  by name."""
  spec = "smoke,method=fedex_lora,rounds=2,checkpoint=" + os.path.join(FIXTURES, "hf_llama")
  config = instruction_tuning.get_config(spec)
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir, **QUIET)
  out = str(tmp_path / "adapters")
  export_cli.main(["--workdir", workdir, "--clients", "1", "--out", out])
  assert "round 2 of 2" in capsys.readouterr().out
  adapter, adapter_config = peft.load_peft(os.path.join(out, "global"))
  scale = peft.scale_from_config(adapter_config)
  assert adapter_config["base_model_name_or_path"] == os.path.join(FIXTURES, "hf_llama")
  exp, state, done = workdir_lib.restore_run(workdir_lib.recorded_config(workdir), workdir)
  assert done == 2 and set(state.base_delta) == set(adapter)
  run_model = jax.tree.map(np.asarray, exp.fed_round.global_params(state)["lora"])
  with_residuals = _logits(run_model, exp.task.scale, jax.tree.map(np.asarray, dict(state.base_delta)))
  assert _relative_error(_logits(adapter, scale), with_residuals) <= TOLERANCE
  assert _relative_error(_logits(run_model, exp.task.scale), with_residuals) > 1e-3
  fixture, fixture_config = peft.load_peft(os.path.join(EXPORTED, "global"))
  ours, theirs = _updates(adapter, scale), _updates(fixture, peft.scale_from_config(fixture_config))
  for path in theirs:
    assert _relative_error(ours[path], theirs[path]) <= 1e-3, path
  record = export_lib.read_export(os.path.join(out, "client-1"))
  assert record["client"] == 1 and record["round"] == 2 and record["method"] == "fedex_lora"
  assert max(f["relative_error"] for f in record["folded_base_delta"].values()) < 1e-6
  with pytest.raises(SystemExit, match="no checkpoint of round 1; kept: 2"):
    export_cli.main(["--workdir", workdir, "--round", "1"])
  with pytest.raises(SystemExit, match="clients: 99 is not a training client"):
    export_cli.main(["--workdir", workdir, "--clients", "99"])


def test_a_run_writes_its_adapters_every_n_rounds_and_the_cli_writes_the_same(smoke_config, tmp_path):
  """HyperLoRA (personalized by the generator's offsets) with export_every=2 of 3 rounds and
  export_clients='0,5': rounds 2 and 3 written (the last always); each client's adapter and
  classifier head are its personalized model (`client_params`, to float rounding: jit or not),
  the two clients differ, and the CLI's export of the round-3 checkpoint of one of them has the
  same bytes (a client's floats do not depend on which others are written)."""
  smoke_config.method, smoke_config.fed.num_rounds = "hyperlora", 3
  smoke_config.export_every, smoke_config.export_clients = 2, "0,5"
  workdir = str(tmp_path / "run")
  train_and_evaluate(smoke_config, workdir, **QUIET)
  written = os.path.join(workdir, export_lib.ADAPTERS_DIR)
  assert sorted(os.listdir(written)) == ["round-2", "round-3"]
  assert sorted(os.listdir(os.path.join(written, "round-3"))) == ["client-0", "client-5", "global"]
  exp, state, _ = workdir_lib.restore_run(workdir_lib.recorded_config(workdir), workdir)
  personal = [jax.tree.map(np.asarray, exp.fed_round.client_params(state, jnp.asarray([c]))) for c in (0, 5)]
  personal = jax.tree.map(lambda *x: np.concatenate(x), *personal)
  for i, client in enumerate((0, 5)):
    directory = os.path.join(written, "round-3", f"client-{client}")
    adapter, config = peft.load_peft(directory)
    assert config["task_type"] is None and config["base_model_name_or_path"] == ""  # The embedded ViT.
    for path, factors in adapter.items():
      np.testing.assert_allclose(factors["a"], personal["lora"][path]["a"][i], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(factors["b"], personal["lora"][path]["b"][i], rtol=1e-6, atol=1e-7)
    head = load_file(os.path.join(directory, export_lib.HEAD_FILE))
    np.testing.assert_allclose(head["head/kernel"], personal["head"]["kernel"][i], rtol=1e-6, atol=1e-7)
  assert not np.array_equal(personal["lora"][path]["b"][0], personal["lora"][path]["b"][1])
  out = str(tmp_path / "cli")
  export_cli.main(["--workdir", workdir, "--clients", "5", "--out", out])
  for name in ("global", "client-5"):
    for file in (peft.ADAPTER_WEIGHTS, peft.ADAPTER_CONFIG, export_lib.HEAD_FILE):
      with (
        open(os.path.join(out, name, file), "rb") as a,
        open(os.path.join(written, "round-3", name, file), "rb") as b,
      ):
        assert a.read() == b.read(), (name, file)
