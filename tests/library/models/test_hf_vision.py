"""Hugging Face ViT checkpoints against the reference implementation (transformers), and PEFT
adapters against `peft`, through golden fixtures (tests/fixtures/make_reference_fixtures.py
wrote them with torch; versions in tests/fixtures/versions.json). No PyTorch here."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hyperlora_jax import lora, peft
from hyperlora_jax.models import hf
from hyperlora_jax.models import CheckpointError
from hyperlora_jax.models.vit import ViT

from tests.repo_paths import FIXTURES, ROOT

TOLERANCE = 1e-5  # Relative to the largest absolute value, as the issue asks.


def _outputs():
  with np.load(os.path.join(FIXTURES, "hf_vit_outputs.npz")) as f:
    return dict(f)


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _load(name, **overrides):
  _, arch, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, name))
  model = ViT(num_classes=3, **{**arch, **overrides})
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params, dropped = hf.vit_params(tensors, abstract)
  params["head"] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract["head"])
  return model, {"params": params}, dropped


def test_the_architecture_comes_from_the_checkpoints_config():
  name, arch, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, "hf_vit"))
  assert name == "vit"
  # config.json: hidden 32, 2 layers, 4 heads, intermediate 37 (not a multiple of 32), exact GELU.
  assert arch == {
    "patch_size": 4,
    "width": 32,
    "depth": 2,
    "num_heads": 4,
    "mlp_dim": 37,
    "gelu": "exact",
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
  }
  assert len(tensors) == 40  # 2 x 16 per block + cls, positions, patch conv (2), final norm (2), pooler (2).


@pytest.mark.parametrize(
  "name, reference", [("hf_vit", "vit_last_hidden_state"), ("hf_vit_sharded", "classifier_last_hidden_state")]
)
def test_a_hugging_face_vit_computes_the_references_hidden_states(name, reference):
  """ViTModel (one file) and ViTForImageClassification (sharded over 4+ files, 'vit.' names):
  every token's final state agrees with transformers' to 1e-5."""
  model, variables, dropped = _load(name)
  outputs = _outputs()
  hidden = model.apply(variables, jnp.asarray(outputs["pixel_values"]), return_hidden=True)
  assert hidden.shape == outputs[reference].shape == (2, 17, 32)
  assert _relative_error(hidden, outputs[reference]) <= TOLERANCE
  expected_dropped = (
    ["pooler.dense.bias", "pooler.dense.weight"] if name == "hf_vit" else ["classifier.bias", "classifier.weight"]
  )
  assert dropped == expected_dropped  # Named, not loaded: the run trains its own head.
  features = model.apply(variables, jnp.asarray(outputs["pixel_values"]), return_features=True)
  np.testing.assert_allclose(features, outputs[reference][:, 0], atol=TOLERANCE * np.abs(outputs[reference]).max())


def test_the_reference_check_can_fail_tanh_gelu_is_a_different_function():
  """What the fixtures catch: the project's earlier ViT (tanh GELU) on the same weights."""
  model, variables, _ = _load("hf_vit", gelu="tanh")
  outputs = _outputs()
  hidden = model.apply(variables, jnp.asarray(outputs["pixel_values"]), return_hidden=True)
  assert _relative_error(hidden, outputs["vit_last_hidden_state"]) > 5 * TOLERANCE  # 9e-5 here.


def test_sharded_checkpoints_are_read_from_every_shard_named_by_the_index():
  tensors, origin = hf.read_tensors(os.path.join(FIXTURES, "hf_vit_sharded"))
  with open(os.path.join(FIXTURES, "hf_vit_sharded", hf.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]
  assert origin == weight_map and len(set(origin.values())) >= 2


def _copy(name, tmp_path):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target)
  return target


def test_bad_checkpoints_are_refused_naming_the_tensor_and_its_file(tmp_path):
  sharded = _copy("hf_vit_sharded", tmp_path)
  tensors, origin = hf.read_tensors(str(sharded))
  name = "vit.encoder.layer.1.intermediate.dense.weight"
  shard = sharded / origin[name]
  content = load_file(str(shard))
  content[name] = content[name][:, :5]  # Misshapen.
  save_file(content, str(shard))
  tensors, origin = hf.read_tensors(str(sharded))
  model = ViT(num_classes=3, **hf.vit_arch(hf.read_config(str(sharded))))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  with pytest.raises(CheckpointError, match=rf"{name} \({origin[name]}\): shape \(37, 5\).*\(32, 37\)"):
    hf.vit_params(tensors, abstract, origin)
  del tensors["vit.layernorm.weight"]
  tensors["vit.encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)
  with pytest.raises(CheckpointError, match=r"missing vit.layernorm.weight .*unexpected tensors.*layer.2.output"):
    hf.vit_params(tensors, abstract, origin)


def test_what_is_not_a_supported_checkpoint_says_what_is(tmp_path):
  plain = _copy("hf_vit", tmp_path)
  with pytest.raises(CheckpointError, match="no config.json"):
    hf.read_checkpoint(str(tmp_path))
  os.rename(plain / hf.WEIGHTS_FILE, plain / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="neither model.safetensors.*safe_serialization"):
    hf.read_checkpoint(str(plain))
  (plain / hf.WEIGHTS_FILE).write_bytes(b"damaged")
  with pytest.raises(CheckpointError, match="model.safetensors: cannot read as safetensors"):
    hf.read_checkpoint(str(plain))
  with pytest.raises(CheckpointError, match="model_type 'bert' is not supported here; supported: vit .*clip"):
    hf.architecture({"model_type": "bert"})
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    hf.vit_arch({**hf.read_config(str(plain)), "hidden_act": "relu"})


def _assert_adapted_vit_matches(adapter, config, reference_file):
  """The fixture ViT with `adapter` gives the reference's adapted last hidden state (to 1e-5),
  which differs from the plain one (the adapter does something)."""
  model, variables, _ = _load("hf_vit")
  outputs = _outputs()
  with np.load(os.path.join(FIXTURES, reference_file)) as f:
    reference = f["adapted_last_hidden_state"]
  adapted = lora.apply(
    model,
    variables,
    adapter,
    jnp.asarray(outputs["pixel_values"]),
    scale=peft.scale_from_config(config),
    return_hidden=True,
  )
  assert _relative_error(adapted, reference) <= TOLERANCE
  assert _relative_error(reference, outputs["vit_last_hidden_state"]) > 0.1


def test_an_exported_adapter_attaches_to_the_reference_and_loads_back():
  """The fixture adapter was written by `peft.save_peft` with transformers 5's module names;
  `peft.PeftModel.from_pretrained` attached it (the script fails on missing keys) and its
  output is the reference here: the project's adapted model must give it."""
  directory = os.path.join(FIXTURES, "hf_vit_adapter")
  adapter, config = peft.load_peft(directory)
  _assert_adapted_vit_matches(adapter, config, "hf_vit_adapter.npz")
  assert set(adapter) == {f"encoder/block_{i}/{m}" for i in range(2) for m in ("attn/query", "attn/value", "mlp/fc1")}
  # Only LoraConfig's fields, and exact module names (nothing else named `query` gets hooked).
  assert set(config) <= {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "lora_dropout",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "task_type",
    "base_model_name_or_path",
  }
  assert "layers.1.mlp.fc1" in config["target_modules"] and "layers.0.attention.q_proj" in config["target_modules"]


def test_an_adapter_trained_elsewhere_loads_by_the_models_module_names(tmp_path):
  """Without the project's paths file (a PEFT adapter from a torch run), the model's adaptable
  paths and the naming map the module names back; a module the model lacks is refused."""
  directory = _copy("hf_vit_adapter", tmp_path)
  os.remove(directory / peft.PATHS_FILE)
  expected, _ = peft.load_peft(os.path.join(FIXTURES, "hf_vit_adapter"))
  model, variables, _ = _load("hf_vit")
  paths = lora.find_targets(
    model, variables, jnp.zeros((1, 16, 16, 3)), target_regex=r"encoder/block_\d+/(attn|mlp)/\w+"
  )
  loaded, _ = peft.load_peft(str(directory), paths=list(paths), module_name=hf.vit_module_namer())
  assert set(loaded) == set(expected)
  for path in expected:
    np.testing.assert_array_equal(loaded[path]["a"], expected[path]["a"])
  with pytest.raises(ValueError, match="none of the model's adapted layers"):
    peft.load_peft(str(directory), paths=list(paths), module_name=hf.vit_module_namer(transformers_version=4))


def test_a_list_valued_image_size_loads_and_a_non_square_one_is_named(tmp_path):
  """image_size / patch_size given as [n, n] (transformers accepts it) load, through the library
  and the CLI; a non-square pair is named."""
  from configs import vision_language

  directory = _copy("hf_vit", tmp_path)
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "image_size": [16, 16], "patch_size": [4, 4]}))
  assert hf.image_size(hf.read_config(str(directory))) == 16
  assert hf.vit_arch(hf.read_config(str(directory)))["patch_size"] == 4
  (directory / "config.json").write_text(json.dumps({**config, "image_size": [16, 24]}))
  with pytest.raises(hf.CheckpointError, match=r"image_size=\[16, 24\]: only square sizes"):
    hf.image_size(hf.read_config(str(directory)))
  clip = _copy("hf_clip", tmp_path)
  config = json.loads((clip / "config.json").read_text())
  config["vision_config"]["image_size"] = [16, 16]
  (clip / "config.json").write_text(json.dumps(config))
  assert vision_language.get_config(f"checkpoint={clip}").data.image_size == 16


def test_module_names_follow_the_transformers_version():
  assert (
    hf.vit_module_name("encoder/block_3/attn/query", transformers_version=4)
    == "encoder.layer.3.attention.attention.query"
  )
  assert hf.vit_module_name("encoder/block_3/mlp/fc2", "vit.", transformers_version=5) == "vit.layers.3.mlp.fc2"
  assert hf.vit_module_name("encoder/block_3/mlp/fc2", transformers_version=4) == "encoder.layer.3.output.dense"
  assert hf.vit_module_name("head") is None
  with pytest.raises(ValueError, match="transformers_version=3"):
    hf.vit_module_namer(transformers_version=3)


def _run_cli(cache_dirs, workdir, cache_dir, fixture: str, method: str, *flags) -> str:
  """`experiments.main` on the smoke config with `pretrain.checkpoint` = the fixture, `method`
  for 2 rounds, in a subprocess; its output (it must succeed)."""
  import subprocess
  import sys

  root = ROOT
  command = [
    sys.executable,
    "-m",
    "experiments.main",
    "--config",
    f"configs/default.py:smoke,method={method}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={cache_dirs['data_dir']}",
    f"--config.pretrain.cache_dir={cache_dir}",
    "--config.fed.num_rounds=2",
    f"--config.pretrain.checkpoint={os.path.join(FIXTURES, fixture)}",
    *flags,
  ]
  result = subprocess.run(
    command, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout + result.stderr


def test_the_cli_runs_fedit_on_a_hugging_face_checkpoint(cache_dirs, tmp_path):
  """`pretrain.checkpoint=DIR`: the architecture comes from DIR's config.json (the smoke config's
  16-wide ViT becomes the checkpoint's 32-wide one), the weights are the checkpoint's (nothing
  pretrained), and FedIT trains and evaluates (HyperLoRA: on the CLIP checkpoint below)."""
  workdir = tmp_path / "run"
  output = _run_cli(cache_dirs, workdir, tmp_path / "no_cache", "hf_vit", "fedit")
  assert "model.width=32" in output and "model.gelu='exact'" in output
  assert "not loaded: pooler.dense.bias, pooler.dense.weight" in output
  assert not os.listdir(tmp_path / "no_cache")  # Nothing was pretrained (preflight made the directory).
  with open(workdir / "config.json") as f:
    recorded = json.load(f)
  assert recorded["model"]["width"] == 32 and recorded["pretrain"]["checkpoint"].endswith("hf_vit")
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["round"] == 2 and 0.0 < records[-1]["personalized_accuracy_mean"] <= 1.0


def _reference_script():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "make_reference_fixtures", os.path.join(FIXTURES, "make_reference_fixtures.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # Imports no torch at the top level.
  return module


def _clip_outputs():
  with np.load(os.path.join(FIXTURES, "hf_clip_outputs.npz")) as f:
    return dict(f)


def _load_clip(**overrides):
  from hyperlora_jax.models import build_model

  outputs = _clip_outputs()
  name, arch, tensors, origin = hf.read_checkpoint(os.path.join(FIXTURES, "hf_clip"))
  prompt_ids = tuple(map(tuple, outputs["input_ids"].tolist()))
  model = build_model(name, len(prompt_ids), **{**arch, **overrides}, prompt_ids=prompt_ids)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params, dropped = hf.load_params(name, tensors, abstract, origin)
  return model, {"params": params}, dropped, outputs


def test_a_hugging_face_clip_computes_the_references_embeddings_and_zero_shot_logits():
  name, arch, _, _ = hf.read_checkpoint(os.path.join(FIXTURES, "hf_clip"))
  assert name == "clip" and arch["gelu"] == "quick" and arch["layer_norm_eps"] == 1e-5
  assert arch["text_causal"] and arch["text_pooling"] == "eot" and arch["image_pre_norm"] and not arch["patch_bias"]
  assert (arch["width"], arch["text_width"], arch["mlp_dim"], arch["text_mlp_dim"]) == (24, 32, 40, 37)
  model, variables, dropped, outputs = _load_clip()
  assert dropped == []
  x = jnp.asarray(outputs["pixel_values"])
  tokens = jnp.asarray(outputs["input_ids"])
  checks = {
    "logits_per_image": model.apply(variables, x),
    "image_embeds": model.apply(variables, x, method="encode_image"),
    "text_embeds": model.apply(variables, tokens, method="encode_text"),
    "image_pooled": model.apply(variables, x, return_features=True, method=lambda m, x, **k: m.image_tower(x, **k)),
    "text_pooled": model.apply(variables, tokens, method=lambda m, t: m.text_tower(t)),
    "text_last_hidden_state": model.apply(variables, tokens, method=lambda m, t: m.text_tower(t, return_hidden=True)),
  }
  for key, got in checks.items():
    assert got.shape == outputs[key].shape, key
    assert _relative_error(got, outputs[key]) <= TOLERANCE, key


def test_a_clip_logit_scale_above_ln_100_is_applied_as_transformers_does():
  """transformers' CLIPModel multiplies by exp(logit_scale) unclamped; a checkpoint with
  logit_scale 5.0 (> ln 100) gives its logits (a clamp at 100 is 0.33 relative off). The
  fixture's reference is at 2.9, and logits are linear in exp(logit_scale)."""
  model, variables, _, outputs = _load_clip()
  assert float(variables["params"]["logit_scale"]) == pytest.approx(2.9)
  hot = {"params": {**variables["params"], "logit_scale": jnp.float32(5.0)}}
  logits = model.apply(hot, jnp.asarray(outputs["pixel_values"]))
  want = outputs["logits_per_image"] * np.exp(5.0 - 2.9)
  assert _relative_error(logits, want) <= TOLERANCE
  from hyperlora_jax.models import clip

  clamped = clip.clamp_logit_scale(hot)  # Training's rule (pretraining applies it after each step).
  assert float(clamped["params"]["logit_scale"]) == pytest.approx(np.log(100.0))


@pytest.mark.parametrize("change", [{"text_causal": False}, {"text_pooling": "mean"}, {"gelu": "tanh"}])
def test_the_clip_check_can_fail_each_architecture_difference_is_another_function(change):
  """The project's earlier CLIP-style choices (bidirectional text, mean pooling, tanh GELU) on
  the same weights miss the reference: the fixture check catches each."""
  model, variables, _, outputs = _load_clip(**change)
  logits = model.apply(variables, jnp.asarray(outputs["pixel_values"]))
  assert _relative_error(logits, outputs["logits_per_image"]) > 5 * TOLERANCE


def test_the_clip_tokenizer_gives_the_references_ids_from_tokenizer_json_or_vocab_and_merges(tmp_path):
  """Punctuation, digits, accents, CJK, an emoji, tabs and newlines, and a text past the
  context (truncated, end-of-text kept), each against transformers' CLIPTokenizer; the same
  from OpenAI's vocab.json + merges.txt (written here from tokenizer.json's model)."""
  texts = _reference_script().TOKENIZER_TEXTS
  expected = _clip_outputs()["tokenizer_ids"]
  ids = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_clip"))(texts, expected.shape[1])
  np.testing.assert_array_equal(ids, expected)
  assert ids[-1, -1] == ids[0, np.argmax(ids[0] == ids[0, -1])]  # The long text ends in end-of-text.
  with open(os.path.join(FIXTURES, "hf_clip", "tokenizer.json")) as f:
    bpe = json.load(f)["model"]
  (tmp_path / "vocab.json").write_text(json.dumps(bpe["vocab"]))
  merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  from_files = hf.Tokenizer.from_directory(str(tmp_path))(texts, expected.shape[1])
  np.testing.assert_array_equal(from_files, expected)


def test_images_are_normalized_by_the_checkpoints_image_processor():
  """OpenAI's mean and std from preprocessor_config.json, as CLIPImageProcessor applies them."""
  from experiments.runner import backbone as backbone_lib

  outputs = _clip_outputs()
  got = backbone_lib.image_preprocess(os.path.join(FIXTURES, "hf_clip"))(jnp.asarray(outputs["images"]))
  np.testing.assert_allclose(got, outputs["pixel_values"], atol=1e-5)
  no_processor = backbone_lib.image_preprocess(os.path.join(FIXTURES, "hf_vit"))  # No processor file: [-1, 1].
  np.testing.assert_allclose(no_processor(jnp.asarray(outputs["images"])), outputs["images"] / 127.5 - 1.0, atol=1e-6)


def test_an_exported_clip_adapter_attaches_to_the_reference_on_both_towers():
  adapter, config = peft.load_peft(os.path.join(FIXTURES, "hf_clip_adapter"))
  model, variables, _, outputs = _load_clip()
  with np.load(os.path.join(FIXTURES, "hf_clip_adapter.npz")) as f:
    reference = f["logits_per_image"]
  adapted = lora.apply(
    model, variables, adapter, jnp.asarray(outputs["pixel_values"]), scale=peft.scale_from_config(config)
  )
  assert _relative_error(adapted, reference) <= TOLERANCE
  assert _relative_error(reference, outputs["logits_per_image"]) > 0.1
  assert {"vision_model.encoder.layers.1.self_attn.v_proj", "text_model.encoder.layers.0.mlp.fc1"} <= set(
    config["target_modules"]
  )


@pytest.mark.slow  # 40 s; HyperLoRA on both towers also runs in test_benchmark_configs.
def test_the_cli_runs_hyperlora_on_a_hugging_face_clip(cache_dirs, tmp_path):
  """A ViT config given a CLIP checkpoint becomes the checkpoint's CLIP: zero-shot prompts by
  its tokenizer, images by its processor, LoRA on both towers; HyperLoRA (signatures of the
  checkpoint's image tower, generator, synthesizer) trains and evaluates."""
  workdir = tmp_path / "run"
  output = _run_cli(
    cache_dirs,
    workdir,
    tmp_path / "no_cache",
    "hf_clip",
    "hyperlora",
    "--config.lora.target_regex=(image|text)_tower/encoder/block_\\d+/attn/(query|value)",
  )
  assert "model.name='clip'" in output
  with open(workdir / "config.json") as f:
    recorded = json.load(f)
  assert recorded["model"]["text_pooling"] == "eot" and recorded["method"] == "hyperlora"
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["round"] == 2 and 0.0 < records[-1]["personalized_accuracy_mean"] <= 1.0
  assert "meta_loss" in records[-1]  # The synthesizer's held-out step ran.


def test_an_adapter_peft_itself_wrote_loads_as_the_projects_with_the_same_outputs():
  """`peft.get_peft_model(...).save_pretrained` (transformers 5 names as target_modules' last
  components, peft's own config fields): read by the model's paths and naming, applied here, it
  gives the reference's adapted output."""
  directory = os.path.join(FIXTURES, "hf_vit_peft_adapter")
  model, variables, _ = _load("hf_vit")
  paths = lora.find_targets(
    model, variables, jnp.zeros((1, 16, 16, 3)), target_regex=r"encoder/block_\d+/(attn/\w+|mlp/fc\d)"
  )
  adapter, config = peft.load_peft(directory, paths=list(paths), module_name=hf.module_namer("vit"))
  assert set(adapter) == {f"encoder/block_{i}/{m}" for i in range(2) for m in ("attn/query", "attn/value", "mlp/fc1")}
  _assert_adapted_vit_matches(adapter, config, "hf_vit_peft_adapter.npz")


def test_a_checkpoint_saved_in_bfloat16_loads_as_float32(tmp_path):
  """Many checkpoints are saved in bf16 or fp16: their tensors load (as float32) with bf16's precision."""
  import ml_dtypes

  directory = _copy("hf_vit", tmp_path)
  tensors = load_file(str(directory / hf.WEIGHTS_FILE))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, str(directory / hf.WEIGHTS_FILE))
  _, arch, half, origin = hf.read_checkpoint(str(directory))
  model = ViT(num_classes=3, **arch)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params, _ = hf.vit_params(half, abstract, origin)
  query = params["encoder"]["block_0"]["attn"]["query"]["kernel"]
  assert query.dtype == np.float32
  np.testing.assert_allclose(query, tensors["encoder.layer.0.attention.attention.query.weight"].T, rtol=1e-2, atol=1e-3)


def test_a_checkpoint_directory_that_is_not_one_is_refused_naming_the_field(smoke_config, tmp_path):
  from experiments.runner import backbone as backbone_lib

  smoke_config.pretrain.checkpoint = str(tmp_path)
  with pytest.raises(CheckpointError, match="pretrain.checkpoint: .*no config.json.*supported: vit"):
    backbone_lib.with_checkpoint_architecture(smoke_config)


def _variant_outputs():
  with np.load(os.path.join(FIXTURES, "hf_vit_variants_outputs.npz")) as f:
    return dict(f)


def _load_at(name, size, **overrides):
  """(ViT, variables) from fixture `name`, the model built for `size` px images."""
  _, arch, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, name))
  model = ViT(num_classes=3, **{**arch, **overrides})
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  params, _ = hf.vit_params(tensors, abstract)
  params["head"] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract["head"])
  return model, {"params": params}


def test_a_vit_without_query_key_value_biases_computes_the_references_hidden_states():
  """ViTConfig(qkv_bias=False): the three projections have no bias param (a model with them
  would find no tensor to load) and every token's state agrees with transformers'."""
  _, arch, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, "hf_vit_nobias"))
  assert arch["qkv_bias"] is False and not any(k.endswith("query.bias") for k in tensors)
  model, variables = _load_at("hf_vit_nobias", 16)
  attn = variables["params"]["encoder"]["block_0"]["attn"]
  assert set(attn["query"]) == {"kernel"} and set(attn["out"]) == {"kernel", "bias"}
  outputs = _variant_outputs()
  hidden = model.apply(variables, jnp.asarray(outputs["nobias_pixel_values"]), return_hidden=True)
  assert _relative_error(hidden, outputs["nobias_last_hidden_state"]) <= TOLERANCE
  with pytest.raises(CheckpointError, match="missing .*attention.query.bias"):
    _load_at("hf_vit_nobias", 16, qkv_bias=True)


@pytest.mark.parametrize("size", [24, 8])
def test_a_vit_built_for_another_image_size_matches_interpolate_pos_encoding(size):
  """The checkpoint's 4x4 position grid (16 px, patch 4) resized to 6x6 (24 px) and 2x2
  (8 px) as transformers' `interpolate_pos_encoding=True` does: every token's state agrees."""
  model, variables = _load_at("hf_vit_nobias", size)
  outputs = _variant_outputs()
  assert variables["params"]["pos_embedding"].shape == (1, 1 + (size // 4) ** 2, 32)
  hidden = model.apply(variables, jnp.asarray(outputs[f"resized_pixel_values_{size}"]), return_hidden=True)
  assert _relative_error(hidden, outputs[f"nobias_last_hidden_state_{size}"]) <= TOLERANCE


def test_the_resize_check_can_fail_jax_bicubic_is_another_kernel():
  """What the fixture catches: jax.image.resize's bicubic (Keys a = -0.5, not PyTorch's -0.75)
  on the same position grid moves the states by more than the tolerance."""
  model, variables = _load_at("hf_vit_nobias", 24)
  _, _, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, "hf_vit_nobias"))
  table = tensors["embeddings.position_embeddings"][0]  # [1 + 16, D].
  grid = jax.image.resize(table[1:].reshape(4, 4, -1), (6, 6, table.shape[-1]), "bicubic")
  variables["params"]["pos_embedding"] = jnp.concatenate([table[:1], grid.reshape(36, -1)])[None]
  outputs = _variant_outputs()
  hidden = model.apply(variables, jnp.asarray(outputs["resized_pixel_values_24"]), return_hidden=True)
  assert _relative_error(hidden, outputs["nobias_last_hidden_state_24"]) > 5 * TOLERANCE


def test_the_bicubic_weights_are_keys_kernel_with_pytorchs_a_and_clamped_borders():
  """Hand count at 4 -> 2 (x = 0.5 and 2.5, t = 0.5): taps (-1, 0, 1, 2) weigh (-3/32, 19/32,
  19/32, -3/32); tap -1 clamps onto 0 and tap 4 onto 3. Same size is the identity; every row
  sums to 1."""
  np.testing.assert_allclose(hf._bicubic_matrix(4, 2), [[0.5, 19 / 32, -3 / 32, 0], [0, -3 / 32, 19 / 32, 0.5]])
  np.testing.assert_array_equal(hf._bicubic_matrix(5, 5), np.eye(5))
  np.testing.assert_allclose(hf._bicubic_matrix(4, 7).sum(1), 1.0)
  table = np.arange(2 * (1 + 9), dtype=np.float32).reshape(1, 10, 2)
  resized = hf.resize_position_table(table, 1 + 16)
  assert resized.shape == (1, 17, 2) and resized.dtype == np.float32
  np.testing.assert_array_equal(resized[0, 0], table[0, 0])  # The class token's row is kept.
  with pytest.raises(CheckpointError, match="must be square"):
    hf.resize_position_table(table, 1 + 12)


def test_a_clip_image_tower_built_for_another_image_size_matches_interpolate_pos_encoding():
  from hyperlora_jax.models import build_model

  outputs, clip_outputs = _variant_outputs(), _clip_outputs()
  name, arch, tensors, _ = hf.read_checkpoint(os.path.join(FIXTURES, "hf_clip"))
  prompt_ids = tuple(map(tuple, clip_outputs["input_ids"].tolist()))
  model = build_model(name, len(prompt_ids), **arch, prompt_ids=prompt_ids)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 24, 24, 3)))["params"]
  params, _ = hf.load_params(name, tensors, abstract)
  x = jnp.asarray(outputs["clip_pixel_values_24"])
  pooled = model.apply({"params": params}, x, return_features=True, method=lambda m, x, **k: m.image_tower(x, **k))
  assert _relative_error(pooled, outputs["clip_image_pooled_24"]) <= TOLERANCE
  embeds = model.apply({"params": params}, pooled, method=lambda m, x: m.image_projection(x))
  assert _relative_error(embeds, outputs["clip_image_embeds_24"]) <= TOLERANCE


def test_the_runner_loads_a_checkpoint_at_another_image_size_and_says_so(smoke_config, tmp_path):
  from experiments.runner import backbone as backbone_lib, config_validation, methods
  from experiments.runner.settings import backbone_settings

  smoke_config.pretrain.checkpoint = os.path.join(FIXTURES, "hf_vit_nobias")
  smoke_config.data.image_size = 24
  config = backbone_lib.with_checkpoint_architecture(smoke_config, log=lambda _: None)
  assert config.model.qkv_bias is False
  config_validation.validate_config(
    config, methods.METHODS
  )  # 24 px on a 16 px checkpoint: allowed, patch 4 divides it.
  logs = []
  backbone, _ = backbone_lib.load_hf_backbone(backbone_settings(config), logs.append)
  assert backbone["params"]["pos_embedding"].shape == (1, 37, 32)
  assert any("position embeddings resized from 16 px to data.image_size=24 px" in line for line in logs)
  config.data.image_size = 26
  with pytest.raises(config_validation.ConfigError, match="model.patch_size"):
    config_validation.validate_config(config, methods.METHODS)


@pytest.mark.parametrize("task", ["image", "text"])
def test_a_run_opens_its_checkpoint_once_validation_building_and_loading_read_that_value(
  task, smoke_config, cache_dirs, monkeypatch, tmp_path
):
  """config.json is parsed once and the tensors read once while a run is validated, its
  `model.*` set, its backbone loaded and its round built: every step reads the one opened
  `hf.Checkpoint`."""
  from configs import instruction_tuning
  from experiments.runner import backbone as backbone_lib
  from experiments.runner.experiment import build_experiment
  from hyperlora_jax.models.hf import checkpoint as checkpoint_lib

  config_reads, tensor_reads = [], []
  read_config, read_tensors = checkpoint_lib.read_config, checkpoint_lib.read_tensors
  monkeypatch.setattr(checkpoint_lib, "read_config", lambda d, *a: config_reads.append(d) or read_config(d, *a))
  monkeypatch.setattr(checkpoint_lib, "read_tensors", lambda d: tensor_reads.append(d) or read_tensors(d))
  monkeypatch.setattr(backbone_lib, "_OPENED", {})
  if task == "image":
    config = smoke_config
    config.pretrain.checkpoint = os.path.join(FIXTURES, "hf_clip")
  else:
    records = tmp_path / "records.jsonl"
    records.write_text(
      "".join(
        json.dumps({"instruction": f"Say {i}.", "context": "", "response": f"{i}.", "category": f"c{i % 2}"}) + "\n"
        for i in range(12)
      )
    )
    config = instruction_tuning.get_config(
      f"smoke,method=fedit,checkpoint={os.path.join(FIXTURES, 'hf_llama')},data={records}"
    )
    config.data.data_dir, config.pretrain.cache_dir = str(tmp_path / "tokenized"), cache_dirs["cache_dir"]
    config.data.num_clients, config.fed.clients_per_round, config.data.max_len = 2, 2, 160
  experiment = build_experiment(config, log=lambda _: None)
  assert config_reads == [config.pretrain.checkpoint] and tensor_reads == [config.pretrain.checkpoint]
  assert experiment.fed_round is not None


def test_every_family_module_is_registered_once_with_model_types_of_its_own():
  """A new family is one module in models/hf/ defining FAMILY, listed in `FAMILIES`; a module
  left out of the registry, or two families claiming one model_type, fails here."""
  shared = {"__init__", "checkpoint", "family", "reading", "tensors", "tokenizer"}
  modules = {
    name.removesuffix(".py") for name in os.listdir(os.path.dirname(hf.__file__)) if name.endswith(".py")
  } - shared
  registered = [family.architecture.__module__.rsplit(".", 1)[-1] for family in hf.FAMILIES]
  assert sorted(registered) == sorted(modules) == ["clip", "llama", "vit"]
  model_types = [t for family in hf.FAMILIES for t in family.model_types]
  assert len(model_types) == len(set(model_types))
  for family in hf.FAMILIES:
    assert hf.family_named(family.model_name) is family
    assert all(hf.family_of({"model_type": t}) is family for t in family.model_types)
  with pytest.raises(CheckpointError, match="model_type 'mixtral' is not supported here; supported: vit"):
    hf.family_of({"model_type": "mixtral"})
