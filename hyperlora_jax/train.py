"""`train_and_evaluate(config, workdir)`: rounds, evaluation, metrics, checkpoints, resume."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from hyperlora_jax import client as client_lib
from hyperlora_jax import engine, lora, methods, models, pretrain, reporting
from hyperlora_jax import params as params_lib
from hyperlora_jax.config_validation import ConfigError, validate_config
from hyperlora_jax.data import blocks
from hyperlora_jax.federated_data import FederatedData, build_federated_data

CONFIG_FILE = "config.json"
# Fields a resumed run may change (they do not alter the rounds already done).
RESUMABLE_FIELDS = ("fed.num_rounds", "eval_every", "checkpoint_every")


def build_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """sgd (with optional momentum), adam or adamw from an optimizer config block."""
  if cfg.name == "sgd":
    return optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
  if cfg.name == "adam":
    return optax.adam(cfg.learning_rate)
  return optax.adamw(cfg.learning_rate)


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from the config."""
  config: ml_collections.ConfigDict
  data: FederatedData
  adapted: client_lib.AdaptedModel
  method: methods.Method
  backbone: Any
  targets: dict
  initial_trainable: Any
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  mesh: Any


def initial_trainable(model, backbone: Any, example_images: jax.Array, target_regex: str, rank: int,
                      rng: jax.Array) -> tuple[dict, dict]:
  """The round-0 trainable pytree and the LoRA targets.

  Args:
    example_images: [1, H, W, 3] uint8, for shapes only.
  Returns:
    ({"lora": fresh LoRA (b = 0), "head": zero head shaped like the model's}, targets
     {path: (d_in, d_out)}).
  """
  inputs = models.preprocess_images(example_images)
  abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["params"]["head"])
  targets = lora.find_targets(model, {"params": {**backbone["params"], "head": head}}, inputs,
                              target_regex=target_regex)
  return {"lora": lora.init_lora(rng, targets, rank), "head": head}, targets


def build_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """Validates the config, loads data and backbone, builds the method (no compilation yet)."""
  validate_config(config, methods.METHODS)
  mesh = engine.make_mesh(config.fed.num_devices)
  if config.fed.clients_per_chunk and config.fed.clients_per_chunk % mesh.size:
    raise ConfigError(f"fed.clients_per_chunk: {config.fed.clients_per_chunk} must be a multiple of "
                      f"the {mesh.size} devices of the clients mesh axis")
  method = methods.build_method(config)
  server = config.server_optimizer
  if method.plain_server and (server.name, server.learning_rate, server.momentum) != ("sgd", 1.0, 0.0):
    raise ConfigError(f"server_optimizer: method {config.method!r} is exact only with a plain server "
                      f"step (name='sgd', learning_rate=1.0, momentum=0.0), got {server.to_dict()}")
  data = build_federated_data(config)
  backbone, _ = pretrain.load_or_pretrain(config, log)
  arch = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  model = models.build_model(config.model.name, data.num_classes, **arch)
  adapted = client_lib.AdaptedModel(model, lora.lora_scale(config.lora.alpha, config.lora.rank,
                                                           config.lora.rslora))
  trainable, targets = initial_trainable(model, backbone, data.global_test["image"][:1],
                                         config.lora.target_regex, config.lora.rank,
                                         jax.random.fold_in(jax.random.key(config.seed), 1))
  return Experiment(config, data, adapted, method, backbone, targets, trainable,
                    build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer),
                    mesh)


def round_inputs(exp: Experiment, round_index: int) -> tuple[dict, np.ndarray, np.ndarray]:
  """The sampled clients' padded block, ids and weights for one round.

  Depends only on (seed, round): the sampler position is the round index.
  Returns:
    block {"image": [C, S, B, H, W, 3], "label", "mask"}, client_ids [C] (-1 = padding),
    weights [C] = n_k / Σ n_j over the sampled clients.
  """
  config, data = exp.config, exp.data
  rng = np.random.default_rng([config.seed, 1, round_index])
  ids = blocks.sample_clients(data.num_clients, config.fed.clients_per_round, rng)
  multiple = config.fed.clients_per_chunk or exp.mesh.size
  ids = blocks.pad_client_ids(ids, math.lcm(multiple, exp.mesh.size))
  indices, mask = blocks.train_block_indices(data.train_parts, ids, config.fed.local_steps,
                                             config.fed.batch_size, rng)
  sizes = np.where(ids >= 0, data.train_sizes()[np.maximum(ids, 0)], 0).astype(np.float32)
  return blocks.gather_block(data.train_pool, indices, mask), ids.astype(np.int32), sizes / sizes.sum()


def communication_bytes(exp: Experiment, round_index: int, participants: int) -> tuple[int, int]:
  """(bytes up, bytes down) of one round, summed over its participants.

  Each participant sends up, and receives down, every leaf that is shared and trained this
  round (frozen leaves are known to both sides: FFA-LoRA's A, RoLoRA's idle factor); down adds
  what the method sends besides (FedEx-LoRA's full-rank residual, FLoRA's stacked factors).
  """
  method, trainable = exp.method, exp.initial_trainable
  local = params_lib.regex_mask(trainable, method.local_regex)
  frozen = params_lib.regex_mask(trainable, method.frozen_regexes[round_index % len(method.frozen_regexes)])
  sent = jax.tree.map(lambda l, f: not l and not f, local, frozen)
  per_client = params_lib.num_bytes(trainable, sent)
  extra = method.extra_down_bytes(exp.targets, exp.config.lora.rank, participants)
  return participants * per_client, participants * (per_client + extra)


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    saved_flat = traverse_util.flatten_dict(saved, sep=".")
    current_flat = traverse_util.flatten_dict(current, sep=".")
    changed = sorted(k for k in set(saved_flat) | set(current_flat)
                     if saved_flat.get(k) != current_flat.get(k) and k not in RESUMABLE_FIELDS)
    if changed:
      raise ConfigError(f"workdir {workdir} holds a run with a different config (fields: "
                        f"{', '.join(changed)}); use a new workdir or the same config")
  with open(path, "w") as f:
    json.dump(current, f, indent=2)


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


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
    manager.close()
    raise RuntimeError(f"checkpoint {manager.directory}/{step} is corrupt or incompatible "
                       f"({type(e).__name__}: {e}); it was left untouched. Move it away to "
                       f"resume from an earlier one, or use a new workdir.") from e
  return restored, step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_round: int | None = None, log: Callable[[str], None] = print,
                       progress: bool = True) -> dict:
  """Runs (or resumes) a federated LoRA experiment in `workdir`.

  Args:
    stop_after_round: stop (without checkpointing) after this many rounds, as a killed run
      would; for resume tests.
  Returns:
    {"records": metrics.jsonl records, "summary": str, "round_traces": times the round
     function was traced (1 for a whole run), "seconds": wall time of this call}.
  """
  start_time = time.time()
  exp = build_experiment(config, log)
  os.makedirs(workdir, exist_ok=True)
  _check_resumable(workdir, config)
  replicated = NamedSharding(exp.mesh, P())
  per_client = NamedSharding(exp.mesh, P(engine.CLIENTS_AXIS))
  state = engine.init_server_state(jax.random.key(config.seed), exp.method, exp.initial_trainable,
                                   exp.data.num_clients, exp.server_optimizer, exp.targets)
  state = jax.device_put(state, replicated)
  backbone = jax.device_put(exp.backbone, replicated)
  manager = _checkpoint_manager(workdir)
  state, done = restore_state(manager, state)
  reporting.truncate_metrics(workdir, done)
  if done:
    log(f"resumed from round {done} in {workdir}")

  traces = []
  round_step = engine.make_round_step(exp.adapted, exp.method, exp.client_optimizer,
                                      exp.server_optimizer, num_clients=exp.data.num_clients,
                                      clients_per_chunk=config.fed.clients_per_chunk,
                                      mesh=exp.mesh if exp.mesh.size > 1 else None)

  def traced_round(*args):
    traces.append(1)
    return round_step(*args)

  round_fn = jax.jit(traced_round, donate_argnums=(0,))
  evaluate = jax.jit(engine.make_evaluate(exp.adapted, exp.method, eval_batch=config.eval_batch))
  global_test = jax.device_put(exp.data.global_test, replicated)
  client_test = jax.device_put(exp.data.client_test, replicated)
  records = reporting.read_metrics(workdir)
  cum_up = records[-1]["cum_bytes_up"] if records else 0
  cum_down = records[-1]["cum_bytes_down"] if records else 0
  last_round = config.fed.num_rounds if stop_after_round is None else min(stop_after_round, config.fed.num_rounds)
  bar = tqdm(range(done, last_round), initial=done, total=config.fed.num_rounds,
             desc=config.method, disable=not progress, leave=False)
  for r in bar:
    block, ids, weights = round_inputs(exp, r)
    block, ids, weights = jax.device_put((block, ids, weights), per_client)
    state, round_metrics = round_fn(state, backbone, block, ids, weights)
    up, down = communication_bytes(exp, r, int(np.sum(np.asarray(ids) >= 0)))
    cum_up, cum_down = cum_up + up, cum_down + down
    record = {"round": r + 1, "train_loss": float(round_metrics["train_loss"]),
              "nonfinite_clients": int(round_metrics["nonfinite_clients"]),
              "bytes_up": up, "bytes_down": down, "cum_bytes_up": cum_up,
              "cum_bytes_down": cum_down, "cum_bytes": cum_up + cum_down}
    if (r + 1) % config.eval_every == 0 or r + 1 == config.fed.num_rounds:
      ev = evaluate(state, backbone, global_test, client_test)
      acc = np.asarray(ev["client_accuracy"])
      has_test = np.array([len(p) > 0 for p in exp.data.test_parts])
      record.update(global_accuracy=float(ev["global_accuracy"]),
                    personalized_accuracy_mean=float(acc[has_test].mean()),
                    personalized_accuracy_worst=float(acc[has_test].min()))
      bar.set_postfix(acc=f"{record['global_accuracy']:.3f}",
                      pers=f"{record['personalized_accuracy_mean']:.3f}")
    if record["nonfinite_clients"]:
      log(f"round {r + 1}: {record['nonfinite_clients']} client update(s) were non-finite and "
          f"were left out of the aggregate")
    records.append(reporting.append_metrics(workdir, record))
    if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.fed.num_rounds:
      manager.save(r + 1, args=ocp.args.StandardSave(state))
  bar.close()
  manager.wait_until_finished()
  manager.close()
  title = f"{config.method} on {config.data.name} ({config.data.partition})"
  text = reporting.summary(records, title)
  if records and records[-1]["round"] == config.fed.num_rounds:
    reporting.plot_convergence(records, os.path.join(workdir, reporting.PLOT_FILE), title)
  return {"records": records, "summary": text, "round_traces": len(traces),
          "seconds": time.time() - start_time}
