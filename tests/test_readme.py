"""Every example of the README and docs/ runs exactly as written, and gives what the text says
it gives."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import autotune as hl_autotune
from hyperlora_jax import quantize as hl_quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DOCUMENTS = (
  "README.md",
  *sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")),
)


def _texts() -> dict[str, str]:
  texts = {}
  for name in DOCUMENTS:
    with open(os.path.join(ROOT, name)) as f:
      texts[name] = f.read()
  return texts


def _example(marker: str) -> tuple[str, str]:
  """(the example's code, the document it is in)."""
  for name, text in _texts().items():
    match = re.search(rf"<!-- example:{marker} -->\s*```python\n(.*?)```", text, re.S)
    if match:
      return match.group(1), name
  raise AssertionError(f"no document holds example '{marker}'")


def _run(marker: str) -> dict:
  namespace = {}
  code, document = _example(marker)
  exec(compile(code, f"{document}:{marker}", "exec"), namespace)
  return namespace


def test_every_example_block_is_tested():
  found = [m for text in _texts().values() for m in re.findall(r"<!-- example:([\w-]+) -->", text)]
  assert len(found) == len(set(found))  # One home each.
  markers = set(found)
  tested = {
    "text-classifier",
    "regression",
    "scale",
    "aggregators",
    "generator",
    "attention",
    "nnx",
    "peft",
    "hyperlora",
    "huggingface",
    "decoder",
    "plan",
    "quantize",
    "host-feed",
    "evaluation",
    "packing",
    "preference",
  }
  assert markers == tested


def test_text_classifier_round_learns_and_keeps_the_adapter_layout():
  ns = _run("text-classifier")
  assert ns["targets"] == {"attn/query": (32, 32), "attn/value": (32, 32), "classify": (32, 4)}
  losses = ns["losses"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.01
  new = ns["state"]["global"]
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, ns["adapter"])
  # FlexLoRA's global update is rank 4 and non-zero after training.
  product = new["classify"]["a"] @ new["classify"]["b"]
  assert 0 < np.linalg.matrix_rank(np.asarray(product), tol=1e-6) <= 4
  assert int(ns["metrics"]["participants"]) == 4
  # The clients moved A differently, so a factor average would be biased on every layer.
  assert set(ns["bias"]) == {"attn/query", "attn/value", "classify"} and all(0 < b < 10 for b in ns["bias"].values())
  assert np.isfinite(ns["lag"])


def test_regression_with_float_targets_trains():
  ns = _run("regression")
  losses = ns["losses"]
  assert losses[-1] < 0.5 * losses[0]
  assert ns["batches"]["y"].dtype == np.float32 or ns["batches"]["y"].dtype == np.float64


def test_scale_example_keeps_each_sampled_clients_b_in_its_own_row():
  ns = _run("scale")
  assert ns["choice"].clients_per_chunk in hl_autotune.chunk_candidates(32)
  assert sorted(ns["choice"].seconds) == hl_autotune.chunk_candidates(32)
  store = np.asarray(ns["state"]["clients"]["hidden/b"])
  assert store.shape == (10_000, 2, 32)  # [N, r, d_out]: not transposed.
  ids = np.asarray(ns["ids"])
  moved = np.abs(store).sum((1, 2)) > 0  # B starts at 0: only trained rows move.
  assert moved[ids].all() and moved.sum() == 32
  assert int(ns["metrics"]["participants"]) == 32
  # The shared A is the mean of the 32 clients' trained A (FedIT on the non-local leaves).
  assert not np.allclose(ns["state"]["global"]["hidden"]["a"], ns["adapter"]["hidden"]["a"])


def _best_rank_r(matrix, rank):
  u, s, vt = np.linalg.svd(np.asarray(matrix), full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_aggregators_on_user_stacked_adapters_match_the_formulas():
  ns = _run("aggregators")
  clients, w, s = ns["clients"], np.asarray(ns["weights"]), ns["scale"]
  for path in ("enc/query", "enc/value"):
    a, b = np.asarray(clients[path]["a"]), np.asarray(clients[path]["b"])
    exact = s * np.einsum("c,cir,cro->io", w, a, b)
    for name in ("flex_adapter", "synth_adapter"):
      got = ns[name][path]
      assert got["a"].shape == (16, 4) and got["b"].shape == (4, 24)  # Not transposed.
      np.testing.assert_allclose(s * got["a"] @ got["b"], _best_rank_r(exact, 4), atol=1e-4)
  mixed = ns["mixed_adapter"]
  np.testing.assert_allclose(
    mixed["enc/query"]["a"] @ mixed["enc/query"]["b"],
    ns["flex_adapter"]["enc/query"]["a"] @ ns["flex_adapter"]["enc/query"]["b"],
    atol=1e-5,
  )
  np.testing.assert_allclose(mixed["enc/value"]["a"], np.einsum("c,cir->ir", w, clients["enc/value"]["a"]), rtol=1e-6)


def test_generator_on_user_adapters_learns_the_clients_ends():
  ns = _run("generator")
  offsets, trained, adapter = ns["offsets"], ns["trained"], ns["adapter"]
  assert offsets["enc/query"]["a"].shape == (3, 16, 4) and offsets["enc/query"]["b"].shape == (3, 4, 24)
  assert float(jnp.abs(offsets["enc/query"]["a"]).max()) == 0.0  # Zero-initialised output.
  before = sum(float(jnp.sum((trained[p][k] - adapter[p][k]) ** 2)) for p in trained for k in "ab")
  now = ns["generator"].generate(ns["state"], ns["signatures"], ns["ids"])
  after = sum(float(jnp.sum((trained[p][k] - adapter[p][k] - now[p][k]) ** 2)) for p in trained for k in "ab")
  assert after < 0.5 * before
  assert ns["plugin"].name == "generator"


def test_lora_on_multi_head_attention_equals_merged_weights():
  ns = _run("attention")
  assert ns["targets"] == {"query": (16, 32), "value": (16, 32), "out": (32, 16)}
  base = ns["attention"].apply(ns["variables"], ns["x"])
  assert float(jnp.abs(ns["y"] - base).max()) > 1e-3
  np.testing.assert_allclose(ns["y"], ns["y_merged"], atol=1e-5)


def test_nnx_model_round_trains_its_adapter():
  ns = _run("nnx")
  assert ns["targets"] == {"hidden": (3, 16), "out": (16, 2)}
  assert np.isfinite(float(ns["metrics"]["train_loss"]))
  assert float(jnp.abs(ns["state"]["global"]["out"]["b"]).max()) > 0  # b left 0: it trained.


def test_peft_export_round_trips_and_gives_the_merged_delta(tmp_path):
  ns = _run("peft")
  hl, adapter, loaded, config = ns["hl"], ns["adapter"], ns["loaded"], ns["config"]
  assert list(loaded) == list(adapter)
  for path in adapter:
    np.testing.assert_array_equal(loaded[path]["a"], adapter[path]["a"])
    np.testing.assert_array_equal(loaded[path]["b"], adapter[path]["b"])
  from safetensors.numpy import load_file

  tensors = load_file(os.path.join(ns["directory"], "adapter_model.safetensors"))
  lora_a, lora_b = tensors["base_model.model.proj.lora_A.weight"], tensors["base_model.model.proj.lora_B.weight"]
  assert lora_a.shape == (2, 8) and lora_b.shape == (6, 2)  # PEFT: [r, d_in], [d_out, r].
  with open(os.path.join(ns["directory"], "adapter_config.json")) as f:
    assert json.load(f)["r"] == 2 and config["lora_alpha"] == 4.0
  scale = hl.peft.scale_from_config(config)
  merged = hl.lora.merge(ns["variables"], adapter, scale)
  delta_w = merged["params"]["proj"]["kernel"] - ns["variables"]["params"]["proj"]["kernel"]
  np.testing.assert_allclose((scale * lora_b @ lora_a).T, delta_w, atol=1e-6)
  with pytest.raises(ValueError, match="lora_A or lora_B"):
    hl.peft.from_peft_tensors({"base_model.model.proj.lora_A.weight": lora_a})
  folded, config = hl.peft.load_peft(ns["folded_dir"])
  residual = np.asarray(ns["residual"]["proj"], np.float64)
  want = residual + 2.0 * np.asarray(adapter["proj"]["a"], np.float64) @ np.asarray(adapter["proj"]["b"])
  assert hl.peft.scale_from_config(config) == 2.0 and folded["proj"]["a"].shape[1] == np.linalg.matrix_rank(want)
  np.testing.assert_allclose(2.0 * folded["proj"]["a"] @ folded["proj"]["b"], want, atol=1e-6)
  np.testing.assert_array_equal(folded["embed"]["a"], adapter["embed"]["a"])  # No residual there.


def _fake_run(workdir, global_accuracy, mean, worst, cum_bytes):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"round": 29, "personalized_accuracy_mean": 0.0, "cum_bytes": 0}) + "\n")
    f.write(
      json.dumps(
        {
          "round": 30,
          "global_accuracy": global_accuracy,
          "personalized_accuracy_mean": mean,
          "personalized_accuracy_worst": worst,
          "cum_bytes": cum_bytes,
        }
      )
      + "\n"
    )


def test_hyperlora_round_on_a_user_model_learns_and_personalizes_by_signature():
  """The example's round trains (loss falls), meta-learns (S_ψ's metrics, one held-out step), and
  each client's `client_params` are the global factors plus G_φ's offset for its signature, by
  hand from the generator's own `generate`."""
  ns = _run("hyperlora")
  losses, state, fed = ns["losses"], ns["state"], ns["fed"]
  assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
  assert fed.aggregator.capabilities.heldout_steps == 1 and np.isfinite(float(ns["metrics"]["meta_loss"]))
  assert float(ns["metrics"]["generator_offset_norm"]) > 0
  ids = jnp.arange(6)
  offsets = ns["generator"].generate(state["plugins"]["generator"], state["signatures"][:6], ids)
  by_hand = jax.tree.map(lambda g, o: g[None] + o, state["global"], offsets)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ns["personal"], by_hand)
  spread = float(jnp.abs(ns["personal"]["out"]["b"][0] - ns["personal"]["out"]["b"][1]).max())
  assert spread > 1e-3  # Different signatures, different starts.


def test_readme_check_reads_the_readmes_table_and_applies_its_tolerances(tmp_path):
  from experiments.reports import check_readme

  with open(os.path.join(ROOT, "README.md")) as f:
    table = check_readme.readme_table(f.read())
  assert set(table) == {"hyperlora", "fedit"}  # What `make run` runs; the check must find both rows.
  fedit = table["fedit"]
  assert 0 < fedit["pers_worst"] <= fedit["pers_mean"] <= 100 and fedit["mb"] > 1
  for method, row in table.items():  # Within tolerance: 3 points off on accuracy, 7 on the worst client.
    _fake_run(
      str(tmp_path / "ok" / method),
      (row["global"] + 3) / 100,
      (row["pers_mean"] - 3) / 100,
      (row["pers_worst"] + 7) / 100,
      row["mb"] * 1e6,
    )
  readme = os.path.join(ROOT, "README.md")
  assert check_readme.main(["--workdir", str(tmp_path / "ok"), "--readme", readme]) == 0
  for method, row in table.items():  # The printed table itself (run figures rounded as printed): tolerance 0.
    _fake_run(
      str(tmp_path / "same" / method),
      (row["global"] + 0.04) / 100,
      row["pers_mean"] / 100,
      (row["pers_worst"] - 0.04) / 100,
      row["mb"] * 1e6 + 4000,
    )
  zero = ["--tolerance", "0", "--worst_tolerance", "0"]
  assert check_readme.main(["--workdir", str(tmp_path / "same"), "--readme", readme] + zero) == 0
  assert check_readme.main(["--workdir", str(tmp_path / "ok"), "--readme", readme] + zero) == 1
  for method, row in table.items():  # One field beyond tolerance each: global +5, MB off by 0.02.
    _fake_run(
      str(tmp_path / "bad" / method),
      (row["global"] + 5) / 100,
      row["pers_mean"] / 100,
      row["pers_worst"] / 100,
      (row["mb"] + (0.02 if method == "fedit" else 0)) * 1e6,
    )
  problems = check_readme.compare(table, {m: check_readme.run_row(str(tmp_path / "bad" / m)) for m in table}, 4.0)
  assert sorted(problems) == sorted(
    [
      f"{m} global: README {row['global']:.1f}%, run {row['global'] + 5:.1f}% (|difference| 5.0 > 4.0)"
      for m, row in table.items()
    ]
    + [f"fedit MB: README {fedit['mb']:.2f}, run {fedit['mb'] + 0.02:.2f} (bytes are exact counts)"]
  )
  assert check_readme.main(["--workdir", str(tmp_path / "bad"), "--readme", readme]) == 1
  # The worst client is not checked by default (one client's split), only when asked.
  for method, row in table.items():
    _fake_run(
      str(tmp_path / "worst" / method),
      row["global"] / 100,
      row["pers_mean"] / 100,
      (row["pers_worst"] + 15) / 100,
      row["mb"] * 1e6,
    )
  assert check_readme.main(["--workdir", str(tmp_path / "worst"), "--readme", readme]) == 0
  assert check_readme.main(["--workdir", str(tmp_path / "worst"), "--readme", readme, "--worst_tolerance", "8"]) == 1
  # The ranking: HyperLoRA's personalized lead (11.2 points in the README) is checked at any
  # tolerance: reversed within a tolerance looser than the lead, only the ranking is reported.
  hyper, fed = table["hyperlora"], table["fedit"]
  lead = hyper["pers_mean"] - fed["pers_mean"]
  assert lead > 8
  measured = {
    "hyperlora": {**hyper, "pers_mean": fed["pers_mean"] + 0.5},
    "fedit": {**fed, "pers_mean": fed["pers_mean"] + 3.9},
  }
  problems = check_readme.compare(table, measured, lead + 1.0)
  assert problems == [p for p in problems if p.startswith("ranking")] and len(problems) == 1, problems


def test_huggingface_example_loads_the_checkpoint_and_exports_names_peft_attaches():
  """Run from the repository root (the README's paths); the export names are transformers 5's."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    ns = _run("huggingface")
  finally:
    os.chdir(cwd)
  checkpoint = ns["checkpoint"]
  assert checkpoint.model_name == "vit" and checkpoint.architecture["gelu"] == "exact"
  assert checkpoint.tokenizer is None and ns["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
  assert ns["hidden"].shape == (2, 17, 32)
  with open(os.path.join(ns["directory"], "adapter_config.json")) as f:
    config = json.load(f)
  assert sorted(config["target_modules"]) == sorted(f"layers.{i}.attention.{p}_proj" for i in range(2) for p in "qv")


def test_decoder_example_tunes_generates_and_exports_reference_names():
  """The fixture Llama: the round lowers the loss on the two records, the cached generation is
  a full recompute's greedy tokens, the adapter names are LlamaForCausalLM's."""
  import json as json_lib

  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    ns = _run("decoder")
  finally:
    os.chdir(cwd)
  task, frozen, batch = ns["task"], ns["frozen_tree"](ns["variables"]), ns["batch"]
  assert (
    task.loss_fn({"lora": ns["tuned"]}, frozen, batch, None)[0] < task.loss_fn(ns["adapter"], frozen, batch, None)[0]
  )
  tokens = list(np.asarray(ns["tokens"][0]))
  model, variables, tuned, sequence = ns["model"], ns["variables"], ns["tuned"], list(ns["prompt"])
  for t in tokens[:2]:  # No cache: the whole sequence each time.
    logits = ns["hl"].lora.apply(model, variables, tuned, jnp.asarray([sequence]), scale=task.scale)
    assert int(jnp.argmax(logits[0, -1])) == t
    sequence.append(t)
  assert isinstance(ns["answer"], str) and len(tokens) == 4
  with open(os.path.join(ns["adapter_dir"], "adapter_config.json")) as f:
    assert "model.layers.1.self_attn.v_proj" in json_lib.load(f)["target_modules"]


def test_plan_example_reports_the_rounds_memory_and_flops_read_from_a_program_without_loops():
  """The example's 16 clients by chunks of 4: memory from the compiled round; FLOPs at least the
  forward matmuls of every client's 5 steps (a cost read with the loops would count one step)."""
  ns = _run("plan")
  report = ns["report"]
  forward = 16 * 5 * 32 * 2 * (64 * 256 + 256 * 10)  # clients x steps x batch x 2 x (d_in d_out per layer)
  assert report.fits and report.memory["total"] > 0 and report.flops > forward
  assert report.collectives == {} and any("memory" in line for line in report.lines())


def test_quantize_example_holds_the_hidden_layer_in_half_a_byte_and_trains_on_it():
  """nf4 codes of [64, 256] in [32, 256] uint8; the head kept float; the bytes held fall by the
  hidden kernel's 4 bytes -> half a byte (+ 4 scales of 4 bytes per column); the adapter trained
  on the 4-bit layer lowers the float model's loss too."""
  ns = _run("quantize")
  assert ns["codes"].shape == (32, 256) and ns["codes"].dtype == jnp.uint8
  assert not hl_quantize.is_quantized(ns["frozen"]["params"]["head"]["kernel"])
  assert ns["bytes_float"] - ns["bytes_nf4"] == 64 * 256 * 4 - (32 * 256 + 1 * 256 * 4)  # One block of 64 rows.
  before = ns["loss"](jax.tree.map(jnp.zeros_like, ns["adapter"]), ns["variables"])
  assert float(ns["on_float"]) < float(before) - 0.3


def test_host_feed_example_holds_the_images_on_the_host_and_trains_as_from_the_devices():
  """The example's images are in pinned host memory as 48 words a 192-byte image; the round from
  there gives the metrics of the same round on batches on the devices."""
  ns = _run("host-feed")
  held = ns["held"]
  assert held["image"].shape == (8, 2, 4, 48) and held["image"].sharding.memory_kind == "pinned_host"
  import dataclasses

  on_device = dataclasses.replace(ns["fed"], load_batches=None)
  state = on_device.init(jax.random.key(2), ns["adapter"])
  _, metrics = jax.jit(on_device.step)(
    state, ns["frozen"], ns["batches"], jnp.arange(8, dtype=jnp.int32), jnp.full(8, 1 / 8)
  )
  np.testing.assert_allclose(float(ns["metrics"]["train_loss"]), float(metrics["train_loss"]), rtol=1e-6)


def test_evaluation_example_scores_choices_and_generated_answers():
  """The example's calls on the Qwen3 fixture: the choices scored as the task scores them (each
  question right or wrong), and the greedy answer's scores in [0, 1]; the reference decoded is
  the record's response."""
  ns = _run("evaluation")
  correct = np.asarray(ns["correct"])
  assert correct.shape == (2,) and set(correct.tolist()) <= {0.0, 1.0}
  assert ns["tokenizer"].decode(ns["references"][0]).strip() == "Blue."
  exact, rouge = ns["scores"]
  assert exact in (0.0, 1.0) and 0.0 <= rouge <= 1.0


def test_packing_example_fills_rows_and_keeps_the_loss():
  """The example's records packed: fewer rows than records, less padding, segment ids 1.. in a
  row, and the loss of the packed rows that of the records one a row."""
  ns = _run("packing")
  packed, plan = ns["packed"], ns["plan"]
  assert plan.shape[0] < 3 and packed["attention_mask"].max() >= 2
  assert ns["padding"][1] < ns["padding"][0]
  np.testing.assert_allclose(ns["loss_packed"], ns["loss_records"], rtol=1e-5)


def test_preference_example_trains_both_clients_to_prefer_the_chosen_responses():
  """The example's 5 FedIT rounds with the DPO loss: both pairs' margins positive (at the start
  they are 0: the adapter is the identity, the policy the reference)."""
  ns = _run("preference")
  assert ns["margins"].shape == (2,) and np.all(np.asarray(ns["margins"]) > 0)
  assert ns["batches"]["input_ids"].shape == (2, 1, 1, 2, 128)
