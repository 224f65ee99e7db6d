"""Text runs end to end (configs/instruction_tuning.py): the fixture Llama checkpoint on a Dolly
file the test writes, the embedded decoder on the embedded records, resume, every method."""

import json
import os

import pytest

from configs import instruction_tuning
from experiments.runner import methods, reporting
from experiments.runner.config_validation import ConfigError
from experiments.runner.experiment import build_experiment
from experiments.runner.train import train_and_evaluate

from tests.repo_paths import ROOT

LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf_llama")
CATEGORIES = ("brainstorming", "open_qa", "classification")


def _dolly_file(path):
  """24 short Dolly records, 8 per category, distinct."""
  with open(path, "w") as f:
    for i in range(8):
      for c, category in enumerate(CATEGORIES):
        f.write(
          json.dumps(
            {
              "instruction": f"Give {i} {category}.",
              "context": "" if c else f"{i} apples",
              "response": f"{category} {i}.",
              "category": category,
            }
          )
          + "\n"
        )
  return str(path)


def _config(tmp_path, cache_dirs, method="fedit", rounds=3):
  config = instruction_tuning.get_config(
    f"smoke,method={method},rounds={rounds},checkpoint={LLAMA},data={_dolly_file(tmp_path / 'dolly.jsonl')}"
  )
  config.pretrain.cache_dir = cache_dirs["cache_dir"]
  config.data.data_dir = cache_dirs.get("data_dir") or os.path.join(cache_dirs["cache_dir"], "tokenized")
  config.data.num_clients, config.fed.clients_per_round = 3, 3
  config.data.max_len = 160  # The fixture's tokenizer was trained on 9 sentences: long ids.
  return config


def test_a_checkpoint_and_a_dolly_file_train_resume_and_report(tmp_path, cache_dirs):
  """One trace per run; next-token accuracies in [0, 1]; killed after round 3 of 4 (saved at 2)
  and resumed, with the token rows streamed from the tokenized files, the records are those of
  the straight run's, which held them in memory."""
  config = _config(tmp_path, cache_dirs, rounds=4)
  straight = train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  assert straight["round_traces"] == 1
  records = straight["records"]
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  assert all(
    0 <= r["global_accuracy"] <= 1 and r["personalized_accuracy_worst"] <= r["personalized_accuracy_mean"]
    for r in records
  )
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert all(
    1 < r["global_perplexity"] and r["personalized_perplexity_mean"] <= r["personalized_perplexity_worst"]
    for r in records
  )
  assert records[-1]["global_perplexity"] < records[0]["global_perplexity"]
  assert "perplexity             global" in straight["summary"]
  killed, logs = str(tmp_path / "killed"), []
  config.data.stream = True
  train_and_evaluate(config, killed, stop_after_round=3, progress=False, log=logs.append)
  train_and_evaluate(config, killed, progress=False)
  assert reporting.read_metrics(killed) == reporting.read_metrics(str(tmp_path / "straight"))
  assert any(line.startswith("data: 18 train / 6 test records of") and "(streamed)" in line for line in logs), logs
  assert not any(line.startswith("data: tokenized") for line in logs)  # The straight run's files are read.
  config.data.stream = False
  config.data.max_len = 64
  with pytest.raises(ConfigError, match="data.max_len: 24 of 24 records keep no response token"):
    train_and_evaluate(config, str(tmp_path / "short"), progress=False)
  recorded = json.load(open(tmp_path / "straight" / "config.json"))
  assert recorded["model"]["num_kv_heads"] == 2 and recorded["model"]["vocab_size"] == 360  # From config.json.


def test_the_runs_perplexity_counts_only_the_response_tokens_of_real_records(tmp_path, cache_dirs):
  """The runner's evaluation pads test blocks (rows and positions); counted, a padded batch's
  perplexity was 386 instead of 1.41. Against NumPy on each real test record, unpadded: the
  frozen model's log-softmax at every position whose next token is a response token."""
  import numpy as np
  from experiments.runner.evaluation import run_evaluator
  from experiments.runner.train import state_on_mesh
  from hyperlora_jax.models import hf

  config = _config(tmp_path, cache_dirs, rounds=1)
  config.eval_batch = 4  # Test blocks padded to a multiple of 4 rows.
  exp = build_experiment(config, lambda _: None)
  state, frozen = state_on_mesh(exp)
  global_accuracy, accuracies, extras = run_evaluator(exp, with_extras=True)(state, frozen)()
  model, variables, _ = hf.load_causal_lm(LLAMA)  # b = 0 at init: the adapted model is the frozen one.
  pool, nll, hits, tokens, per_client = exp.data.test_pool, 0.0, 0, 0, []
  for part in exp.data.test_parts:
    client = [0.0, 0]
    for row in part:
      real = int(pool.tokens["attention_mask"][row].sum())
      ids = np.asarray(pool.tokens["input_ids"][row][:real])
      logits = np.asarray(model.apply(variables, ids[None], np.ones((1, real), np.int32))[0], np.float64)
      log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
      )
      predicted = np.flatnonzero(np.asarray(pool.tokens["loss_mask"][row][1:real]))  # Position t predicts t + 1.
      nll -= log_probs[predicted, ids[predicted + 1]].sum()
      client[0] -= log_probs[predicted, ids[predicted + 1]].sum()
      client[1] += len(predicted)
      hits += int(np.sum(np.argmax(logits[predicted], -1) == ids[predicted + 1]))
      tokens += len(predicted)
    per_client.append(np.exp(client[0] / client[1]))
  assert sum(len(p) for p in exp.data.test_parts) % config.eval_batch  # The blocks do get padding rows.
  np.testing.assert_allclose(extras["global_perplexity"], np.exp(nll / tokens), rtol=2e-4)
  np.testing.assert_allclose(global_accuracy, hits / tokens, atol=1e-6)
  np.testing.assert_allclose(extras["personalized_perplexity_mean"], np.mean(per_client), rtol=2e-4)


def _categories_file(path, categories, per_category=6):
  with open(path, "w") as f:
    for i in range(per_category):
      for category in categories:
        f.write(
          json.dumps(
            {
              "instruction": f"Give {i} {category}.",
              "context": "",
              "response": f"{category} {i}.",
              "category": category,
            }
          )
          + "\n"
        )
  return str(path)


def test_the_readme_recipe_takes_a_file_with_its_own_number_of_categories(tmp_path, cache_dirs):
  """`:data=X.jsonl` gives one client per category, as many as the file has (Dolly-15k's 8, not
  the embedded set's 13); a file with fewer categories than clients a round is refused naming
  fed.clients_per_round, and a data.num_clients other than its categories naming that field."""
  categories = (
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
  )  # Dolly-15k's eight.
  data = _categories_file(tmp_path / "dolly8.jsonl", categories)
  config = instruction_tuning.get_config(f"smoke,method=fedit,rounds=1,checkpoint={LLAMA},data={data}")
  config.pretrain.cache_dir, config.data.data_dir = cache_dirs["cache_dir"], str(tmp_path / "tokenized")
  config.data.max_len, config.data.min_client_size = 160, 3
  assert config.data.num_clients == 0
  logs = []
  exp = build_experiment(config, logs.append)
  assert exp.data.num_clients == 8 and exp.settings.num_clients == 8
  assert "data.num_clients: 0 -> 8, one client per category of" in " ".join(logs)
  four = _categories_file(tmp_path / "four.jsonl", categories[:4])
  config = instruction_tuning.get_config(f"checkpoint={LLAMA},data={four}")
  config.pretrain.cache_dir, config.data.data_dir = cache_dirs["cache_dir"], str(tmp_path / "tokenized")
  config.data.max_len = 160
  with pytest.raises(ConfigError, match=r"fed.clients_per_round: 6 exceeds the 4 clients, one per category"):
    build_experiment(config, lambda _: None)
  config.fed.clients_per_round, config.data.min_client_size = 4, 10
  with pytest.raises(ConfigError, match=r"data.min_client_size: category 'brainstorming' has 5 training record"):
    build_experiment(config, lambda _: None)
  config.data.min_client_size, config.data.num_clients = 3, 6  # One client per category: 4, not 6.
  with pytest.raises(ConfigError, match=r"data.num_clients: 6 clients, but .*one per category .*: 4 \("):
    build_experiment(config, lambda _: None)


def test_the_measured_chunk_size_times_token_blocks_of_the_runs_shape(tmp_path, cache_dirs):
  """fed.clients_per_chunk=-1 on a text run: chunk sizes timed on random token blocks of the
  run's shape ([c, S, B, data.max_len], the decoder's vocabulary), the pick one that divides
  the 3 clients, cached under the sequence length (not an image size) and reused; the round
  then runs with it."""
  config = _config(tmp_path, cache_dirs, rounds=1)
  config.fed.clients_per_chunk = -1
  lines = []
  exp = build_experiment(config, lines.append)
  assert exp.fed_round.clients_per_chunk in (1, 3)
  assert any(line.startswith("fed.clients_per_chunk: ") and "(measured;" in line for line in lines), lines
  with open(os.path.join(cache_dirs["cache_dir"], "clients_per_chunk.json")) as f:
    (entry,) = [e for e in json.load(f)["entries"].values() if "max_len" in e["fields"]]
  assert entry["fields"]["max_len"] == 160 and "image_size" not in entry["fields"]
  assert sorted(entry["seconds"]) == ["1", "3"]
  lines.clear()
  build_experiment(config, lines.append)
  assert any("(cached;" in line for line in lines)
  result = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert 0 <= result["records"][-1]["global_accuracy"] <= 1


# Local leaves (FedSA-LoRA) and a server residual on the frozen weights (FLoRA) in every CI run;
# the others (about 15-60 s each on 2 cores) with the slow tests.
IN_CI = ("fedsa_lora", "flora")


@pytest.mark.parametrize(
  "method", [m if m in IN_CI else pytest.param(m, marks=pytest.mark.slow) for m in sorted(methods.METHODS)]
)
def test_every_method_runs_on_text(method, tmp_path, cache_dirs):
  config = _config(tmp_path, cache_dirs, method=method, rounds=1)
  result = train_and_evaluate(config, str(tmp_path / method), progress=False)
  record = result["records"][-1]
  assert result["round_traces"] == 1 and 0 <= record["personalized_accuracy_mean"] <= 1


def test_the_embedded_decoder_is_pretrained_cached_and_tuned_by_hyperlora(tmp_path, cache_dirs):
  """The smoke variant with no checkpoint: a tokenizer and decoder trained on the Language
  Reference (cached as a Hugging Face directory), HyperLoRA's text signatures, one round on the
  docstring records in 13 categories."""
  from experiments.runner import backbone as backbone_lib, pretrain_text
  from experiments.runner.settings import backbone_settings
  from hyperlora_jax.models import hf

  config = instruction_tuning.get_config("smoke,method=hyperlora,rounds=1")
  config.pretrain.cache_dir, config.data.data_dir = cache_dirs["cache_dir"], cache_dirs["data_dir"]
  config.pretrain.steps = 10
  logs = []
  result = train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=logs.append)
  assert any("records of 'stdlib_docs' in 13 group(s)" in line for line in logs)
  assert result["round_traces"] == 1 and result["records"][-1]["bytes_up"] > 0
  directory = pretrain_text.cache_path(backbone_settings(config))
  model, _, tokenizer, _ = backbone_lib.text_backbone(backbone_settings(config), logs.append)
  assert logs[-1] == f"backbone: restored from {directory}"
  assert hf.read_checkpoint(directory)[0] == "llama" and tokenizer.vocab_size == model.vocab_size == 2048


def test_a_sweep_prepares_the_embedded_decoder_and_the_tokenized_records_once(tmp_path, cache_dirs):
  """`sweep.prepare_shared_inputs` on text configs: the decoder of each distinct cache key is
  built, and the records tokenized, once before the runs start, and nothing fails."""
  from experiments import sweep

  config = instruction_tuning.get_config("smoke,method=fedit")
  config.pretrain.cache_dir, config.data.data_dir = cache_dirs["cache_dir"], str(tmp_path / "tokenized")
  config.pretrain.steps = 10
  other_seed = instruction_tuning.get_config("smoke,method=hyperlora,seed=1")
  other_seed.pretrain, other_seed.data = config.pretrain, config.data
  logs = []
  sweep.prepare_shared_inputs([config, other_seed], log=logs.append)
  assert not any("failed" in line for line in logs)
  assert len([line for line in logs if line.startswith(("backbone: pretraining", "backbone: restored"))]) == 1
  assert len([line for line in logs if line.startswith("data: tokenized")]) == 1
  assert len(os.listdir(tmp_path / "tokenized")) == 1


@pytest.mark.slow  # 19 s; a private run's ε and clipped signatures on images run in make test (test_private_hyperlora).
def test_a_private_hyperlora_text_run_clips_and_noises_its_signatures_and_reports_epsilon(tmp_path, cache_dirs):
  """DP on a text run: the per-round ε composes the round's Gaussian releases
  as for images; the text signatures (group histogram and frozen-decoder features) are clipped
  to dp.signature_clip_norm and noised with std multiplier x clip norm."""
  import numpy as np
  from hyperlora_jax import privacy

  config = _config(tmp_path, cache_dirs, method="hyperlora", rounds=2)
  config.hyperlora.synthesizer, config.hyperlora.corrector = "uniform", "none"
  config.dp.noise_multiplier, config.dp.signature_noise_multiplier = 1.0, 4.0
  config.dp.signature_clip_norm = 0.5
  records = train_and_evaluate(config, str(tmp_path / "run"), progress=False, log=lambda _: None)["records"]
  expected = [
    privacy.epsilon(
      r,
      1.0,
      config.fed.clients_per_round,
      config.data.num_clients,
      config.dp.delta,
      signature_noise_multiplier=4.0,
      releases_per_round=3,
    )
    for r in (1, 2)
  ]
  assert [r["dp_epsilon"] for r in records] == pytest.approx(expected)
  assert all(np.isfinite(r["global_perplexity"]) for r in records)
  noisy = build_experiment(config, lambda _: None).signatures
  config.dp.signature_noise_multiplier = 1e-6  # Noise too small to hide the clipping.
  clipped = build_experiment(config, lambda _: None).signatures
  norms = np.linalg.norm(clipped, axis=-1)
  assert noisy.shape == clipped.shape and clipped.shape[0] == 3 and clipped.shape[1] > 13
  np.testing.assert_allclose(norms, 0.5, atol=1e-3)  # Every raw signature is longer than 0.5.
  noise = noisy - clipped
  assert 0.6 * 2.0 < noise.std() < 1.4 * 2.0  # 4.0 x 0.5 per coordinate.


def test_a_run_on_a_4_bit_frozen_decoder_trains_near_the_float_run(tmp_path, cache_dirs):
  """compute.backbone_quantization=nf4: the round's frozen argument holds the fixture's kernels as
  uint8 codes, two weights a byte (the setting is not ignored), and the run's losses follow the
  float run's within the quantization error."""
  from hyperlora_jax import quantize
  from experiments.runner.train import state_on_mesh

  config = _config(tmp_path, cache_dirs, rounds=2)
  config.compute.backbone_quantization, config.compute.quantization_block = "nf4", 16
  exp = build_experiment(config, log=lambda _: None)
  _, frozen = state_on_mesh(exp)
  held = quantize.quantized_layers(frozen)
  assert len(held) == 2 * 7  # q, k, v, o, gate, up, down of both blocks (not lm_head).
  up = held["variables/params/block_0/mlp/up/kernel"]
  assert up.codes.dtype == "uint8" and up.codes.shape == (16, 40) and up.scales.shape == (2, 40)  # [32, 40].
  quantized = train_and_evaluate(config, str(tmp_path / "nf4"), progress=False)["records"]
  full = train_and_evaluate(_config(tmp_path, cache_dirs, rounds=2), str(tmp_path / "float"), progress=False)["records"]
  for q, f in zip(quantized, full):
    assert q["train_loss"] != f["train_loss"]
    assert abs(q["train_loss"] - f["train_loss"]) < 0.05 * f["train_loss"]
    assert abs(q["global_perplexity"] - f["global_perplexity"]) < 0.1 * f["global_perplexity"]


def test_a_text_run_fed_from_host_memory_gives_the_records_of_one_fed_from_the_devices(tmp_path, cache_dirs):
  """data.feed='host' on the fixture Llama (token blocks in pinned host memory, moved a chunk of
  clients at a time): the same records as data.feed='round'."""
  config = _config(tmp_path, cache_dirs, rounds=2)
  config.fed.clients_per_chunk = 1
  on_device = train_and_evaluate(config, str(tmp_path / "round"), progress=False)["records"]
  config.data.feed = "host"
  on_host = train_and_evaluate(config, str(tmp_path / "host"), progress=False)["records"]
  assert on_host == on_device


def test_a_packed_run_steps_on_rows_that_hold_each_clients_records_once(tmp_path, cache_dirs):
  """data.packing on the Dolly file (18 training records, 36% of their slots padding; rows of 160): each client's rows
  hold each of its training records exactly once and no other client's; a round's blocks carry
  segment ids and less padding than the records'; evaluation reads the test records unpacked,
  so the untrained model's evaluation is that of the unpacked run; the run trains."""
  import numpy as np
  from experiments.runner.evaluation import run_evaluator
  from experiments.runner.feeding import round_inputs
  from experiments.runner.train import state_on_mesh
  from hyperlora_jax import text

  config = _config(tmp_path, cache_dirs, rounds=2)
  evaluations = {}
  for packing in (False, True):
    config.data.packing = packing
    logs = []
    exp = build_experiment(config, logs.append)
    evaluations[packing] = run_evaluator(exp, with_extras=True)(*state_on_mesh(exp))()
  data = exp.data
  rows, parts = data.step_source()
  assert rows is data.step_pool and len(rows) < len(data.train_pool)
  for records, row_ids in zip(data.train_parts, parts):
    members = rows.plan[row_ids]
    np.testing.assert_array_equal(np.sort(members[members >= 0]), np.sort(records))
  block, _, weights = round_inputs(exp, 0)
  assert block["attention_mask"].max() >= 2 and block["input_ids"].shape[-1] == 160
  records_padding = text.padding_fraction(data.train_pool.tokens["attention_mask"])
  every_row = rows.gather(np.arange(len(rows)), np.ones(len(rows)))["attention_mask"]
  assert text.padding_fraction(every_row) < records_padding - 0.1
  np.testing.assert_array_equal(rows.row_tokens, np.sum(every_row > 0, axis=-1))
  np.testing.assert_allclose(weights, 1 / 3)  # Records, not rows: 6 a client.
  assert any("training records packed into" in line for line in logs), logs
  np.testing.assert_equal(evaluations[True][2], evaluations[False][2])
  records = train_and_evaluate(config, str(tmp_path / "packed"), progress=False)["records"]
  assert np.isfinite(records[-1]["global_perplexity"]) and records[-1]["train_loss"] < records[0]["train_loss"]
