"""`train_and_evaluate(config, workdir)`: rounds, evaluation, metrics, checkpoints, resume."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from hyperlora_jax import autotune, diagnostics, distributed, lora, methods, models, pretrain, primitives, privacy, reporting
from hyperlora_jax import faults as faults_lib
from hyperlora_jax import federated
from hyperlora_jax.client import ClientUpdate, local_update
from hyperlora_jax.config_validation import ConfigError, used_config, validate_config
from hyperlora_jax.data import blocks
from hyperlora_jax.data.loader import prepare_dataset
from hyperlora_jax.federated_data import FederatedData, build_federated_data, client_blocks
from hyperlora_jax.hyper import signatures as signatures_lib
from hyperlora_jax.hyper import synthesis
from hyperlora_jax.hyper.plugins import clip_plugin_updates, generator_plugin
from hyperlora_jax.optimizers import build_optimizer
from hyperlora_jax.primitives import make_mesh
from hyperlora_jax.tasks import image_classification as task_lib

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
ENVIRONMENT_FILE = "environment.json"  # Versions, backend and machine-chosen values (`environment`).
# Fields a resumed run may change (they do not alter the rounds already done).
RESUMABLE_FIELDS = ("fed.num_rounds", "eval_every", "checkpoint_every")
# Fields added after runs were recorded without them, with the value that means "as before":
# a recorded run lacking one is the same config when this run has that value (so a workdir
# made by an older version resumes, or reprints, instead of being refused).
ADDED_FIELDS = {
    "data.max_client_examples": 0, "data.validation_fraction": 0.0, "hyperlora.meta_steps": 1,
    # The faults, robust and dp blocks (all off).
    "faults.dropout": 0.0, "faults.straggler": 0.0, "faults.straggler_steps": 0.5, "faults.nonfinite": 0.0,
    "faults.byzantine": 0.0, "faults.byzantine_kind": "sign_flip", "faults.byzantine_scale": 1.0,
    "robust.rule": "mean", "robust.space": "factors", "robust.trim": 0.1, "robust.clip_norm": 0.0,
    "dp.noise_multiplier": 0.0, "dp.clip_norm": 1.0, "dp.delta": 1e-5,
    "dp.generator_clip_norm": 1.0, "dp.signature_clip_norm": 1.0, "dp.signature_noise_multiplier": 0.0,
    # The generator's learning-rate schedule (constant before 2026-11-26).
    "generator.optimizer.schedule": "constant", "generator.optimizer.decay_steps": 100,
    "generator.optimizer.final_fraction": 0.1,
}


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from the config."""
  config: ml_collections.ConfigDict
  data: FederatedData
  task: task_lib.ImageClassification
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


@dataclasses.dataclass(frozen=True)
class _PendingRound:
  """A dispatched round whose host work (`finish` in `_train_and_evaluate`) is still to do.

  index: the round (0-based); metrics: its device metrics; client_ids: [C] host ids (-1 =
  padding); global_finite: device bool, the new global model is finite; collect_evaluation:
  waits for the dispatched evaluation (None: not an evaluation round); new_clients: the
  held-out new clients' accuracies (last round only, else empty).
  """
  index: int
  metrics: dict
  client_ids: np.ndarray
  global_finite: Any
  collect_evaluation: Callable[[], tuple[float, np.ndarray]] | None
  new_clients: dict


def _number(value: Any) -> int | float:
  """A scalar metric as a Python int (integer dtypes) or float."""
  value = np.asarray(value)
  return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def privacy_spent(config: ml_collections.ConfigDict, rounds: int, method: methods.Method | None = None) -> float:
  """ε (at `dp.delta`) of a private run after `rounds` rounds (`hyperlora_jax.privacy`): the
  method's releases per round, and its signatures (sent once) where it sends any."""
  method = method or methods.build_method(config)
  signature_noise = (config.dp.signature_noise_multiplier
                     if signatures_lib.statistic_kinds(method.signature_kinds) else None)
  return privacy.epsilon(rounds, config.dp.noise_multiplier, config.fed.clients_per_round,
                         config.data.num_clients, config.dp.delta, signature_noise_multiplier=signature_noise,
                         releases_per_round=method.releases_per_round)


# Round metrics counting server parts rejected as non-finite or exploding (`FederatedRound.step`).
REJECTION_METRICS = ("rejected_aggregate", "rejected_server_step", "rejected_plugins")


def _writable_dir(path: str) -> bool:
  """Whether `path` is (now created) a directory this process can write a file in."""
  import tempfile
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      return True
  except OSError:
    return False


def preflight(config: ml_collections.ConfigDict) -> None:
  """The checks that need dataset metadata or the model's shapes, before any example or weight
  is read (embedded datasets are generated first). Raises `ConfigError` naming the field."""
  from hyperlora_jax.data import loader
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
    raise ConfigError(f"data.num_clients: {config.data.num_clients} clients (+ {config.data.heldout_clients} "
                      f"held out) of at least data.min_client_size={config.data.min_client_size} examples "
                      f"need more than the {train_examples} examples of {config.data.name!r} "
                      f"{config.data.train_split!r}")
  if not config.pretrain.get("npz_path"):
    pretrain_examples = examples(config.pretrain.data_name, config.pretrain.split, "pretrain.data_name",
                                 "pretrain.split")
    if pretrain_examples is not None and config.pretrain.batch_size > pretrain_examples:
      raise ConfigError(f"pretrain.batch_size: {config.pretrain.batch_size} exceeds the {pretrain_examples} "
                        f"examples of {config.pretrain.data_name!r} {config.pretrain.split!r}")
  cache_dir = os.path.dirname(pretrain.cache_path(config))
  if not _writable_dir(cache_dir):
    raise ConfigError(f"pretrain.cache_dir: cannot write to {cache_dir!r}")
  names = loader.label_names(config.data.name, data_dir)
  model = models.model_from_config(config.model, len(names), names)
  images = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  inputs = models.preprocess_images(images)
  try:
    targets = lora.find_targets(model, jax.eval_shape(model.init, jax.random.key(0), inputs), inputs,
                                target_regex=config.lora.target_regex)
  except ValueError as e:
    raise ConfigError(f"lora.target_regex: {e}") from None
  narrow = {path: shape for path, shape in targets.items() if min(shape) < config.lora.rank}
  if narrow:
    raise ConfigError(f"lora.rank: {config.lora.rank} exceeds the smaller side of targeted layer(s) "
                      f"{', '.join(f'{p} {d_in}x{d_out}' for p, (d_in, d_out) in narrow.items())}")


def build_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """Validates the config, loads data and backbone, builds the round (no compilation yet)."""
  validate_config(config, methods.METHODS, methods.METHOD_BLOCKS)
  preflight(config)
  try:
    mesh = make_mesh(config.fed.num_devices)
  except ValueError as e:
    raise ConfigError(f"fed.num_devices: {e}") from None
  if config.fed.clients_per_chunk > 0 and config.fed.clients_per_chunk % mesh.size:
    raise ConfigError(f"fed.clients_per_chunk: {config.fed.clients_per_chunk} must be a multiple of "
                      f"the {mesh.size} devices of the clients mesh axis")
  if config.data.feed == "chunk" and (mesh.size > 1 or jax.process_count() > 1):
    raise ConfigError(f"data.feed: 'chunk' reads each chunk's images on the host of a single "
                      f"device; this run has {mesh.size} devices in {jax.process_count()} "
                      f"process(es): use data.feed='round'")
  if config.eval_batch % mesh.size:
    raise ConfigError(f"eval_batch: {config.eval_batch} must be a multiple of the {mesh.size} devices "
                      f"of the clients mesh axis (test examples are sharded over them)")
  method = methods.build_method(config)
  server_optimizer = build_optimizer(config.server_optimizer)
  _check_method_fits(config, method, server_optimizer)
  data = build_federated_data(config)
  if config.data.get("validation_fraction", 0.0):
    log(f"evaluating on a validation split: {config.data.validation_fraction:g} of each client's training "
        f"examples, held out (the test split is not read)")
  backbone, _ = pretrain.load_or_pretrain(config, log)
  model = models.model_from_config(config.model, data.num_classes, data.train_pool.class_names)
  trainable, targets = initial_trainable(model, backbone, data.train_pool.images[:1],
                                         config.lora.target_regex, config.lora.rank,
                                         jax.random.fold_in(jax.random.key(config.seed), 1))
  task = task_lib.ImageClassification(model, lora.lora_scale(config.lora.alpha, config.lora.rank,
                                                             config.lora.rslora),
                                      "head" if trainable["head"] else None,  # CLIP has no head.
                                      task_lib.backbone_dtype(config.compute.backbone_dtype))
  client_signatures = new_signatures = None
  if method.signature_kinds:
    hl = config.hyperlora
    every_part = data.train_parts + data.new_train_parts
    keys = jax.random.split(jax.random.key(config.seed), len(every_part))  # One noise key per client.
    noise_std, clip = hl.signature_noise_std, None
    if methods.dp_on(config):  # Clipped and noised (`hyperlora_jax.privacy`); validation checked the fields.
      clip = config.dp.signature_clip_norm
      noise_std = config.dp.signature_noise_multiplier * clip
    every_signature = np.concatenate([
        signatures_lib.compute_signatures(
            model, backbone, block, method.signature_kinds, data.num_classes,
            covariance_rank=hl.covariance_rank, noise_std=noise_std, seed=config.seed,
            client_keys=keys[ids], clip_norm=clip)
        for ids, block in client_blocks(data.train_pool, every_part, data.chunk_examples)])[:len(every_part)]
    client_signatures = every_signature[:data.num_clients]
    new_signatures = every_signature[data.num_clients:]
  signature_dim = 0 if client_signatures is None else client_signatures.shape[-1]
  plugins = ((generator_plugin(method.make_generator(targets, data.num_clients, signature_dim),
                               target=method.generator_target, privacy=method.generator_privacy),)
             if method.make_generator else ())
  clip_norm = config.robust.clip_norm if "robust" in config else 0.0
  if clip_norm > 0:  # The generator learns from clipped updates too, as the aggregate does.
    plugins = tuple(clip_plugin_updates(p, clip_norm) for p in plugins)
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
      plugins=plugins, apply_base_delta=task_lib.apply_base_delta,
      faults=faults_lib.Faults(**config.faults.to_dict()) if "faults" in config else None,
      load_batches=chunk_image_loader(data.train_pool) if config.data.feed == "chunk" else None)
  return Experiment(config, data, task, method, backbone, targets, trainable, client_update, fed_round,
                    mesh, ranks, client_signatures, new_signatures)


def chunk_image_loader(pool: Any) -> Callable[[dict], dict]:
  """`FederatedRound.load_batches` for `data.feed='chunk'`: a chunk's light batches
  {"indices": [k, S, B] into `pool`, "label", "mask"} -> {"image": [k, S, B, H, W, 3] uint8,
  "label", "mask"}, the images read on the host (from memory or the record files) inside the
  round's chunk loop, so a round never holds more than one chunk of images."""
  image_shape = tuple(pool.images.shape[1:])
  read = primitives.host_loader(lambda indices: np.asarray(pool.images[np.asarray(indices)], np.uint8),
                                lambda spec: jax.ShapeDtypeStruct(spec.shape + image_shape, jnp.uint8))
  return lambda light: {"image": read(light["indices"]), "label": light["label"], "mask": light["mask"]}


def auto_clients_per_chunk(config: ml_collections.ConfigDict, task: task_lib.ImageClassification,
                           backbone: Any, trainable: Any, client_update: ClientUpdate, mesh: Any,
                           pooled_data: bool, log: Callable[[str], None]) -> int:
  """`fed.clients_per_chunk=-1`: the fastest chunk for this backend, model and round shape.

  Measured once (`autotune.measure_clients_per_chunk` on one device's share of a round: the
  client update on random images) and cached next to the backbones, keyed by everything the
  timing depends on. With several processes the main process decides and tells the others.
  A pooled-data learner (one client) has nothing to chunk: 0.
  """
  per_device = 1 if pooled_data else -(-config.fed.clients_per_round // mesh.size)  # Padded cohort / D.
  if per_device == 1:
    return 0
  fields = {"backend": jax.default_backend(), "device": jax.local_devices()[0].device_kind,
            "cpus": os.cpu_count(), "jax": jax.__version__, "model": config.model.to_dict(),
            "image_size": config.data.image_size, "lora": [config.lora.target_regex, config.lora.rank],
            "clients_per_device": per_device, "local_steps": config.fed.local_steps,
            "batch_size": config.fed.batch_size, "client_optimizer": config.client_optimizer.to_dict(),
            "backbone_dtype": str(jnp.dtype(task.compute_dtype))}
  path = os.path.join(config.pretrain.cache_dir or pretrain.DEFAULT_CACHE_DIR, "clients_per_chunk.json")

  def measure() -> autotune.ChunkChoice:
    log(f"fed.clients_per_chunk=-1: timing chunk sizes for {per_device} clients per device "
        f"(once per backend, model and round shape; cached in {path})")
    size = config.data.image_size
    shape = (per_device, config.fed.local_steps, config.fed.batch_size)
    rng = np.random.default_rng(0)
    block = {"image": rng.integers(0, 256, shape + (size, size, 3), dtype=np.uint8),
             "label": np.zeros(shape, np.int32), "mask": np.ones(shape, np.float32)}
    frozen = task_lib.frozen_tree(backbone, dtype=task.compute_dtype)
    every_leaf = jax.tree.map(lambda _: jnp.float32(1.0), trainable)
    one_client = lambda xs: client_update(xs[0], frozen, xs[1], jax.random.key(0), every_leaf)[0]
    return autotune.measure_clients_per_chunk(one_client, (primitives.broadcast(trainable, per_device), block))

  chunk = 0
  if distributed.is_main_process():
    choice = autotune.cached_choice(path, fields, measure)
    times = ", ".join(f"{k}: {s * 1e3:.0f} ms" for k, s in sorted(choice.seconds.items()))
    log(f"fed.clients_per_chunk: {choice.clients_per_chunk * mesh.size} "
        f"({'cached' if choice.cached else 'measured'}; per device {times})")
    chunk = choice.clients_per_chunk * mesh.size
  if jax.process_count() > 1:
    chunk = int(multihost_utils.broadcast_one_to_all(np.int32(chunk)))
  return chunk


def client_ranks(config: ml_collections.ConfigDict, num_clients: int) -> np.ndarray:
  """[num_clients] ranks: `lora.client_ranks` assigned cyclically (client k gets entry
  k mod len), or `lora.rank` for every client when it is empty."""
  ranks = tuple(config.lora.client_ranks) or (config.lora.rank,)
  return np.array([ranks[k % len(ranks)] for k in range(num_clients)], np.int32)


def _check_method_fits(config: ml_collections.ConfigDict, method: methods.Method,
                       server_optimizer: optax.GradientTransformation) -> None:
  """`federated.capability_problems` against the config, before anything is loaded, as errors
  naming the config field."""
  # A rank below lora.rank (r_max, the stored size) counts as heterogeneous here, as before.
  ranks = tuple(config.lora.client_ranks) + (config.lora.rank,) if config.lora.client_ranks else None
  for argument, _ in federated.capability_problems(method.aggregator, server_optimizer, ranks):
    if argument == "server_optimizer":
      raise ConfigError(f"server_optimizer: method {config.method!r} is exact only with a plain server "
                        f"step (name='sgd', learning_rate=1.0, momentum=0.0), got "
                        f"{config.server_optimizer.to_dict()}")
    allowed = sorted(name for name, build in methods.METHODS.items()
                     if build(config).aggregator.capabilities.heterogeneous_ranks)
    raise ConfigError(f"lora.client_ranks: method {config.method!r} does not define aggregation "
                      f"for heterogeneous ranks {tuple(config.lora.client_ranks)}; methods that do: "
                      f"{', '.join(allowed)}")


def round_inputs(exp: Experiment, round_index: int, gather: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
  """The sampled clients' padded block, ids and weights for one round.

  Depends only on (seed, round): the sampler position is the round index. A pooled-data
  method (centralized) gets one learner, id 0, reading the union of the clients' data for
  clients_per_round x local_steps steps: the compute of a federated round. A method with a
  meta-objective gets one more step per client, held out of the local steps.
  Returns:
    block {"image": [C, S, B, H, W, 3], "label", "mask"} ({"indices": [C, S, B] into the train
    pool, "label", "mask"} with gather=False), client_ids [C] (-1 = padding), weights [C] =
    n_k / Σ n_j over the sampled clients.
  """
  config, data = exp.config, exp.data
  rng = np.random.default_rng([config.seed, 1, round_index])
  steps = config.fed.local_steps + exp.fed_round.aggregator.capabilities.heldout_steps
  parts = data.train_parts
  if exp.method.pooled_data:
    ids = np.zeros(1, np.int64)
    steps *= config.fed.clients_per_round
    parts = [np.concatenate(data.train_parts)]
  else:
    ids = blocks.sample_clients(data.num_clients, config.fed.clients_per_round, rng)
  multiple = exp.fed_round.clients_per_chunk or exp.mesh.size
  ids = blocks.pad_client_ids(ids, math.lcm(multiple, exp.mesh.size))
  indices, mask = blocks.train_block_indices(parts, ids, steps, config.fed.batch_size, rng)
  sizes = np.where(ids >= 0, data.train_sizes()[np.maximum(ids, 0)], 0).astype(np.float32)
  if not gather:
    light = {"indices": indices, "label": data.train_pool.labels[indices], "mask": mask}
    return light, ids.astype(np.int32), sizes / sizes.sum()
  return blocks.gather_block(data.train_pool, indices, mask), ids.astype(np.int32), sizes / sizes.sum()


def round_on_mesh(exp: Experiment, round_index: int, sharding: NamedSharding) -> tuple[Any, np.ndarray]:
  """((block, ids, weights) as global arrays sharded over the clients axis, host ids).

  With several processes, each gathers only the images of the clients its devices hold
  (`jax.make_array_from_callback`); labels, masks, ids and weights are small and built whole.
  """
  if exp.config.data.feed == "chunk":  # Light batches: the round reads images chunk by chunk.
    light, ids, weights = round_inputs(exp, round_index, gather=False)
    light["indices"] = light["indices"].astype(np.int32)
    return jax.device_put((light, ids, weights), sharding), ids
  if jax.process_count() == 1:
    block, ids, weights = round_inputs(exp, round_index)
    return jax.device_put((block, ids, weights), sharding), ids
  light, ids, weights = round_inputs(exp, round_index, gather=False)
  indices = light.pop("indices")
  pool = exp.data.train_pool
  shape = indices.shape + tuple(pool.images.shape[1:])
  local = {index[0].indices(len(ids)): pool.images[indices[index[0]]]      # Only this process's rows.
           for index in sharding.addressable_devices_indices_map(shape).values()}
  images = jax.make_array_from_callback(shape, sharding, lambda index: local[index[0].indices(len(ids))])
  rest = jax.device_put((light, ids, weights), sharding)
  return ({"image": images, **rest[0]}, rest[1], rest[2]), ids


def communication_bytes(exp: Experiment, round_index: int, client_ids: np.ndarray) -> tuple[int, int]:
  """(bytes up, bytes down) of one round, summed over its participants
  (`round.communication_bytes`); signatures go up once, in round 0; a pooled-data learner
  communicates nothing.
  Args:
    client_ids: [C] the round's ids, -1 for padding.
  """
  if exp.method.pooled_data:
    return 0, 0
  ranks = [int(exp.client_ranks[c]) for c in client_ids if c >= 0]
  signature_bytes = exp.signatures.size * 4 if round_index == 0 and exp.signatures is not None else 0
  return federated.communication_bytes(exp.fed_round, exp.initial_trainable, round_index, ranks,
                                       signature_bytes)


def evaluate_new_clients(exp: Experiment, state: Any, frozen: Any) -> dict[str, float]:
  """Mean accuracy of the held-out new clients from each start (`make_new_client_evaluate`),
  as record entries `new_client_<start>`; {} without held-out clients."""
  data, config = exp.data, exp.config
  if not data.new_train_parts:
    return {}
  ids = np.arange(len(data.new_train_parts))
  rng = np.random.default_rng([config.seed, 2])
  indices, mask = blocks.train_block_indices(data.new_train_parts, ids, config.fed.new_client_steps,
                                             config.fed.batch_size, rng)
  train_block = blocks.gather_block(data.train_pool, indices, mask)
  test_block = blocks.padded_eval_block(data.test_pool, data.new_test_parts)
  signatures = (exp.new_signatures if exp.new_signatures is not None
                else np.zeros((len(ids), 0), np.float32))
  evaluate_new = jax.jit(task_lib.make_new_client_evaluate(exp.task, exp.fed_round, exp.client_update))
  inputs = jax.device_put((train_block, test_block, signatures), NamedSharding(exp.mesh, P()))
  accuracies = evaluate_new(state, frozen, *inputs)
  return {f"new_client_{name}": float(np.mean(distributed.to_host(acc))) for name, acc in accuracies.items()}


def config_differences(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The fields (dotted) in which `config` differs from the one recorded in `workdir` ([] when
  they agree or none is recorded), besides those a run may change on resume."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  saved_flat = traverse_util.flatten_dict(saved, sep=".")
  current_flat = traverse_util.flatten_dict(used_config(config, methods.METHOD_BLOCKS), sep=".")
  for field, as_before in ADDED_FIELDS.items():
    if field not in saved_flat and current_flat.get(field) == as_before:
      saved_flat[field] = as_before
  return sorted(k for k in set(saved_flat) | set(current_flat)
                if saved_flat.get(k) != current_flat.get(k) and k not in RESUMABLE_FIELDS)


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir holding another config (every process checks), then the main process
  records this one."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = used_config(config, methods.METHOD_BLOCKS)
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path) and os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ConfigError(f"workdir {workdir} has checkpoints but no {CONFIG_FILE}, so its config cannot "
                      f"be checked against this one; restore the file or use a new workdir")
  changed = config_differences(workdir, config)
  if changed:
    raise ConfigError(f"workdir {workdir} holds a run with a different config (fields: "
                      f"{', '.join(changed)}); use a new workdir or the same config")
  distributed.barrier("config checked")
  if distributed.is_main_process():
    with open(path, "w") as f:
      json.dump(current, f, indent=2)


def environment(exp: Experiment) -> dict:
  """What a run's numbers depend on besides its config: versions, backend, devices, and the
  values the config left to the machine (the measured `clients_per_chunk`, the backbone dtype)."""
  versions = {name: importlib.metadata.version(name)
              for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")}
  return {"python": platform.python_version(), **versions, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "processes": jax.process_count(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
          "clients_per_chunk": exp.fed_round.clients_per_chunk,
          "backbone_dtype": str(jnp.dtype(exp.task.compute_dtype))}


def _cpu_name() -> str:
  """The CPU's model name (Linux), else the machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()
  except OSError:
    return platform.machine()


def _read_environment(workdir: str) -> dict:
  path = os.path.join(workdir, ENVIRONMENT_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_environment(workdir: str, exp: Experiment) -> None:
  with open(os.path.join(workdir, ENVIRONMENT_FILE), "w") as f:
    json.dump(environment(exp), f, indent=2)


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def metrics_snapshot_path(workdir: str, step: int) -> str:
  """The copy of rounds 1..step of metrics.jsonl kept with checkpoint `step`."""
  return os.path.join(workdir, "checkpoints", f"metrics-{step}.jsonl")


def save_metrics_snapshot(workdir: str, step: int, records: list[dict], manager: ocp.CheckpointManager) -> None:
  """Keeps rounds 1..step of the metrics beside checkpoint `step`, so that a lost or damaged
  metrics.jsonl can be rebuilt on resume; drops the copies of checkpoints orbax has removed."""
  reporting.write_records(metrics_snapshot_path(workdir, step), [r for r in records if r["round"] <= step])
  kept = set(manager.all_steps()) | {step}
  directory = os.path.join(workdir, "checkpoints")
  for name in os.listdir(directory):
    if name.startswith("metrics-") and name.endswith(".jsonl") and int(name[8:-6]) not in kept:
      os.remove(os.path.join(directory, name))


def restore_state(manager: ocp.CheckpointManager, state: Any) -> tuple[Any, int]:
  """(state, rounds done) from the latest checkpoint, or (state, 0) if there is none.

  Raises:
    RuntimeError: a checkpoint exists but cannot be restored (it is left in place).
  """
  step = manager.latest_step()
  if step is None:
    return state, 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax raises several types for unreadable files.
    restored = _restore_older(manager, step, state)
    if restored is None:
      manager.close()
      raise RuntimeError(f"checkpoint {manager.directory}/{step} is corrupt or incompatible "
                         f"({type(e).__name__}: {e}); it was left untouched. Move it away to "
                         f"resume from an earlier one, or use a new workdir.") from e
  return restored, step


def restore_run(config: ml_collections.ConfigDict, workdir: str, *, finished: bool = True,
                log: Callable[[str], None] = lambda _: None) -> tuple[Experiment, Any, int]:
  """A run's experiment and its state at its latest checkpoint, to evaluate or inspect it.

  Args:
    config: the ConfigDict the run was started with (its `config.json` holds the fields used).
    workdir: the run's directory.
    finished: require the checkpoint to be the run's last round (`config.fed.num_rounds`).
  Returns:
    (experiment as `build_experiment` makes it, restored state, rounds done).
  Raises:
    ValueError: `finished` and the run has no checkpoint of its last round.
    RuntimeError: the checkpoint is corrupt (it is left in place).
  """
  exp = build_experiment(config, log=log)
  state = exp.fed_round.init(jax.random.key(config.seed), exp.initial_trainable, exp.signatures)
  manager = _checkpoint_manager(workdir)
  state, done = restore_state(manager, state)  # On a corrupt checkpoint it closes the manager and raises.
  manager.close()
  if finished and done < config.fed.num_rounds:
    raise ValueError(f"{workdir}: its latest checkpoint is of round {done} of {config.fed.num_rounds}")
  return exp, state, done


# Aggregator-state entries added after checkpoints were written without them (per-round
# metrics of HyperLoRA's synthesizer, 2026-11-26): such a checkpoint restores with these
# entries at their initial values.
ADDED_AGGREGATOR_ENTRIES = synthesis.DIAGNOSTIC_METRICS


def _restore_older(manager: ocp.CheckpointManager, step: int, state: Any) -> Any | None:
  """`state` restored from a checkpoint written before `ADDED_AGGREGATOR_ENTRIES` existed (they
  keep `state`'s values), or None when the state has none of them or that fails too."""
  agg = state.get("agg")
  added = [k for k in ADDED_AGGREGATOR_ENTRIES if isinstance(agg, dict) and k in agg]
  if not added:
    return None
  older = {**state, "agg": {k: v for k, v in agg.items() if k not in added}}
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, older)))
  except Exception:  # Not an older checkpoint either: the caller reports the first error.
    return None
  return {**restored, "agg": {**restored["agg"], **{k: agg[k] for k in added}}}


def run_evaluator(exp: Experiment) -> Callable[..., Callable[[], tuple[float, np.ndarray]]]:
  """The run's evaluation: `evaluate(state, frozen, transform_images=None)` dispatches the
  evaluation of `state` and returns `collect()`, which waits for it and gives (global accuracy
  (NaN without a global model), [N] client accuracies). In between, the state may be donated
  to the next round: the evaluation was enqueued first and reads it first. It loops over the
  data's evaluation blocks, sharded over the clients mesh axis (examples of the global test
  blocks, clients of the client blocks): held on the devices once when the images are in
  memory, read again at each evaluation when they are streamed.

  `transform_images`: images [..., H, W, 3] uint8 -> the same shape and dtype, applied to
  every test block before it is evaluated (a test-time shift, `data.corruptions`); the blocks
  are then read again, and the compiled evaluation is reused."""
  chunk = exp.fed_round.clients_per_chunk
  evaluation = task_lib.make_evaluate(exp.task, exp.fed_round, eval_batch=exp.config.eval_batch,
                                      clients_per_chunk=chunk)
  global_counts, client_accuracy = jax.jit(evaluation.global_counts), jax.jit(evaluation.client_accuracy)
  data = exp.data
  sharded = primitives.clients_sharding(exp.mesh)
  multiple = math.lcm(chunk or 1, exp.mesh.size)

  def blocks_on_device(transform_images=None):
    def shifted(block):
      return block if transform_images is None else {**block, "image": transform_images(block["image"])}
    return ([jax.device_put(shifted(b), sharded) for b in data.global_test_blocks()],
            [jax.device_put((ids, shifted(b)), sharded) for ids, b in data.client_test_blocks(multiple=multiple)])
  cached = None if exp.config.data.stream else blocks_on_device()

  def evaluate(state, frozen, transform_images=None):
    shifted_or_streamed = transform_images is not None or cached is None
    global_blocks, client_blocks = blocks_on_device(transform_images) if shifted_or_streamed else cached
    counts = [global_counts(state, frozen, block) for block in global_blocks]
    per_client = [client_accuracy(state, frozen, ids, block) for ids, block in client_blocks]

    def collect():
      correct = count = np.float32(0.0)
      for c, n in counts:  # Integer counts: exact in float32, as on the device.
        correct, count = correct + np.float32(c), count + np.float32(n)
      global_accuracy = float(correct / max(count, np.float32(1.0)))
      accuracies = np.concatenate([distributed.to_host(a) for a in per_client])[:data.num_clients]
      return (global_accuracy if exp.method.has_global_model else math.nan), accuracies

    return collect

  return evaluate


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/.lock` (an exclusive `flock`, released when the run ends or its process
  dies, kill -9 included) so that two runs never write one workdir.

  Raises:
    RuntimeError: another process (or another run in this one) holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise RuntimeError(f"workdir {workdir} is in use by another run (pid {f.read().strip() or '?'}); "
                         f"wait for it or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield  # Closing the file releases the lock.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_round: int | None = None, log: Callable[[str], None] = print,
                       progress: bool = True) -> dict:
  """Runs (or resumes) a federated LoRA experiment in `workdir` (locked while it runs; with
  several processes the main one holds the lock).

  Args:
    stop_after_round: stop (without checkpointing) after this many rounds, as a killed run
      would; for resume tests.
  Returns:
    {"records": metrics.jsonl records, "summary": str, "round_traces": times the round
     function was traced (1 for a whole run), "seconds": wall time of this call}.
  """
  lock = workdir_lock(workdir) if distributed.is_main_process() else contextlib.nullcontext()
  with lock:
    return _train_and_evaluate(config, workdir, stop_after_round=stop_after_round, log=log,
                               progress=progress)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after_round: int | None,
                        log: Callable[[str], None], progress: bool) -> dict:
  start_time = time.time()
  main_process = distributed.is_main_process()
  if jax.process_count() > 1:  # Data and backbone are prepared once, by the main process.
    if main_process:
      prepare_dataset(config.data.name, config.data.data_dir or None)
      if not config.pretrain.get("npz_path"):
        prepare_dataset(config.pretrain.data_name, config.data.data_dir or None)
        pretrain.load_or_pretrain(config, log)
    distributed.barrier("data and backbone prepared")
  recorded = _read_environment(workdir)
  build_config = config
  if config.fed.clients_per_chunk == autotune.AUTO and "clients_per_chunk" in recorded:
    build_config = ml_collections.ConfigDict(config.to_dict())  # A resumed run keeps its chunk.
    build_config.fed.clients_per_chunk = recorded["clients_per_chunk"]
  exp = build_experiment(build_config, log if main_process else (lambda _: None))
  os.makedirs(workdir, exist_ok=True)
  _check_resumable(workdir, config)
  if main_process:
    _write_environment(workdir, exp)
  replicated = NamedSharding(exp.mesh, P())
  per_client = primitives.clients_sharding(exp.mesh)
  state = exp.fed_round.init(jax.random.key(config.seed), exp.initial_trainable, exp.signatures)
  # Host copies go to the global mesh (identical on every process); one process: no copy.
  to_mesh = (lambda t: t) if jax.process_count() == 1 else (lambda t: jax.tree.map(np.asarray, t))
  state = jax.device_put(to_mesh(state), federated.state_shardings(state, exp.mesh))
  frozen = jax.device_put(to_mesh(task_lib.frozen_tree(exp.backbone, dtype=exp.task.compute_dtype)), replicated)
  manager = _checkpoint_manager(workdir)
  state, done = restore_state(manager, state)
  records = [r for r in reporting.read_metrics(workdir) if r.get("round", 0) <= done]
  rebuilt = False
  if [r.get("round") for r in records] != list(range(1, done + 1)):  # Counters continue from `done`.
    records = reporting.read_records(metrics_snapshot_path(workdir, done))  # The checkpoint's copy.
    if [r.get("round") for r in records] != list(range(1, done + 1)):
      manager.close()
      raise RuntimeError(f"{workdir}/{reporting.METRICS_FILE} lacks rounds of the {done} the checkpoint "
                         f"has done, and the checkpoint holds no copy of them; restore the file or use "
                         f"a new workdir (nothing was changed)")
    rebuilt = True
  if main_process:
    if rebuilt:
      reporting.write_records(os.path.join(workdir, reporting.METRICS_FILE), records)
      log(f"{workdir}/{reporting.METRICS_FILE} lacked checkpointed rounds: rebuilt rounds 1-{done} "
          f"from the checkpoint's copy")
    else:
      reporting.truncate_metrics(workdir, done)
  distributed.barrier("metrics truncated")
  if done:
    log(f"resumed from round {done} in {workdir}")

  traces = []

  def traced_round(*args):
    traces.append(1)
    return exp.fed_round.step(*args)

  round_fn = jax.jit(traced_round, donate_argnums=(0,))
  aggregator_metrics = exp.fed_round.aggregator.capabilities.metrics
  private = methods.dp_on(config)
  global_is_finite = jax.jit(lambda state: primitives.is_finite(exp.fed_round.global_params(state)))
  evaluate = run_evaluator(exp)
  cum_up = records[-1]["cum_bytes_up"] if records else 0
  cum_down = records[-1]["cum_bytes_down"] if records else 0
  last_round = config.fed.num_rounds if stop_after_round is None else min(stop_after_round, config.fed.num_rounds)
  bar = tqdm(range(done, last_round), initial=done, total=config.fed.num_rounds,
             desc=config.method, disable=not (progress and main_process), leave=False)
  prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # Round r+1's block while r runs.
  upcoming = prefetch.submit(round_on_mesh, exp, done, per_client) if done < last_round else None
  has_test = exp.data.has_test_examples()

  def finish(pending: _PendingRound) -> None:
    """Round `pending.index`'s host work: metrics to host, the finiteness check, evaluation
    results, logs and the metrics line. Runs while the next round computes."""
    nonlocal cum_up, cum_down
    r, round_metrics = pending.index, pending.metrics
    up, down = communication_bytes(exp, r, pending.client_ids)
    cum_up, cum_down = cum_up + up, cum_down + down
    record = {"round": r + 1, "train_loss": float(round_metrics["train_loss"]),
              **{name: _number(round_metrics[name]) for name in aggregator_metrics},
              "nonfinite_clients": int(round_metrics["nonfinite_clients"]),
              **{key: int(round_metrics[key]) for key in REJECTION_METRICS},
              **{key: int(value) for key, value in round_metrics.items() if key.startswith("faults_")},
              **{key: jax.tree.map(float, round_metrics[key]) for key in diagnostics.METRICS
                 if key in round_metrics},
              **({"dp_epsilon": privacy_spent(config, r + 1, exp.method)} if private else {}),
              "bytes_up": up, "bytes_down": down, "cum_bytes_up": cum_up,
              "cum_bytes_down": cum_down, "cum_bytes": cum_up + cum_down}
    if not bool(pending.global_finite):  # Not recorded, not saved; its evaluation is discarded.
      manager.wait_until_finished()
      last_saved = manager.latest_step()
      manager.close()
      raise FloatingPointError(
          f"round {r + 1}: the global model is non-finite, so it is not evaluated and the run stops "
          f"(rejected this round: {', '.join(f'{k}={record[k]}' for k in REJECTION_METRICS)}); "
          + (f"the last checkpoint is step {last_saved} in {workdir}" if last_saved is not None
             else f"no checkpoint was saved in {workdir}"))
    if pending.collect_evaluation is not None:
      global_accuracy, acc = pending.collect_evaluation()
      record.update(global_accuracy=global_accuracy,
                    personalized_accuracy_mean=float(acc[has_test].mean()),
                    personalized_accuracy_worst=float(acc[has_test].min()))
      bar.set_postfix(acc=f"{record['global_accuracy']:.3f}",
                      pers=f"{record['personalized_accuracy_mean']:.3f}")
    record.update(pending.new_clients)
    rejected = [key for key in REJECTION_METRICS if record[key]]
    if rejected and main_process:
      log(f"round {r + 1}: the server rejected a non-finite or exploding {', '.join(rejected)} "
          f"and kept the previous state for it")
    if record["nonfinite_clients"] and main_process:
      log(f"round {r + 1}: {record['nonfinite_clients']} client update(s) were non-finite and "
          f"were left out of the aggregate")
    records.append(reporting.append_metrics(workdir, record) if main_process else reporting.clean_record(record))

  pending = None
  for r in bar:
    (block, ids, weights), host_ids = upcoming.result()
    upcoming = prefetch.submit(round_on_mesh, exp, r + 1, per_client) if r + 1 < last_round else None
    state, round_metrics = round_fn(state, frozen, block, ids, weights)  # Dispatched, not waited for.
    if pending is not None:
      finish(pending)  # Round r-1's host work while round r computes.
    evaluating = (r + 1) % config.eval_every == 0 or r + 1 == config.fed.num_rounds
    # The evaluation is enqueued before round r+1, which donates this state, so it reads it first.
    # A non-finite global is found in `finish` and never recorded or saved.
    pending = _PendingRound(
        index=r, metrics=round_metrics, client_ids=host_ids, global_finite=global_is_finite(state),
        collect_evaluation=evaluate(state, frozen) if evaluating else None,
        new_clients=evaluate_new_clients(exp, state, frozen) if r + 1 == config.fed.num_rounds else {})
    saving = (r + 1) % config.checkpoint_every == 0 or r + 1 == config.fed.num_rounds
    if saving or r + 1 == last_round:  # A saved state is checked first; the last round ends here.
      finish(pending)
      pending = None
    if saving:
      manager.save(r + 1, args=ocp.args.StandardSave(state))
      if main_process:
        save_metrics_snapshot(workdir, r + 1, records, manager)
  bar.close()
  prefetch.shutdown()
  manager.wait_until_finished()
  manager.close()
  title = f"{config.method} on {config.data.name} ({config.data.partition})"
  text = reporting.summary(records, title)
  if main_process and records and records[-1]["round"] == config.fed.num_rounds:
    reporting.plot_convergence(records, os.path.join(workdir, reporting.PLOT_FILE), title)
  return {"records": records, "summary": text, "round_traces": len(traces),
          "seconds": time.time() - start_time}
