"""`make bench` runs end to end (at a tiny size) and writes its JSON."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import peft_baselines, torch_baselines

from tests.repo_paths import ROOT


@pytest.mark.slow
def test_make_bench_writes_its_results(tmp_path):
  out = tmp_path / "round_speed.json"
  flags = "--clients 2,4 --chunks 0,2,auto --local_steps 2 --batch_size 4 --repeats 1"
  text_out = tmp_path / "text_round_speed.json"
  text_flags = "--clients 2 --chunks 0 --local_steps 2 --batch_size 2 --seq_len 16 --repeats 1"
  result = subprocess.run(
    [
      "make",
      "-s",
      "bench",
      f"BENCH_OUT={out}",
      f"BENCH_FLAGS={flags}",
      f"TEXT_BENCH_OUT={text_out}",
      f"TEXT_BENCH_FLAGS={text_flags}",
      f"PY={sys.executable}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert [row["clients"] for row in report["results"]] == [2, 4]
  assert report["matmul_peak_flops"] > 1e8
  for row in report["results"]:
    assert row["client_steps"] == 2 * row["clients"] and row["round_flops"] > 0
    assert [v["clients_per_chunk"] for v in row["vmapped"]][:2] == [0, 2]
    auto = row["vmapped"][2]  # The measured pick is one of the divisor candidates of C.
    assert auto["label"] == f"auto={auto['clients_per_chunk']}" and auto["clients_per_chunk"] in (1, 2, 4)
    assert row["clients"] % auto["clients_per_chunk"] == 0
    for v in row["vmapped"]:
      assert abs(v["speedup_over_loop"] - row["loop_s"] / v["seconds"]) < 1e-9
      assert abs(v["mfu"] - row["round_flops"] / v["seconds"] / report["matmul_peak_flops"]) < 1e-9
  # FLOPs scale with the cohort and the steps: the same client step, twice the clients.
  assert report["results"][1]["round_flops"] == 2 * report["results"][0]["round_flops"]
  assert report["model"]["name"] == "vit" and report["local_steps"] == 2
  cpus = len(os.sched_getaffinity(0))  # Every framework on as many threads: all the process may use.
  assert report["threads"] == cpus and report["timing"] == "interleaved, best of 1 rounds"
  assert "ratio" in result.stdout and "matmul peak" in result.stdout
  available, reason = torch_baselines.available()
  for row in report["results"]:  # PyTorch rows: timed, or skipped saying why.
    if available:
      assert row["torch"]["loop"]["client_steps_per_s"] > 0 and row["torch"]["vmap"]["seconds"] > 0
    else:
      assert row["torch"] == {"skipped": reason} and "pip install -e .[bench]" in reason
  available, reason = peft_baselines.available()
  for row in report["results"]:  # transformers + peft rows: the same.
    if available:
      assert row["peft"]["loop"]["client_steps_per_s"] > 0 and row["peft"]["vmap"]["seconds"] > 0
    else:
      assert row["peft"] == {"skipped": reason} and "pip install -e .[bench]" in reason
  text = json.loads(text_out.read_text())  # The text round, after the image one.
  assert [row["clients"] for row in text["results"]] == [2] and text["model"] == "tiny"
  assert text["threads"] == cpus
  if available:
    assert text["results"][0]["peft"]["loop"]["tokens_per_s"] > 0
  else:
    assert text["results"][0]["peft"] == {"skipped": reason}


def test_threads_confine_the_process_before_jax_starts_and_too_many_are_refused():
  """`--threads N` confines the process to N CPUs (XLA:CPU sizes its pool by them, and the torch
  rows set as many threads); more than the process may use is an error naming the flag."""
  code = (
    "import os, jax, jax.numpy as jnp; from benchmarks.timing import confine_threads; "
    "n = confine_threads(1); jnp.ones(3).block_until_ready(); print(n, len(os.sched_getaffinity(0)))"
  )
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.stdout.split() == ["1", "1"], result.stderr[-2000:]
  from benchmarks.timing import confine_threads

  with pytest.raises(ValueError, match="--threads=1000: this process may run on"):
    confine_threads(1000)


def test_the_text_benchmark_counts_tokens_flops_and_memory_by_their_formulas(tmp_path):
  """The text round's report: tokens = C x S x B x T, tokens/s and MFU from the measured
  seconds, FLOPs proportional to the cohort; and the device memory XLA plans for all C = 4
  clients at once exceeds one client's by less than the 3 extra copies of the frozen decoder a
  round that copied the backbone per client would hold (the frozen tree is one argument)."""
  out = tmp_path / "text.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.text_round_speed",
      "--clients",
      "2,4",
      "--chunks",
      "0,2",
      "--local_steps",
      "2",
      "--batch_size",
      "2",
      "--seq_len",
      "16",
      "--repeats",
      "1",
      "--nopeft",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["architecture"]["model_type"] == "llama" and report["backbone_dtype"] == "float32"
  for row in report["results"]:
    assert row["tokens"] == row["clients"] * 2 * 2 * 16 and row["peft"] == {"skipped": "--nopeft"}
    for way in [row["loop"]] + row["vmapped"]:
      assert abs(way["tokens_per_s"] - row["tokens"] / way["seconds"]) < 1e-6 * way["tokens_per_s"]
      assert abs(way["mfu"] - row["round_flops"] / way["seconds"] / report["matmul_peak_flops"]) < 1e-9
    assert [v["label"] for v in row["vmapped"]] == ["all", "2"]
  small, large = report["results"]
  assert large["round_flops"] == 2 * small["round_flops"] > 0
  backbone_bytes = 4 * report["frozen_parameters"]
  one_client, every_client = large["loop"]["planned_memory_gb"], large["vmapped"][0]["planned_memory_gb"]
  assert one_client * 1e9 > backbone_bytes  # The frozen decoder is counted, once.
  assert 0 < (every_client - one_client) * 1e9 < 3 * backbone_bytes
  assert "tokens/s" in result.stdout


def test_the_peft_text_baseline_is_the_jax_decoders_loss_on_the_same_weights(tmp_path):
  """The PEFT rows time the same computation: the JAX decoder's weights written as a Hugging
  Face checkpoint (`hf.save_causal_lm`) and read by transformers under `peft` give the JAX
  task's loss on the response tokens at round 0 (LoRA B = 0), its gradient with respect to
  every LoRA B, and as many LoRA numbers."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  import jax
  import peft
  import transformers

  from benchmarks.workloads import random_text_block, text_client_update_fn
  from hyperlora_jax.models import hf
  from hyperlora_jax.tasks.causal_lm import CausalLM

  _, frozen, trainable, model, config = text_client_update_fn("tiny")
  hf.save_causal_lm(str(tmp_path), model, frozen["variables"])
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
  lora_config = peft.LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, target_modules=["q_proj", "v_proj"])
  wrapped = peft.get_peft_model(reference, lora_config).eval()
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == count(trainable)
  torch_name = lambda path, factor: (
    f"base_model.model.model.layers.{int(path.split('/')[0].split('_')[1])}.self_attn."
    f"{ {'query': 'q_proj', 'value': 'v_proj'}[path.split('/')[-1]] }.lora_{factor}"
    f".default.weight"
  )
  parameters = dict(wrapped.named_parameters())
  with torch.no_grad():  # The JAX adapter's A (B is 0 in both): a [d_in, r] is lora_A [r, d_in].
    for path, factors in trainable["lora"].items():
      parameters[torch_name(path, "A")].copy_(torch.from_numpy(np.asarray(factors["a"]).T.copy()))
  block = jax.tree.map(lambda x: x[0, 0], random_text_block(1, 1, 2, 24, model.vocab_size))
  ids = torch.from_numpy(np.asarray(block["input_ids"])).long()
  labels = torch.where(torch.from_numpy(np.asarray(block["loss_mask"])) > 0, ids, -100)
  loss = wrapped(input_ids=ids, labels=labels).loss
  loss.backward()
  task = CausalLM(model, config.lora.alpha / config.lora.rank)
  (got, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(trainable, frozen, block, jax.random.key(0))
  np.testing.assert_allclose(float(got), float(loss), rtol=1e-5)
  # And its gradient (through the hand-written attention and nll backward) is transformers'.
  for path, factors in grads["lora"].items():
    want = parameters[torch_name(path, "B")].grad.numpy().T
    assert np.max(np.abs(want)) > 1e-6
    np.testing.assert_allclose(factors["b"], want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


def test_torch_baseline_model_has_the_jax_models_parameter_counts():
  """The PyTorch rows time the same model: as many frozen and trainable numbers as the JAX ViT."""
  torch = pytest.importorskip("torch")
  import jax
  from benchmarks.workloads import client_update_fn

  _, trainable, config = client_update_fn()
  m = config.model
  frozen = torch_baselines._frozen(torch, m.width, m.depth, m.patch_size, config.data.image_size, m.mlp_ratio)
  mine = torch_baselines._trainable(torch, m.width, m.depth, config.lora.rank, 10)
  from hyperlora_jax import models

  model = models.model_from_config(m, 10)
  shape = (1, config.data.image_size, config.data.image_size, 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros(shape))["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  backbone = count({k: v for k, v in params.items() if k != "head"})
  assert sum(t.numel() for t in frozen.values()) == backbone
  assert sum(t.numel() for t in mine.values()) == count(trainable)


def test_profile_reads_the_traced_operations_and_their_kinds_from_the_hlo(tmp_path):
  import jax
  import jax.numpy as jnp

  from benchmarks import profile_round

  fn = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w), axis=0))
  x, w = jnp.ones((256, 96)), jnp.ones((96, 80))
  compiled = fn.lower(x, w).compile()
  jax.block_until_ready(compiled(x, w))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(compiled(x, w))
  events = profile_round.read_operation_events(str(tmp_path))
  fused = profile_round.fused_opcodes(compiled.as_text())
  kinds = {profile_round.operation_kind(name, fused) for name, _ in events}
  assert events and all(seconds >= 0 for _, seconds in events)
  assert "matmul" in kinds  # The dot ran, whether as `dot.N` or inside a YNNPACK fusion.
  summary = profile_round.summarize(events, top=3, fused=fused)
  assert summary["operations_run"] == len(events)
  np.testing.assert_allclose(sum(summary["seconds_by_kind"].values()), sum(s for _, s in events) / 1e6)
  assert profile_round.operation_kind("transpose_copy_fusion.4") == "copy/transpose"
  assert profile_round.operation_kind("ynn_fusion.7", {"ynn_fusion.7": {"dot", "add"}}) == "matmul"
  assert profile_round.base_name("fusion.12.3") == "fusion"


@pytest.mark.slow  # Initializes the real-size model (86M / 151M parameters).
def test_the_base_model_benchmark_times_vit_b16_at_224_px():
  from benchmarks.workloads import client_update_fn

  _, trainable, config = client_update_fn(base_model=True)
  assert (config.model.width, config.model.depth, config.model.patch_size, config.data.image_size) == (768, 12, 16, 224)
  query = trainable["lora"]["encoder/block_0/attn/query"]
  assert query["a"].shape == (768, 16) and query["b"].shape == (16, 768)  # r = 16 on 768 -> 12 x 64.
  assert len(trainable["lora"]) == 24 and trainable["head"]["kernel"].shape == (768, 10)


@pytest.mark.slow  # Initializes the real-size model (86M / 151M parameters).
def test_the_base_clip_benchmark_times_openai_clip_b32_with_lora_on_both_towers():
  from benchmarks.workloads import client_update_fn

  _, trainable, config = client_update_fn(base_clip=True)
  model = config.model
  assert (model.name, model.width, model.patch_size, model.text_width, model.max_len, config.data.image_size) == (
    "clip",
    768,
    32,
    512,
    77,
    224,
  )
  assert model.gelu == "quick" and model.text_causal and model.text_pooling == "eot" and not model.patch_bias
  text_query = trainable["lora"]["text_tower/encoder/block_11/attn/query"]
  assert text_query["a"].shape == (512, 16) and trainable["lora"]["image_tower/encoder/block_0/attn/value"][
    "b"
  ].shape == (16, 768)
  assert len(trainable["lora"]) == 48 and trainable["head"] == {}  # 12 + 12 blocks x (query, value); no head.


@pytest.mark.parametrize("base_clip", [False, True])
def test_the_peft_baseline_is_the_jax_models_architecture_with_as_many_trainable_numbers(base_clip):
  """transformers' ViT (the default config's) and CLIP ViT-B/32 under peft: as many frozen numbers
  as the JAX backbone and as many trainable as its LoRA (+ head), so both sides time one model."""
  pytest.importorskip("peft")
  import jax
  from benchmarks.workloads import client_update_fn
  from hyperlora_jax import models

  _, trainable, config = client_update_fn(base_clip=base_clip)
  fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  build = peft_baselines.build_clip if base_clip else peft_baselines.build_vit
  model = build(fields, config.data.image_size, config.lora.rank, config.lora.alpha)
  model_jax = models.model_from_config(config.model, 10)
  shape = (1, config.data.image_size, config.data.image_size, 3)
  params = jax.eval_shape(model_jax.init, jax.random.key(0), jax.numpy.zeros(shape))["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "original_module" not in n)
  assert frozen == count({k: v for k, v in params.items() if k != "head"})
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count(trainable)


def _gpu_script_steps() -> list[tuple[int, str, list[str]]]:
  """(time limit, module, flags) of each `step` in benchmarks/gpu.sh, its variables filled in."""
  import re
  import shlex

  with open(os.path.join(ROOT, "benchmarks", "gpu.sh")) as f:
    script = f.read().replace("\\\n", " ")
  variables = dict(re.findall(r'^(\w+)="([^"]*)"$', script, flags=re.M))
  steps = []
  for line in re.findall(r"^step (.*)$", script, flags=re.M):
    for name, value in variables.items():
      line = line.replace(f"${name}", value)
    limit, _, dash_m, module, *flags = shlex.split(line.replace('"$out/', '"/tmp/'))
    assert dash_m == "-m"
    steps.append((int(limit), module, flags))
  return steps


def test_the_gpu_script_fits_its_device_budget_and_every_flag_parses():
  """benchmarks/gpu.sh runs on a lent accelerator, where a mistyped flag or model name costs
  device minutes: its steps' limits add up to under 10 minutes, and every step's flags parse
  with the module's own absl definitions (names, enum values, types)."""
  steps = _gpu_script_steps()
  assert {module for _, module, _ in steps} == {"benchmarks.round_speed", "benchmarks.text_round_speed"}
  assert sum(limit for limit, _, _ in steps) < 600
  assert any("tinyllama_1b" in flags for _, _, flags in steps)
  # One process per module (absl defines its flags once): each step's flags parsed in turn, from defaults.
  parse = (
    "import importlib, json, sys; from absl import flags; importlib.import_module(sys.argv[1])\n"
    "for argv in json.loads(sys.argv[2]):\n"
    "  flags.FLAGS.unparse_flags(); flags.FLAGS(['bench'] + argv); print('parsed', len(argv))"
  )
  for module in ("benchmarks.round_speed", "benchmarks.text_round_speed"):
    argvs = [flags for _, step_module, flags in steps if step_module == module]
    result = subprocess.run(
      [sys.executable, "-c", parse, module, json.dumps(argvs)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.stdout.split() == " ".join(f"parsed {len(a)}" for a in argvs).split(), (module, result.stderr[-2000:])
  bad = subprocess.run(
    [
      sys.executable,
      "-c",
      parse,
      "benchmarks.text_round_speed",
      json.dumps([["--model", "smollm_135m"], ["--model", "llama_7b"]]),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert bad.returncode != 0 and "llama_7b" in bad.stderr  # The check can fail, also after a good step.
  assert bad.stdout.split() == ["parsed", "2"]
