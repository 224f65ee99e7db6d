"""The parts every run is assembled from, image or text: the `Experiment` record, the checked
method, the clients' signatures and the round itself (`assemble`: the one place a run's
`FederatedRound` is built and `fed.clients_per_chunk=-1` resolved). The builders
(`image_experiment`, `text_experiment`) make the data, backbone and task, unpack the config into
`settings.RunSettings`, and end here; past `checked_method` (every check of the config) nothing
here reads the config itself."""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from configs import blocks
from experiments.runner import methods
from experiments.runner.chunking import auto_clients_per_chunk
from experiments.runner.config_validation import check_mesh_fits, check_method_fits, preflight, validate_config
from experiments.runner.federated_data import FederatedData, client_blocks
from experiments.runner.optimizers import build_optimizer
from experiments.runner.settings import RunSettings
from hyperlora_jax import autotune, federated, models, primitives
from hyperlora_jax.client import ClientUpdate, local_update
from hyperlora_jax.hyper import signatures as signatures_lib
from hyperlora_jax.hyper.plugins import clip_plugin_updates, generator_plugin
from hyperlora_jax.tasks.common import apply_base_delta


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from the config (`settings`: the config's typed values)."""

  settings: RunSettings
  data: FederatedData
  task: Any  # image_classification.ImageClassification, causal_lm.CausalLM or preference.PreferenceLM.
  method: methods.Method
  backbone: Any
  targets: dict
  initial_trainable: Any
  client_update: ClientUpdate
  fed_round: federated.FederatedRound
  mesh: Any
  client_ranks: np.ndarray  # [num_clients] LoRA rank of each client.
  signatures: np.ndarray | None = None  # [num_clients, D] client signatures, or None.
  new_signatures: np.ndarray | None = None  # [heldout_clients, D] new clients' signatures.
  host_feed: primitives.HostFeed | None = None  # data.feed='host': where the round's block is held.
  # A text run's `mc` questions: `text.encode_multiple_choice`'s arrays and "subject" [Q] (or None).
  multiple_choice: dict | None = None
  tokenizer: Any = None  # A text run's `models.hf.Tokenizer` (generation-based scoring decodes with it).

  def frozen(self) -> dict:
    """The task's frozen tree: the backbone in the task's compute dtype, its kernels held as
    `compute.backbone_quantization` says (`tasks.common.frozen_tree`)."""
    return self.settings.frozen_tree(self.backbone, self.task.compute_dtype)


def checked_method(config: ml_collections.ConfigDict) -> tuple[Any, methods.Method, Any]:
  """(clients mesh, method, server optimizer) after every config check (`config_validation`)."""
  validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  preflight(config)
  mesh = check_mesh_fits(config)
  method = methods.build_method(methods.method_settings(config))
  server_optimizer = build_optimizer(blocks.from_config(blocks.Optimizer, config.server_optimizer))
  check_method_fits(config, method, server_optimizer)
  return mesh, method, server_optimizer


def assemble(
  settings: RunSettings,
  log: Callable[[str], None],
  *,
  mesh: Any,
  method: methods.Method,
  server_optimizer: Any,
  data: FederatedData,
  task: Any,
  backbone: Any,
  targets: dict,
  trainable: Any,
  signatures: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
  load_batches: Callable | None = None,
  byte_shapes: tuple = (),
) -> Experiment:
  """The run's `Experiment`: its client update (`task.loss_fn` with the client optimizer), the
  chunk size (`fed.clients_per_chunk`, measured here when -1) and its `FederatedRound`.

  Args:
    settings: the run's (`settings.run_settings`).
    mesh, method, server_optimizer: `checked_method`'s.
    data, task, backbone, targets, trainable: what the builder made.
    signatures: (clients' [N, D], held-out new clients' [M, D]) or (None, None).
    load_batches: the round's in-chunk loader (`FederatedRound.load_batches`), or None.
    byte_shapes: with `data.feed='host'`, the block's byte leaves (`primitives.HostFeed`).
  """
  host_feed = primitives.HostFeed(mesh, byte_shapes) if settings.feed == "host" else None
  if host_feed is not None:
    load_batches = host_feed.load
  client_signatures, new_signatures = signatures
  signature_dim = 0 if client_signatures is None else client_signatures.shape[-1]
  ranks = client_ranks(settings.lora, data.num_clients)
  client_update = local_update(task.loss_fn, build_optimizer(settings.client_optimizer))
  chunk = settings.fed.clients_per_chunk
  if chunk == autotune.AUTO:
    chunk = auto_clients_per_chunk(settings, task, backbone, trainable, client_update, mesh, method.pooled_data, log)
  fed_round = federated.FederatedRound(
    client_update,
    method.aggregator,
    data.num_clients,
    server_optimizer=server_optimizer,
    local_leaves=method.local_regex,
    frozen_leaves=method.frozen_regexes,
    client_ranks=ranks,
    clients_per_chunk=chunk,
    mesh=mesh if mesh.size > 1 else None,
    plugins=round_plugins(settings.method.robust, method, targets, data.num_clients, signature_dim),
    apply_base_delta=apply_base_delta,
    faults=settings.faults,
    load_batches=load_batches,
  )
  return Experiment(
    settings,
    data,
    task,
    method,
    backbone,
    targets,
    trainable,
    client_update,
    fed_round,
    mesh,
    ranks,
    client_signatures,
    new_signatures,
    host_feed,
  )


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
  log(
    f"backbone: split over the {primitives.model_axis_size(mesh)} devices of the model mesh axis: {split} of "
    f"{len(leaves)} weights, {per_device / 2**20:.3f} MiB per device of {total / 2**20:.3f} MiB"
  )
  return backbone


def every_client_signature(
  settings: RunSettings,
  method: methods.Method,
  data: FederatedData,
  model: Any,
  backbone: Any,
  preprocess: Callable = models.preprocess_images,
  **featurizer,
) -> tuple[np.ndarray, np.ndarray]:
  """([num_clients, D], [heldout_clients, D]) signatures of the training and the held-out new
  clients (`hyper.signatures`), computed block by block with one noise key per client;
  clipped and noised under DP (`hyperlora_jax.privacy`; validation checked the fields).
  `featurizer`: `compute_signatures`' `featurize` and `example_keys`, for other examples than
  images (text runs)."""
  hl, dp = settings.method.hyperlora, settings.dp
  every_part = data.train_parts + data.new_train_parts
  keys = jax.random.split(jax.random.key(settings.seed), len(every_part))  # One noise key per client.
  noise_std, clip = hl.signature_noise_std, None
  if methods.dp_on(dp):
    clip = dp.signature_clip_norm
    noise_std = dp.signature_noise_multiplier * clip
  every_signature = np.concatenate(
    [
      signatures_lib.compute_signatures(
        model,
        backbone,
        block,
        method.signature_kinds,
        data.num_classes,
        preprocess=preprocess,
        covariance_rank=hl.covariance_rank,
        noise_std=noise_std,
        seed=settings.seed,
        client_keys=keys[ids],
        clip_norm=clip,
        **featurizer,
      )
      for ids, block in client_blocks(data.train_pool, every_part, data.chunk_examples)
    ]
  )[: len(every_part)]
  return every_signature[: data.num_clients], every_signature[data.num_clients :]


def round_plugins(
  robust: blocks.Robust, method: methods.Method, targets: dict, num_clients: int, signature_dim: int
) -> tuple[federated.Plugin, ...]:
  """The method's generator as a round plug-in (pFedHN, HyperLoRA; () for the others), learning
  from clipped updates when `robust.clip_norm` clips the aggregate's."""
  if not method.make_generator:
    return ()
  plugin = generator_plugin(
    method.make_generator(targets, num_clients, signature_dim),
    target=method.generator_target,
    privacy=method.generator_privacy,
  )
  clip_norm = robust.clip_norm
  return (clip_plugin_updates(plugin, clip_norm),) if clip_norm > 0 else (plugin,)


def client_ranks(lora: blocks.Lora, num_clients: int) -> np.ndarray:
  """[num_clients] ranks: `lora.client_ranks` assigned cyclically (client k gets entry
  k mod len), or `lora.rank` for every client when it is empty."""
  ranks = lora.client_ranks or (lora.rank,)
  return np.array([ranks[k % len(ranks)] for k in range(num_clients)], np.int32)
