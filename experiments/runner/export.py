"""A run's adapters as Hugging Face PEFT directories: the global model's and any client's
personalized one, at a checkpointed round (`python -m experiments.export`) or every
`export_every` rounds while the run trains.

  workdir/adapters/round-<R>/global/      the model evaluated as global (`FederatedRound.global_params`)
  workdir/adapters/round-<R>/client-<k>/  client k's personalized model: the one it starts its next
                                          round from and is evaluated on (`FederatedRound.client_params`)

Each directory holds what `hl.peft.save_peft` writes (adapter_model.safetensors,
adapter_config.json with `base_model_name_or_path` and `task_type`, hyperlora_jax_adapter.json)
and export.json (the run, round, client, method, and what was folded or set apart). The base
model is the run's `pretrain.checkpoint` (absolute) or the embedded decoder's cached directory,
which is itself a Hugging Face checkpoint, so `peft.AutoPeftModelForCausalLM.from_pretrained(dir)`
loads a text run's adapter with no other argument. An image run's adapter carries its trained
classifier head apart, in classifier_head.safetensors (its Flax paths; PEFT's `modules_to_save`
would need the head in the base model), and one on the embedded image model (no Hugging Face
checkpoint) is named by Flax paths, for `hl.peft.load_peft`.

FedEx-LoRA's and FLoRA's servers merge full-rank residuals into the frozen weights
(`ServerState.base_delta`), which no LoRA adapter of rank r holds: they are folded into the
adapter by `peft.fold_base_delta` (exact, at each layer's numerical rank, unless `max_rank`
truncates it; export.json records the ranks and the relative error).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from experiments.runner import backbone as backbone_lib
from experiments.runner.assembly import Experiment
from experiments.runner.evaluation import model_functions
from experiments.runner.settings import BackboneSettings
from hyperlora_jax import distributed, files, peft

ADAPTERS_DIR = "adapters"
EXPORT_FILE = "export.json"
HEAD_FILE = "classifier_head.safetensors"
GLOBAL = "global"


@dataclasses.dataclass(frozen=True)
class AdapterTarget:
  """Where a run's adapters attach.

  Attributes:
    module_name: Flax path -> the base model's module name (None: the Flax path with '.').
    base_model_name_or_path: adapter_config.json's base model ('' for none).
    task_type: PEFT's task type ("CAUSAL_LM" for a text run; None: a bare model).
    tied_heads: {embedding path: output head name} of a decoder that ties its table.
  """

  module_name: Callable[[str], str | None] | None
  base_model_name_or_path: str
  task_type: str | None
  tied_heads: dict[str, str]


def adapter_target(backbone: BackboneSettings, exp: Experiment, base_model: str = "") -> AdapterTarget:
  """The `AdapterTarget` of a run: its Hugging Face checkpoint's module names and directory
  (a text run without `pretrain.checkpoint`: the embedded decoder's cache, opened and verified),
  or, for the embedded image model, Flax paths and no base model.

  Args:
    backbone: the run's `settings.backbone_settings(config)` (`model.*` final).
    exp: its experiment.
    base_model: written as `base_model_name_or_path` instead (e.g. a hub name the checkpoint
      was downloaded from).
  """
  text = exp.settings.text
  if text:
    checkpoint = backbone_lib.decoder_checkpoint(backbone, log=lambda _: None)
  else:
    checkpoint = backbone_lib.opened_checkpoint(backbone.checkpoint)
  tied = text and bool(getattr(exp.task.model, "tie_embeddings", False))
  return AdapterTarget(
    module_name=checkpoint.module_namer() if checkpoint is not None else None,
    base_model_name_or_path=base_model or (os.path.abspath(checkpoint.directory) if checkpoint is not None else ""),
    task_type="CAUSAL_LM" if text else None,
    tied_heads={"embed": "lm_head"} if tied else {},
  )


def parse_clients(spec: str, num_clients: int) -> list[int]:
  """Client ids from `spec`: '' (none), 'all', or comma-separated ids in [0, num_clients).

  Raises:
    ValueError: an id that is not an integer or not a training client, naming it.
  """
  spec = spec.strip()
  if not spec:
    return []
  if spec == "all":
    return list(range(num_clients))
  ids = []
  for item in spec.split(","):
    try:
      client = int(item)
    except ValueError:
      raise ValueError(f"clients: {item!r} is not a client id (give ids, 'all' or nothing)") from None
    if not 0 <= client < num_clients:
      raise ValueError(f"clients: {client} is not a training client (ids 0..{num_clients - 1})")
    ids.append(client)
  return sorted(set(ids))


def models_of(functions: tuple[Callable, Callable], state: Any, clients: Sequence[int]) -> dict[str, dict]:
  """{"global": trainable tree, "client-<k>": client k's personalized tree}, numpy on the host.

  Args:
    functions: `evaluation.model_functions(fed_round)`.
    state: the server state.
    clients: client ids.
  """
  global_model, client_model = functions
  models = {GLOBAL: distributed_tree(global_model(state))}
  for client in clients:
    models[f"client-{client}"] = distributed_tree(client_model(state, jnp.int32(client)))
  return models


def distributed_tree(tree: Any) -> Any:
  """Every leaf as a numpy array on the host (gathered over processes)."""
  return jax.tree.map(lambda x: np.asarray(distributed.to_host(x)), tree)


def embedding_paths(variables: dict, paths: Sequence[str]) -> list[str]:
  """The adapter paths that are embedding tables in `variables` (their params hold 'embedding')."""
  found = []
  for path in paths:
    node: Any = variables.get("params", {})
    for part in path.split("/"):
      node = node.get(part, {}) if isinstance(node, Mapping) else {}
    if isinstance(node, Mapping) and "embedding" in node:
      found.append(path)
  return found


def write_adapter(
  directory: str,
  trainable: dict,
  base_delta: dict,
  exp: Experiment,
  target: AdapterTarget,
  *,
  max_rank: int = 0,
  info: dict | None = None,
) -> dict:
  """Writes one model's adapter (and head) in `directory`; returns what export.json records.

  Args:
    trainable: {"lora": {path: {"a": [d_in, r], "b": [r, d_out]}}, "head": ...} (host arrays).
    base_delta: {path: [d_in, d_out]} the server's residuals ({} for most methods).
    max_rank: the most ranks a folded residual keeps (0: exact).
    info: more fields for export.json (run, round, client).
  """
  settings = exp.settings
  scale = exp.task.scale
  adapter, errors = peft.fold_base_delta(trainable["lora"], base_delta, scale, max_rank=max_rank)
  mode = peft.common_rank(adapter)
  # The run's own alpha where the ranks are the run's (every method but a folded one).
  alpha = (
    settings.lora.alpha if mode == settings.lora.rank else peft.alpha_for_scale(adapter, scale, settings.lora.rslora)
  )
  embeddings = embedding_paths(exp.backbone, list(adapter))
  peft.save_peft(
    directory,
    adapter,
    alpha=alpha,
    rslora=settings.lora.rslora,
    base_model_name_or_path=target.base_model_name_or_path,
    module_name=target.module_name,
    embeddings=embeddings,
    tied_heads={p: h for p, h in target.tied_heads.items() if p in embeddings},
    task_type=target.task_type,
  )
  head = trainable.get("head") or {}
  record = {**(info or {}), "scale": float(scale), "lora_alpha": float(alpha), "rank": mode}
  if head:
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(head, sep="/")
    save_file({f"head/{name}": np.asarray(x) for name, x in flat.items()}, os.path.join(directory, HEAD_FILE))
    record["classifier_head"] = HEAD_FILE
  if base_delta:
    record["folded_base_delta"] = {
      path: {"rank": int(np.shape(adapter[path]["a"])[-1]), "relative_error": errors[path]} for path in errors
    }
  files.atomic_write_json(os.path.join(directory, EXPORT_FILE), record, indent=2)
  return record


def export_state(
  exp: Experiment,
  state: Any,
  directory: str,
  target: AdapterTarget,
  clients: Sequence[int] = (),
  *,
  round_done: int,
  workdir: str = "",
  max_rank: int = 0,
  functions: tuple[Callable, Callable] | None = None,
) -> list[str]:
  """Writes the global adapter and `clients`' personalized adapters of `state` under
  `directory` (global/, client-<k>/) from the main process; every process computes them.
  `functions`: `evaluation.model_functions(exp.fed_round)`, made here when not given (a run
  that exports every N rounds gives its own, compiled once).

  Returns:
    The directories written (main process; [] on the others).
  """
  models = models_of(functions or model_functions(exp.fed_round), state, clients)
  base_delta = distributed_tree(dict(state.base_delta or {}))
  if not distributed.is_main_process():
    return []
  written = []
  for name, trainable in models.items():
    out = os.path.join(directory, name)
    info = {
      "workdir": os.path.abspath(workdir) if workdir else "",
      "round": round_done,
      "method": exp.method.name,
      "model": "global" if name == GLOBAL else "personalized",
      **({"client": int(name.split("-", 1)[1])} if name != GLOBAL else {}),
    }
    write_adapter(out, trainable, base_delta, exp, target, max_rank=max_rank, info=info)
    written.append(out)
  return written


class AdapterWriter:
  """A training run's `export_every`: `write(state, round)` writes round R's global adapter and
  `export_clients`' personalized ones in workdir/adapters/round-<R> (`export_state`)."""

  def __init__(self, exp: Experiment, backbone: BackboneSettings, workdir: str):
    self.exp, self.workdir = exp, workdir
    self.target = adapter_target(backbone, exp)
    self.clients = parse_clients(exp.settings.export_clients, exp.data.num_clients)
    self.functions = model_functions(exp.fed_round)

  def write(self, state: Any, round_done: int) -> list[str]:
    return export_state(
      self.exp,
      state,
      round_directory(self.workdir, round_done),
      self.target,
      self.clients,
      round_done=round_done,
      workdir=self.workdir,
      functions=self.functions,
    )


def round_directory(workdir: str, round_done: int) -> str:
  """workdir/adapters/round-<R>."""
  return os.path.join(workdir, ADAPTERS_DIR, f"round-{round_done}")


def read_export(directory: str) -> dict:
  """A written adapter directory's export.json."""
  with open(os.path.join(directory, EXPORT_FILE)) as f:
    return json.load(f)
