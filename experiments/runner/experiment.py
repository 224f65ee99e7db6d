"""`build_experiment(config)`: everything a run needs (data, backbone, task, method, round), built
once from a validated config, before anything is compiled."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.runner import methods, pretrain
from experiments.runner.chunking import auto_clients_per_chunk
from experiments.runner.config_validation import (check_mesh_fits, check_method_fits, is_text, preflight,
                                                  validate_config)
from experiments.runner.federated_data import FederatedData, build_federated_data, client_blocks
from experiments.runner.feeding import chunk_image_loader
from experiments.runner.optimizers import build_optimizer
from hyperlora_jax import autotune, federated, lora, models, primitives
from hyperlora_jax import faults as faults_lib
from hyperlora_jax.client import ClientUpdate, local_update
from hyperlora_jax.hyper import signatures as signatures_lib
from hyperlora_jax.hyper.plugins import clip_plugin_updates, generator_plugin
from hyperlora_jax.tasks import image_classification as task_lib


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from the config."""
  config: ml_collections.ConfigDict
  data: FederatedData
  task: Any                           # tasks.image_classification.ImageClassification or tasks.causal_lm.CausalLM.
  method: methods.Method
  backbone: Any
  targets: dict
  initial_trainable: Any
  client_update: ClientUpdate
  fed_round: federated.FederatedRound
  mesh: Any
  client_ranks: np.ndarray            # [num_clients] LoRA rank of each client.
  signatures: np.ndarray | None = None  # [num_clients, D] client signatures, or None.
  new_signatures: np.ndarray | None = None  # [heldout_clients, D] new clients' signatures.


def sharded_backbone(backbone: Any, mesh: Any, log: Callable[[str], None]) -> Any:
  """`backbone` split over the mesh's `model` axis (`primitives.shard_frozen`; logged), or as
  it is on a mesh without one."""
  if primitives.model_axis_size(mesh) == 1:
    return backbone
  backbone = primitives.shard_frozen(backbone, mesh)
  leaves = jax.tree.leaves(backbone)
  split = sum(1 for x in leaves if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated)
  total = sum(x.nbytes for x in leaves)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  log(f"backbone: split over the {primitives.model_axis_size(mesh)} devices of the model mesh axis: {split} of "
      f"{len(leaves)} weights, {per_device / 2**20:.3f} MiB per device of {total / 2**20:.3f} MiB")
  return backbone


def initial_trainable(model, backbone: Any, example_images: jax.Array, target_regex: str, rank: int,
                      rng: jax.Array) -> tuple[dict, dict]:
  """The round-0 trainable pytree and the LoRA targets.

  Args:
    example_images: [1, H, W, 3] uint8, for shapes only.
  Returns:
    ({"lora": fresh LoRA (b = 0), "head": zero head shaped like the model's ({} for a model
     without one, e.g. CLIP)}, targets {path: (d_in, d_out)}).
  """
  inputs = models.preprocess_images(example_images)
  abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["params"].get("head", {}))
  params = {**backbone["params"], **({"head": head} if head else {})}
  targets = lora.find_targets(model, {"params": params}, inputs, target_regex=target_regex)
  return {"lora": lora.init_lora(rng, targets, rank), "head": head}, targets


def build_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """Validates the config, loads data and backbone, builds the round (no compilation yet).

  Every config check runs first (`config_validation`), before any example or weight is read
  (a Hugging Face checkpoint's config.json first sets `model.*`).
  """
  config = pretrain.with_checkpoint_architecture(config, log)
  if is_text(config):
    from experiments.runner.text_experiment import build_text_experiment
    return build_text_experiment(config, log)
  mesh, method, server_optimizer = checked_method(config)
  data = build_federated_data(config)
  if config.data.get("validation_fraction", 0.0):
    log(f"evaluating on a validation split: {config.data.validation_fraction:g} of each client's training "
        f"examples, held out (the test split is not read)")
  backbone, _ = pretrain.load_or_pretrain(config, log)
  backbone = sharded_backbone(backbone, mesh, log)
  model = build_model(config, data.num_classes, data.train_pool.class_names)
  preprocess = pretrain.image_preprocess(config)
  trainable, targets = initial_trainable(model, backbone, data.train_pool.images[:1],
                                         config.lora.target_regex, config.lora.rank,
                                         jax.random.fold_in(jax.random.key(config.seed), 1))
  task = task_lib.ImageClassification(model, lora.lora_scale(config.lora.alpha, config.lora.rank,
                                                             config.lora.rslora),
                                      preprocess,
                                      "head" if trainable["head"] else None,  # CLIP has no head.
                                      task_lib.backbone_dtype(config.compute.backbone_dtype))
  client_signatures, new_signatures = (every_client_signature(config, method, data, model, backbone, preprocess)
                                       if method.signature_kinds else (None, None))
  signature_dim = 0 if client_signatures is None else client_signatures.shape[-1]
  ranks = client_ranks(config, data.num_clients)
  client_update = local_update(task.loss_fn, build_optimizer(config.client_optimizer))
  chunk = config.fed.clients_per_chunk
  if chunk == autotune.AUTO:
    chunk = auto_clients_per_chunk(config, task, backbone, trainable, client_update, mesh,
                                   method.pooled_data, log)
  fed_round = federated.FederatedRound(
      client_update, method.aggregator, data.num_clients, server_optimizer=server_optimizer,
      local_leaves=method.local_regex, frozen_leaves=method.frozen_regexes, client_ranks=ranks,
      clients_per_chunk=chunk, mesh=mesh if mesh.size > 1 else None,
      plugins=round_plugins(config, method, targets, data.num_clients, signature_dim),
      apply_base_delta=task_lib.apply_base_delta,
      faults=faults_lib.Faults(**config.faults.to_dict()) if "faults" in config else None,
      load_batches=chunk_image_loader(data.train_pool) if config.data.feed == "chunk" else None)
  return Experiment(config, data, task, method, backbone, targets, trainable, client_update, fed_round,
                    mesh, ranks, client_signatures, new_signatures)


def checked_method(config: ml_collections.ConfigDict) -> tuple[Any, methods.Method, Any]:
  """(clients mesh, method, server optimizer) after every config check (`config_validation`)."""
  validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  preflight(config)
  mesh = check_mesh_fits(config)
  method = methods.build_method(config)
  server_optimizer = build_optimizer(config.server_optimizer)
  check_method_fits(config, method, server_optimizer)
  return mesh, method, server_optimizer


def build_model(config: ml_collections.ConfigDict, num_classes: int, class_names) -> Any:
  """The config's model; a CLIP checkpoint's class prompts tokenized by its own tokenizer."""
  prompt_ids = pretrain.checkpoint_prompt_ids(config, class_names)
  if prompt_ids is None:
    return models.model_from_config(config.model, num_classes, class_names)
  arch = {k: v for k, v in config.model.items() if k not in ("name", "prompt_ids")}
  return models.build_model(config.model.name, num_classes, class_names, **arch, prompt_ids=prompt_ids)


def every_client_signature(config: ml_collections.ConfigDict, method: methods.Method, data: FederatedData,
                           model: Any, backbone: Any, preprocess: Callable = models.preprocess_images,
                           **featurizer) -> tuple[np.ndarray, np.ndarray]:
  """([num_clients, D], [heldout_clients, D]) signatures of the training and the held-out new
  clients (`hyper.signatures`), computed block by block with one noise key per client;
  clipped and noised under DP (`hyperlora_jax.privacy`; validation checked the fields).
  `featurizer`: `compute_signatures`' `featurize` and `example_keys`, for other examples than
  images (text runs)."""
  hl = config.hyperlora
  every_part = data.train_parts + data.new_train_parts
  keys = jax.random.split(jax.random.key(config.seed), len(every_part))  # One noise key per client.
  noise_std, clip = hl.signature_noise_std, None
  if methods.dp_on(config):
    clip = config.dp.signature_clip_norm
    noise_std = config.dp.signature_noise_multiplier * clip
  every_signature = np.concatenate([
      signatures_lib.compute_signatures(
          model, backbone, block, method.signature_kinds, data.num_classes,
          preprocess=preprocess, covariance_rank=hl.covariance_rank, noise_std=noise_std,
          seed=config.seed, client_keys=keys[ids], clip_norm=clip, **featurizer)
      for ids, block in client_blocks(data.train_pool, every_part, data.chunk_examples)])[:len(every_part)]
  return every_signature[:data.num_clients], every_signature[data.num_clients:]


def round_plugins(config: ml_collections.ConfigDict, method: methods.Method, targets: dict, num_clients: int,
                  signature_dim: int) -> tuple[federated.Plugin, ...]:
  """The method's generator as a round plug-in (pFedHN, HyperLoRA; () for the others), learning
  from clipped updates when `robust.clip_norm` clips the aggregate's."""
  if not method.make_generator:
    return ()
  plugin = generator_plugin(method.make_generator(targets, num_clients, signature_dim),
                            target=method.generator_target, privacy=method.generator_privacy)
  clip_norm = config.robust.clip_norm if "robust" in config else 0.0
  return (clip_plugin_updates(plugin, clip_norm),) if clip_norm > 0 else (plugin,)


def client_ranks(config: ml_collections.ConfigDict, num_clients: int) -> np.ndarray:
  """[num_clients] ranks: `lora.client_ranks` assigned cyclically (client k gets entry
  k mod len), or `lora.rank` for every client when it is empty."""
  ranks = tuple(config.lora.client_ranks) or (config.lora.rank,)
  return np.array([ranks[k % len(ranks)] for k in range(num_clients)], np.int32)
