"""Every check of a run's config, in one place, before anything is loaded or compiled.

  validate_config      the fields alone (types, ranges, allowed values, combinations)
  preflight            against dataset metadata and the model's shapes (no example or weight read)
  check_mesh_fits      against the devices of the clients mesh axis (returns the mesh)
  check_method_fits    the method's aggregator capabilities against the server optimizer and ranks

Every error is a `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections

from experiments.runner import backbone, memory, methods, pretrain
from experiments.runner.config_facts import TASKS, ConfigError, is_preference, is_text  # noqa: F401 (ConfigError: raised here, read by users)
from experiments.runner.data import loader
from experiments.runner.data.partition import ALLOWED_PARTITIONS
from experiments.runner.optimizers import ALLOWED_OPTIMIZERS, ALLOWED_SCHEDULES
from experiments.runner.settings import backbone_settings
from hyperlora_jax import federated, lora, models, quantize
from hyperlora_jax.hyper.generator import GENERATOR_LOSSES
from hyperlora_jax.hyper.signatures import parse_kinds, statistic_kinds
from hyperlora_jax.hyper.synthesis import CORRECTORS
from hyperlora_jax.models import ALLOWED_MODELS, arch_fields
from hyperlora_jax.models.clip import TEXT_POOLINGS
from hyperlora_jax.models import CheckpointError
from hyperlora_jax.models.vit import GELUS, POOLS
from hyperlora_jax.primitives import clients_axis_size, has_host_memory, make_mesh

ALLOWED_HEAD_POLICIES = ("shared", "local")
ALLOWED_BACKBONE_DTYPES = ("float32", "bfloat16", "auto")
ALLOWED_QUANTIZATIONS = ("none",) + quantize.KINDS
ALLOWED_FEEDS = ("round", "chunk", "host")
# Text runs partition records by their group (one client per group) or by a Dirichlet over groups.
TEXT_PARTITIONS = ("one_domain_per_client", "dirichlet_label_skew")


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")


def _positive_int(config, field: str, minimum: int = 1) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  _require(
    isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
    field,
    f"must be an integer >= {minimum}, got {value!r}",
  )


def _one_of(value, allowed, field: str) -> None:
  _require(value in allowed, field, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """model.name is known, model.<field> are its architecture fields, sizes fit together."""
  model = config.model
  _one_of(model.name, ALLOWED_MODELS, "model.name")
  allowed = arch_fields(model.name)
  for field in model:
    _require(
      field == "name" or field in allowed,
      f"model.{field}",
      f"not a field of model {model.name!r}; its fields: {', '.join(allowed)}",
    )
  for field, default in allowed.items():
    if isinstance(default, bool) and field in model:
      _require(isinstance(model[field], bool), f"model.{field}", f"must be True or False, got {model[field]!r}")
    elif isinstance(default, int) and field in model:
      # mlp_dim 0: by mlp_ratio; eot_id -1: the largest id.
      _positive_int(config, f"model.{field}", minimum={"mlp_dim": 0, "text_mlp_dim": 0, "eot_id": -1}.get(field, 1))
  arch = {**allowed, **{k: v for k, v in model.items() if k != "name"}}
  if "gelu" in arch:
    _one_of(arch["gelu"], GELUS, "model.gelu")
  if "pool" in arch:
    _one_of(arch["pool"], POOLS, "model.pool")
  if "text_pooling" in arch:
    _one_of(arch["text_pooling"], TEXT_POOLINGS, "model.text_pooling")
  if "layer_norm_eps" in arch:
    _require(arch["layer_norm_eps"] > 0, "model.layer_norm_eps", f"must be > 0, got {arch['layer_norm_eps']}")
  _require(
    config.data.image_size % arch["patch_size"] == 0,
    "model.patch_size",
    f"{arch['patch_size']} must divide data.image_size={config.data.image_size}",
  )
  for width, heads in (("width", "num_heads"), ("text_width", "text_heads")):
    if heads in arch:
      _require(
        arch[width] % arch[heads] == 0, f"model.{heads}", f"{arch[heads]} must divide model.{width}={arch[width]}"
      )
  if "vocab_size" in model:  # Ids 0 and 1 are reserved (padding, start).
    _positive_int(config, "model.vocab_size", minimum=3)
  if "mlp_ratio" in arch:
    _require(
      arch["mlp_ratio"] > 0 and int(arch["width"] * arch["mlp_ratio"]) >= 1,
      "model.mlp_ratio",
      f"must give an MLP of at least one unit (model.width x mlp_ratio >= 1), got {arch['mlp_ratio']}",
    )
  if "prompt_template" in arch:
    _require(
      "{}" in arch["prompt_template"],
      "model.prompt_template",
      f"must contain '{{}}' for the class name, got {arch['prompt_template']!r}",
    )
  npz, checkpoint = config.pretrain.get("npz_path", ""), config.pretrain.get("checkpoint", "")
  _require(
    bool(npz) or bool(checkpoint) or bool(config.pretrain.data_name),
    "pretrain.npz_path",
    "this config has no pretraining data (pretrain.data_name=''): give a real checkpoint, "
    "e.g. `:npz=/path/ViT-B_16.npz` or `:checkpoint=/path/vit-base-patch16-224` (see the config's docstring)",
  )
  if checkpoint:
    _require(not npz, "pretrain.checkpoint", "give pretrain.checkpoint or pretrain.npz_path, not both")
    _require(os.path.isdir(checkpoint), "pretrain.checkpoint", f"no such directory: {checkpoint!r}")
    try:
      opened = backbone.open_directory(checkpoint)
      name, checkpoint_arch = opened.model_name, opened.architecture
      if name == "clip":
        opened.require_tokenizer()
    except CheckpointError as e:
      raise ConfigError(f"pretrain.checkpoint: {e}") from None
    _require(
      model.name == name and all(arch.get(k) == v for k, v in checkpoint_arch.items()),
      "model",
      f"must be the checkpoint's architecture ({name}, {checkpoint_arch}); the runner sets it "
      f"(backbone.with_checkpoint_architecture)",
    )
  if npz:
    _one_of(model.name, ("vit", "mixer"), "pretrain.npz_path (model.name)")
    _require(os.path.isfile(npz), "pretrain.npz_path", f"no such file: {npz!r}")


def _validate_preference(config: ml_collections.ConfigDict) -> None:
  """What a DPO run (`configs/preference_tuning.py`) takes beyond a text run's fields."""
  from hyperlora_jax import text
  from hyperlora_jax.tasks import preference

  data = config.data
  _one_of(data.layout, text.PREFERENCE_LAYOUTS, "data.layout")
  dpo = config.get("dpo", {})
  beta, loss_type, smoothing = dpo.get("beta", 0.1), dpo.get("loss_type", "sigmoid"), dpo.get("label_smoothing", 0.0)
  _require(
    isinstance(beta, (int, float)) and beta > 0, "dpo.beta", f"must be a positive number (DPO's β), got {beta!r}"
  )
  _one_of(loss_type, preference.LOSS_TYPES, "dpo.loss_type")
  _require(
    isinstance(smoothing, (int, float)) and 0 <= smoothing < 0.5 and (not smoothing or loss_type == "sigmoid"),
    "dpo.label_smoothing",
    f"must be at least 0 and below 0.5, with dpo.loss_type='sigmoid' (conservative DPO), got {smoothing!r}",
  )
  _require(
    not data.packing,
    "data.packing",
    "packs instruction records; a preference run's pairs are read one pair a batch entry",
  )
  _require(not data.stream, "data.stream", "a preference run holds its pairs in memory (data.stream=False)")
  _require(
    not (data.chat_template and data.layout == "hh_rlhf"),
    "data.chat_template",
    "HH-RLHF's dialogues carry their own Human / Assistant turns; no chat template is applied to them",
  )
  _require(
    not config.gen.examples_per_client,
    "gen.examples_per_client",
    "generation scoring reads instruction records; a preference run has pairs (0 here)",
  )


def _validate_text(config: ml_collections.ConfigDict) -> None:
  """The data, model and pretrain fields of a text run (`configs/instruction_tuning.py`)."""
  from experiments.runner import pretrain_text
  from experiments.runner.data import instructions
  from hyperlora_jax import text

  data = config.data
  if is_preference(config):
    _validate_preference(config)
  else:
    _one_of(data.layout, sorted(text.LAYOUTS), "data.layout")
  _require(
    data.name == instructions.EMBEDDED_TEXT or data.name.endswith(instructions.FORMATS),
    "data.name",
    f"must be {instructions.EMBEDDED_TEXT!r} or a {' / '.join(instructions.FORMATS)} file, got {data.name!r}",
  )
  _require(
    data.name == instructions.EMBEDDED_TEXT or os.path.isfile(data.name), "data.name", f"no such file: {data.name!r}"
  )
  _require(
    0 < data.test_fraction < 1,
    "data.test_fraction",
    f"must be in (0, 1): each group's held-out records are what a text run evaluates on, got {data.test_fraction}",
  )
  _one_of(data.partition, TEXT_PARTITIONS, "data.partition")
  _positive_int(config, "data.num_clients", minimum=0)
  _require(
    data.num_clients >= 1 or data.partition == "one_domain_per_client",
    "data.num_clients",
    f"must be >= 1 (0 means one client per group, with data.partition='one_domain_per_client'), got {data.num_clients}",
  )
  _positive_int(config, "data.max_len", minimum=2)
  _require(
    isinstance(data.chat_template, bool), "data.chat_template", f"must be True or False, got {data.chat_template!r}"
  )
  _require(isinstance(data.packing, bool), "data.packing", f"must be True or False, got {data.packing!r}")
  _require(
    data.feed in ("round", "host"),
    "data.feed",
    f"text runs feed whole rounds, on the devices or in host memory (data.feed='round' or 'host'; "
    f"'chunk' reads images), got {data.feed!r}",
  )
  _require(isinstance(data.stream, bool), "data.stream", f"must be True or False, got {data.stream!r}")
  _require(isinstance(data.get("data_dir", ""), str), "data.data_dir", f"must be a path, got {data.get('data_dir')!r}")
  _one_of(config.model.name, ("llama",), "model.name")
  for field in config.model:
    _require(
      field == "name" or field in pretrain_text.MODEL_FIELDS,
      f"model.{field}",
      f"not a field of the decoder; its fields: {', '.join(pretrain_text.MODEL_FIELDS)}",
    )
  checkpoint = config.pretrain.get("checkpoint", "")
  if checkpoint:
    _require(os.path.isdir(checkpoint), "pretrain.checkpoint", f"no such directory: {checkpoint!r}")
    try:
      opened = backbone.open_directory(checkpoint)
      _require(
        opened.model_name == "llama",
        "pretrain.checkpoint",
        f"a {opened.model_name} checkpoint; text runs take Llama-family decoders",
      )
      tokenizer = opened.require_tokenizer()
    except CheckpointError as e:
      raise ConfigError(f"pretrain.checkpoint: {e}") from None
    _require(
      tokenizer.eos_id is not None,
      "pretrain.checkpoint",
      "its tokenizer_config.json names no eos_token, so responses cannot end",
    )
    _require(
      not data.chat_template or tokenizer.chat_template is not None,
      "data.chat_template",
      f"{checkpoint} has no chat template (chat_template.jinja or tokenizer_config.json's)",
    )
  else:
    _require(not data.chat_template, "data.chat_template", "the embedded tokenizer has no chat template")
    for field in (
      "model.width",
      "model.depth",
      "model.num_heads",
      "model.mlp_dim",
      "pretrain.steps",
      "pretrain.sequence_length",
    ):
      _positive_int(config, field)
    _positive_int(config, "pretrain.vocab_size", minimum=300)  # 256 bytes + specials + merges.
    kv = config.model.get("num_kv_heads", 0) or config.model.num_heads
    _require(
      config.model.num_heads % kv == 0,
      "model.num_kv_heads",
      f"{kv} must divide model.num_heads={config.model.num_heads}",
    )
    _require(
      config.model.width % config.model.num_heads == 0 and (config.model.width // config.model.num_heads) % 2 == 0,
      "model.num_heads",
      f"must divide model.width={config.model.width} into heads of even width (rotary)",
    )


def _finite_numbers(node, prefix: str = "") -> None:
  """Every float anywhere in the config is finite (inf learning rates, alphas, noise...)."""
  for key, value in node.items():
    field = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      _finite_numbers(value, f"{field}.")
    elif isinstance(value, float):
      _require(math.isfinite(value), field, f"must be finite, got {value}")
    elif isinstance(value, (tuple, list)):
      _require(
        all(math.isfinite(v) for v in value if isinstance(v, float)), field, f"must be finite, got {tuple(value)}"
      )


def check_relative_name(value: str, field: str) -> None:
  """A name used as a directory below another (the benchmark below a sweep's runs dir)."""
  parts = str(value).replace("\\", "/").split("/")
  _require(
    bool(str(value).strip("/")) and not os.path.isabs(value) and ".." not in parts,
    field,
    f"must be a relative name (no absolute path, no '..'), got {value!r}",
  )


def unused_blocks(config: ml_collections.ConfigDict, method_blocks: dict) -> set[str]:
  """Method-specific blocks present in `config` that its method does not read."""
  every = {block for blocks in method_blocks.values() for block in blocks}
  return {b for b in every if b in config} - set(method_blocks.get(config.method, ()))


def used_config(config: ml_collections.ConfigDict, method_blocks: dict) -> dict:
  """The config as a JSON-able dict without the blocks of other methods (what a run depends on)."""
  unused = unused_blocks(config, method_blocks)
  return {k: v for k, v in json.loads(config.to_json()).items() if k not in unused}


def _check_multiple_choice(config: ml_collections.ConfigDict) -> None:
  """`mc.*`: a text run's, its path '' / 'embedded' / an existing file or directory."""
  path = config.mc.path
  _require(isinstance(path, str), "mc.path", f"must be a string, got {path!r}")
  for field in ("mc.every", "mc.max_questions", "mc.max_len"):
    _positive_int(config, field, minimum=0)
  if not path:
    return
  _require(is_text(config), "mc.path", "multiple-choice evaluation is for text runs (task='instruction_tuning')")
  _require(
    path == "embedded" or os.path.exists(path),
    "mc.path",
    f"{path!r} does not exist (give 'embedded', '' or a local MMLU-style file or directory)",
  )


def validate_config(config: ml_collections.ConfigDict, allowed_methods, method_blocks: dict | None = None) -> None:
  """Raises `ConfigError` naming the first invalid field. `allowed_methods`: {name: factory
  config -> `methods.Method`} (their capabilities decide method-specific checks). Blocks of other methods than
  `config.method` (`method_blocks`: {method: blocks it reads}) are not checked."""
  _one_of(config.method, sorted(allowed_methods), "method")
  _positive_int(config, "seed", minimum=0)
  _finite_numbers(config)
  check_relative_name(config.get("benchmark", "default"), "benchmark")
  _one_of(config.get("task", "image_classification"), TASKS, "task")
  data, fed = config.data, config.fed
  _require(
    bool(data.name),
    "data.name",
    "must name a dataset, e.g. 'digits_domains/res16'"
    + (" or 'stdlib_docs' or a .jsonl / .json / .parquet file" if is_text(config) else ""),
  )
  _one_of(data.partition, ALLOWED_PARTITIONS, "data.partition")
  for field in (
    (() if is_text(config) else ("data.num_clients",))
    + (
      "fed.num_rounds",
      "fed.clients_per_round",
      "fed.local_steps",
      "fed.batch_size",
      "lora.rank",
      "pretrain.batch_size",
      "eval_batch",
      "eval_every",
      "checkpoint_every",
    )
    + (() if is_text(config) else ("data.image_size",))
  ):
    _positive_int(config, field)
  for field in ("data.heldout_clients", "data.max_client_examples", "fed.new_client_steps", "fed.num_devices"):
    _positive_int(config, field, minimum=0)
  if "export_every" in config:
    _positive_int(config, "export_every", minimum=0)
  if "mc" in config:
    _check_multiple_choice(config)
  if "gen" in config:
    for field in ("gen.examples_per_client", "gen.every"):
      _positive_int(config, field, minimum=0)
    _positive_int(config, "gen.max_new_tokens")
    _require(
      is_text(config) or not config.gen.examples_per_client,
      "gen.examples_per_client",
      "generation-based scoring is for text runs (task='instruction_tuning')",
    )
  clients = config.get("export_clients", "")
  _require(
    isinstance(clients, str) and re.fullmatch(r"\s*(all|\d+(\s*,\s*\d+)*)?\s*", clients) is not None,
    "export_clients",
    f"must be '' (none), 'all' or client ids like '0,3', got {clients!r}",
  )
  _positive_int(config, "data.min_client_size")  # 0 lets a client without examples in (weight 0/0).
  fraction = data.get("validation_fraction", 0.0)
  _require(0 <= fraction < 1, "data.validation_fraction", f"must be in [0, 1), got {fraction}")
  if not backbone.real_checkpoint(backbone_settings(config).pretrain) and not is_text(config):
    _positive_int(config, "pretrain.steps")
  _positive_int(config, "fed.clients_per_chunk", minimum=-1)  # -1: measured (autotune.AUTO).
  _one_of(config.compute.backbone_dtype, ALLOWED_BACKBONE_DTYPES, "compute.backbone_dtype")
  _one_of(config.compute.get("backbone_quantization", "none"), ALLOWED_QUANTIZATIONS, "compute.backbone_quantization")
  if "quantization_block" in config.compute:
    _positive_int(config, "compute.quantization_block", minimum=0)
  _require(isinstance(data.stream, bool), "data.stream", f"must be True or False, got {data.stream!r}")
  _positive_int(config, "data.stream_chunk_examples")
  _one_of(data.feed, ALLOWED_FEEDS, "data.feed")
  _require(data.dirichlet_alpha > 0, "data.dirichlet_alpha", f"must be > 0, got {data.dirichlet_alpha}")
  _require(
    fed.clients_per_round <= data.num_clients or (is_text(config) and data.num_clients == 0),
    "fed.clients_per_round",
    f"{fed.clients_per_round} exceeds data.num_clients={data.num_clients}",
  )
  check_user_dir(config, "data.data_dir")
  check_user_dir(config, "pretrain.cache_dir")
  if is_text(config):
    _validate_text(config)
  else:
    _validate_model(config)
  _one_of(fed.head_policy, ALLOWED_HEAD_POLICIES, "fed.head_policy")
  if "model_parallel" in fed:
    _positive_int(config, "fed.model_parallel")
    _require(
      not fed.num_devices or fed.num_devices % fed.model_parallel == 0,
      "fed.model_parallel",
      f"{fed.model_parallel} must divide fed.num_devices={fed.num_devices}",
    )
  clients_devices = fed.num_devices // fed.get("model_parallel", 1)
  if fed.clients_per_chunk > 0 and clients_devices:
    _require(
      fed.clients_per_chunk % clients_devices == 0,
      "fed.clients_per_chunk",
      f"{fed.clients_per_chunk} must be a multiple of the {clients_devices} devices of the clients "
      f"mesh axis (fed.num_devices={fed.num_devices} / fed.model_parallel={fed.get('model_parallel', 1)})",
    )
  try:
    re.compile(config.lora.target_regex)
  except re.error as e:
    raise ConfigError(f"lora.target_regex: not a valid regex ({e})") from None
  _require(config.lora.alpha > 0, "lora.alpha", f"must be > 0, got {config.lora.alpha}")
  ranks = config.lora.client_ranks
  _require(
    all(isinstance(r, int) and 1 <= r <= config.lora.rank for r in ranks),
    "lora.client_ranks",
    f"each rank must be an integer in [1, lora.rank={config.lora.rank}], got {tuple(ranks)}",
  )
  optimizers = ["client_optimizer", "server_optimizer"]
  unused = unused_blocks(config, method_blocks) if method_blocks else set()
  if "generator" in config and "generator" not in unused:
    gen = config.generator
    _one_of(gen.loss, GENERATOR_LOSSES, "generator.loss")
    for field in ("generator.hidden", "generator.layer_embed_dim", "generator.server_steps"):
      _positive_int(config, field)
    optimizers.append("generator.optimizer")
  if "lora_fair" in config and "lora_fair" not in unused:
    fair = config.lora_fair
    _positive_int(config, "lora_fair.steps")  # 0 steps would run FedIT under LoRA-FAIR's name.
    _require(fair.learning_rate > 0, "lora_fair.learning_rate", f"must be > 0, got {fair.learning_rate}")
    _require(fair.lam >= 0, "lora_fair.lam", f"must be >= 0, got {fair.lam}")
  if "hyperlora" in config and "hyperlora" not in unused:
    hl = config.hyperlora
    try:
      kinds = parse_kinds(hl.signature)
    except ValueError as e:
      raise ConfigError(f"hyperlora.signature: {e}") from None
    _require(
      not hl.generator or bool(kinds),
      "hyperlora.signature",
      "the generator needs a conditioning: name at least one of label, features, embedding "
      "(or set hyperlora.generator=False)",
    )
    _one_of(hl.synthesizer, ("learned", "uniform"), "hyperlora.synthesizer")
    _one_of(hl.corrector, CORRECTORS, "hyperlora.corrector")
    _require(hl.signature_noise_std >= 0, "hyperlora.signature_noise_std", "must be >= 0")
    _positive_int(config, "hyperlora.covariance_rank")
    _positive_int(config, "hyperlora.synthesizer_hidden")
    _positive_int(config, "hyperlora.meta_steps")
    optimizers.append("hyperlora.meta_optimizer")
    if config.get("dp") is not None and config.dp.noise_multiplier > 0:
      for field, value in (("hyperlora.synthesizer", hl.synthesizer), ("hyperlora.corrector", hl.corrector)):
        _require(
          value != "learned",
          field,
          "under dp.noise_multiplier > 0, HyperLoRA cannot meta-learn S_ψ or C_ω (they learn from "
          "per-client held-out gradients outside the privacy accountant); set "
          "hyperlora.synthesizer='uniform' and hyperlora.corrector='none' or 'fair' "
          "(configs/hyperlora.py:ablation=private)",
        )
      _require(
        "embedding" not in kinds,
        "hyperlora.signature",
        "under dp.noise_multiplier > 0 the learned per-client embedding is refused: it is learned "
        "from one client's updates alone, which no noise at the server hides",
      )
  if "generator" in config and "generator" not in unused:  # After the blocks the method reads.
    embeddings = allowed_methods[config.method](methods.method_settings(config)).client_embeddings
    _positive_int(config, "generator.client_embed_dim", minimum=1 if embeddings else 0)
  for name in optimizers:
    block = config
    for part in name.split("."):
      block = block[part]
    _one_of(block.name, ALLOWED_OPTIMIZERS, f"{name}.name")
    _require(block.learning_rate > 0, f"{name}.learning_rate", f"must be > 0, got {block.learning_rate}")
    _require(0 <= block.momentum < 1, f"{name}.momentum", f"must be in [0, 1), got {block.momentum}")
    if "schedule" in block:
      _one_of(block.schedule, ALLOWED_SCHEDULES, f"{name}.schedule")
      if block.schedule != "constant":
        _positive_int(config, f"{name}.decay_steps")
        _require(
          0 <= block.final_fraction <= 1, f"{name}.final_fraction", f"must be in [0, 1], got {block.final_fraction}"
        )
  _require(config.pretrain.learning_rate > 0, "pretrain.learning_rate", "must be > 0")
  if "faults" in config:
    from hyperlora_jax.faults import Faults

    try:
      Faults(**config.faults.to_dict())
    except (ValueError, TypeError) as e:
      raise ConfigError(str(e) if str(e).startswith("faults") else f"faults: {e}") from None
  if "robust" in config:
    from hyperlora_jax.aggregators.robust import ROBUST_RULES

    _one_of(config.robust.rule, ("mean",) + ROBUST_RULES, "robust.rule")
    _one_of(config.robust.space, ("factors", "products"), "robust.space")
    _require(0 <= config.robust.trim < 0.5, "robust.trim", f"must be in [0, 0.5), got {config.robust.trim}")
    _require(config.robust.clip_norm >= 0, "robust.clip_norm", f"must be >= 0, got {config.robust.clip_norm}")
  if "dp" in config:
    _require(config.dp.noise_multiplier >= 0, "dp.noise_multiplier", f"must be >= 0, got {config.dp.noise_multiplier}")
    _require(config.dp.clip_norm > 0, "dp.clip_norm", f"must be > 0, got {config.dp.clip_norm}")
    _require(0 < config.dp.delta < 1, "dp.delta", f"must be in (0, 1), got {config.dp.delta}")
    for name in ("generator_clip_norm", "signature_clip_norm"):
      value = config.dp.get(name, 1.0)
      _require(value > 0, f"dp.{name}", f"must be > 0, got {value}")
    signature_noise = config.dp.get("signature_noise_multiplier", 0.0)
    _require(signature_noise >= 0, "dp.signature_noise_multiplier", f"must be >= 0, got {signature_noise}")
  settings = methods.method_settings(config)
  method = allowed_methods[config.method](settings)
  if "dp" in config and config.dp.noise_multiplier > 0:
    if method.private_rounds:
      sent = statistic_kinds(method.signature_kinds)
      _require(
        not sent or signature_noise > 0,
        "dp.signature_noise_multiplier",
        f"must be > 0 under dp.noise_multiplier > 0: HyperLoRA's signatures ({'+'.join(sorted(sent))}) "
        f"are data statistics sent to the server, and without noise ε = ∞",
      )
      _require(
        config.hyperlora.signature_noise_std == 0,
        "hyperlora.signature_noise_std",
        "must be 0 under dp.noise_multiplier > 0 (the signatures' noise is then "
        "dp.signature_noise_multiplier x dp.signature_clip_norm)",
      )
  methods.check_server_options(settings, method, allowed_methods)


def _writable_dir(path: str) -> bool:
  """Whether `path` is (now created) a directory this process can write a file in."""
  import tempfile

  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      return True
  except OSError:
    return False


def check_user_dir(config: ml_collections.ConfigDict, field: str) -> None:
  """A directory field the user set (empty: the default cache, created as needed) names a
  directory this process can write in, whose parent exists: a typo such as /nonexistent/x
  is refused rather than created at the filesystem's root."""
  block, name = field.split(".")
  path = config[block].get(name, "")
  if not path:
    return
  _require(isinstance(path, str), field, f"must be a path, got {path!r}")
  _require(not os.path.exists(path) or os.path.isdir(path), field, f"{path!r} is a file, not a directory")
  parent = os.path.dirname(os.path.abspath(path))
  _require(
    os.path.isdir(path) or os.path.isdir(parent),
    field,
    f"neither {path!r} nor its parent {parent!r} exists (a typo?); create the parent first",
  )
  _require(_writable_dir(path), field, f"cannot write to {path!r}")


def preflight(config: ml_collections.ConfigDict) -> None:
  """The checks that need dataset metadata or the model's shapes, before any example or weight
  is read (embedded datasets are generated first). Raises `ConfigError` naming the field."""
  if is_text(config):
    return _preflight_text(config)
  data_dir = config.data.data_dir or None

  def examples(name, split, name_field, split_field):
    try:
      return loader.split_examples(name, split, data_dir)
    except ValueError as e:
      field = split_field if "has no split" in str(e) else name_field
      raise ConfigError(f"{field}: {e}") from None

  train_examples = examples(config.data.name, config.data.train_split, "data.name", "data.train_split")
  examples(config.data.name, config.data.test_split, "data.name", "data.test_split")
  clients = config.data.num_clients + config.data.heldout_clients
  if train_examples is not None and clients * config.data.min_client_size > train_examples:
    raise ConfigError(
      f"data.num_clients: {config.data.num_clients} clients (+ {config.data.heldout_clients} "
      f"held out) of at least data.min_client_size={config.data.min_client_size} examples "
      f"need more than the {train_examples} examples of {config.data.name!r} "
      f"{config.data.train_split!r}"
    )
  backbone_step = backbone_settings(config)
  if not backbone.real_checkpoint(backbone_step.pretrain):
    pretrain_examples = examples(
      config.pretrain.data_name, config.pretrain.split, "pretrain.data_name", "pretrain.split"
    )
    if pretrain_examples is not None and config.pretrain.batch_size > pretrain_examples:
      raise ConfigError(
        f"pretrain.batch_size: {config.pretrain.batch_size} exceeds the {pretrain_examples} "
        f"examples of {config.pretrain.data_name!r} {config.pretrain.split!r}"
      )
  cache_dir = os.path.dirname(pretrain.cache_path(backbone_step))
  if not _writable_dir(cache_dir):
    raise ConfigError(f"pretrain.cache_dir: cannot write to {cache_dir!r}")
  names = loader.label_names(config.data.name, data_dir)
  model = models.model_from_config(config.model, len(names), names)
  images = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  _check_lora_fits(config, model, models.preprocess_images(images))


def _preflight_text(config: ml_collections.ConfigDict) -> None:
  """A text run's LoRA targets and rank against the decoder's shapes, the cache, and whether a
  local step (and, for the embedded decoder, a pretraining step) can fit in memory at all."""
  from experiments.runner import pretrain_text

  if config.pretrain.get("checkpoint", ""):
    from hyperlora_jax.models.llama import DecoderLM

    model = DecoderLM(**backbone.opened_checkpoint(config.pretrain.checkpoint).architecture)
  else:
    backbone_step = backbone_settings(config)
    cache_dir = os.path.dirname(pretrain_text.cache_path(backbone_step))
    if not _writable_dir(cache_dir):
      raise ConfigError(f"pretrain.cache_dir: cannot write to {cache_dir!r}")
    model = pretrain_text.decoder_from_config(config.model, config.pretrain.vocab_size)
    if not os.path.isdir(pretrain_text.cache_path(backbone_step)):  # It would be pretrained first.
      _check_decoder_step_fits(
        model,
        config.pretrain.batch_size,
        config.pretrain.sequence_length,
        1,
        "pretrain.sequence_length",
        "pretrain.batch_size",
        "a pretraining step",
      )
  chunk = config.fed.clients_per_chunk
  clients = 1 if chunk < 0 else (chunk or config.fed.clients_per_round)  # -1: measured, from 1 up.
  _check_decoder_step_fits(
    model,
    config.fed.batch_size,
    config.data.max_len,
    clients,
    "data.max_len",
    "fed.batch_size",
    f"a local step of {clients} client(s) at once" + (" (fed.clients_per_chunk)" if clients > 1 else ""),
  )
  _check_lora_fits(config, model, jnp.zeros((1, 4), jnp.int32))


def _check_decoder_step_fits(
  model, batch: int, length: int, clients: int, length_field: str, batch_field: str, what: str
) -> None:
  """Raises ConfigError naming the length and batch fields when `clients` x one decoder
  training step of [batch, length] tokens (`memory.decoder_step_bytes`) exceeds the device."""
  needed = clients * memory.decoder_step_bytes(
    batch, length, model.vocab_size, model.width, model.depth, model.num_heads
  )
  available = memory.device_memory_bytes()
  if memory.too_large(needed, available):
    field = length_field if length >= batch else batch_field  # The one far from the usual.
    raise ConfigError(
      f"{field}: {what} of {batch_field}={batch} sequences of {length_field}={length} "
      f"tokens needs {memory.describe(needed, available)} (logits {batch}x{length}x"
      f"{model.vocab_size}, attention {batch}x{model.num_heads}x{length}²); lower {length_field} "
      f"or {batch_field}"
    )


def _check_lora_fits(config: ml_collections.ConfigDict, model, example) -> None:
  """`lora.target_regex` matches layers LoRA supports on `model` (abstract shapes only, from
  `example` inputs), and `lora.rank` fits each of them."""
  try:
    targets = lora.find_targets(
      model, jax.eval_shape(model.init, jax.random.key(0), example), example, target_regex=config.lora.target_regex
    )
  except ValueError as e:
    raise ConfigError(f"lora.target_regex: {e}") from None
  narrow = {path: shape for path, shape in targets.items() if min(shape) < config.lora.rank}
  if narrow:
    raise ConfigError(
      f"lora.rank: {config.lora.rank} exceeds the smaller side of targeted layer(s) "
      f"{', '.join(f'{p} {d_in}x{d_out}' for p, (d_in, d_out) in narrow.items())}"
    )


def check_mesh_fits(config: ml_collections.ConfigDict):
  """The mesh of `fed.num_devices` (clients) x `fed.model_parallel` (model), after checking the
  fields that must divide by (or fit) its devices: `fed.clients_per_chunk`, `data.feed`,
  `eval_batch`."""
  try:
    mesh = make_mesh(config.fed.num_devices, config.fed.get("model_parallel", 1))
  except ValueError as e:
    field = "fed.model_parallel" if "model_parallel" in str(e) else "fed.num_devices"
    raise ConfigError(f"{field}: {e}") from None
  clients = clients_axis_size(mesh)
  if config.fed.clients_per_chunk > 0 and config.fed.clients_per_chunk % clients:
    raise ConfigError(
      f"fed.clients_per_chunk: {config.fed.clients_per_chunk} must be a multiple of "
      f"the {clients} devices of the clients mesh axis"
    )
  if config.data.feed == "chunk" and (mesh.size > 1 or jax.process_count() > 1):
    raise ConfigError(
      f"data.feed: 'chunk' reads each chunk's images on the host of a single "
      f"device; this run has {mesh.size} devices in {jax.process_count()} "
      f"process(es): use data.feed='round'"
    )
  if config.data.feed == "host" and not has_host_memory(mesh.devices.flat[0]):
    raise ConfigError(
      f"data.feed: 'host' holds each round's block in pinned host memory, which "
      f"{mesh.devices.flat[0].platform} device {mesh.devices.flat[0].id} does not offer: use data.feed='round'"
    )
  if config.eval_batch % clients:
    raise ConfigError(
      f"eval_batch: {config.eval_batch} must be a multiple of the {clients} devices "
      f"of the clients mesh axis (test examples are sharded over them)"
    )
  return mesh


def check_method_fits(config: ml_collections.ConfigDict, method, server_optimizer) -> None:
  """`federated.capability_problems` against the config, before anything is loaded, as errors
  naming the config field."""
  # A rank below lora.rank (r_max, the stored size) counts as heterogeneous here, as before.
  ranks = tuple(config.lora.client_ranks) + (config.lora.rank,) if config.lora.client_ranks else None
  for argument, _ in federated.capability_problems(method.aggregator, server_optimizer, ranks):
    if argument == "server_optimizer":
      raise ConfigError(
        f"server_optimizer: method {config.method!r} is exact only with a plain server "
        f"step (name='sgd', learning_rate=1.0, momentum=0.0), got "
        f"{config.server_optimizer.to_dict()}"
      )
    allowed = sorted(
      name
      for name, build in methods.METHODS.items()
      if build(methods.method_settings(config)).aggregator.capabilities.heterogeneous_ranks
    )
    raise ConfigError(
      f"lora.client_ranks: method {config.method!r} does not define aggregation "
      f"for heterogeneous ranks {tuple(config.lora.client_ranks)}; methods that do: "
      f"{', '.join(allowed)}"
    )
