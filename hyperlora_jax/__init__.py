"""hyperlora_jax: federated LoRA fine-tuning of foundation models in JAX/Flax.

The library: pure functions on pytrees. It imports no configs, no datasets and nothing of the
experiment runner (`experiments/runner/`, its one user here). Its only files are documented
I/O: `peft` (PEFT adapters), `autotune.cached_choice` (a JSON cache of the measured chunk size),
`models.npz` / `models.hf` (`.npz` checkpoints, Hugging Face checkpoint directories), `plan`
(the GPU target configs it ships) and `files` (atomic writes, checksum manifests and locks, for
what those and the runner write).

  lora         LoRA on any Flax Linen model (Dense, DenseGeneral, Conv, Embed, Einsum) and on
               NNX models (Linear, LinearGeneral, Conv, Einsum, Embed): find targets, init,
               apply factored, merge, truncate
  client       `local_update(loss_fn, optimizer)`: one client's local steps for any loss
               `loss_fn(trainable, frozen, batch, rng) -> (loss, aux)`
  primitives   broadcast / map_clients (chunked, sharded) / weighted_mean on a clients axis
  params       leaf-name masks on pytrees ('/'-joined key paths): select, combine, regex_mask
  autotune     measure the fastest `clients_per_chunk` on this machine; cache the choice
  quantize     frozen kernels in int8 or 4-bit NF4 (QLoRA-style), dequantized per layer in the
               model's dtype inside `apply` / `lora.apply`, recomputed in the backward pass
  plan         compile a round for TPUs / GPUs you do not have (compile-only devices): memory
               per device and fit, FLOPs, the TPU cost model's time, collectives (estimates)
  files        atomic writes (write, fsync, rename), sha256 manifests written last and verified
               on read, partial directories of a build, an exclusive lock
  aggregators  one contract, `Aggregator(init, aggregate, capabilities)`, for every method;
               the per-layer combinator and `partition`; robust rules, clipping, DP-FedAvg
  federated    `FederatedRound`: the jit-compiled round built from those pieces, with plug-ins,
               server-side guards and input contracts; `ServerState`, its typed state;
               `state_shardings`: its per-client store sharded over a `clients` mesh axis
  diagnostics  per-round diagnostics the round reports: aggregation bias per layer, client
               drift, first/last local-step loss, generator offset norm
  faults       injected client faults (dropout, stragglers, NaN/Inf, Byzantine) for a round
  states       typed states (like optax's) checkpointed as the plain dicts they replaced
  pytree       `Tree`, the alias for "a pytree" in every signature
  privacy      client-level DP: the Gaussian release of clipped updates, ε with `dp_accounting`
  hyper        HyperLoRA: signatures, the generator (a plug-in), the synthesizer (an aggregator)
  peft         adapters to and from Hugging Face PEFT's safetensors layout
  distributed  several processes: initialize (flags or auto), main process, barrier, to_host
  text         instruction records as fixed-shape ids, the loss on the response only
  tasks        tasks built on the library (image classification; instruction tuning of a
               causal LM: next-token loss, accuracy, perplexity)
  models       Flax backbones (ViT, MLP-Mixer, a CLIP dual encoder, a Llama-family decoder with
               cached generation) and their checkpoint loaders (.npz; Hugging Face ViT, CLIP and
               Llama / Mistral / Qwen2 in and out, their tokenizers and chat templates); they know
               nothing of federation or LoRA, and the modules above do not import them
"""

from hyperlora_jax import (
  aggregators,
  autotune,
  diagnostics,
  distributed,
  faults,
  federated,
  files,
  hyper,
  lora,
  peft,
  plan,
  primitives,
  privacy,
  quantize,
  states,
  tasks,
  text,
)
from hyperlora_jax.client import ClientUpdate, local_update, masked_mean
from hyperlora_jax.federated import (
  NEW_CLIENT,
  FederatedRound,
  Plugin,
  RoundOutcome,
  ServerState,
  communication_bytes,
  state_shardings,
)
from hyperlora_jax.primitives import HostFeed, broadcast, make_mesh, map_clients, weighted_mean

__version__ = "0.2.0"


def __getattr__(name: str):
  """`hl.models` on first use: the model zoo stays out of `import hyperlora_jax` (PEP 562)."""
  if name == "models":
    import importlib

    return importlib.import_module("hyperlora_jax.models")
  raise AttributeError(f"module 'hyperlora_jax' has no attribute {name!r}")


__all__ = [
  "NEW_CLIENT",
  "ClientUpdate",
  "FederatedRound",
  "HostFeed",
  "Plugin",
  "RoundOutcome",
  "ServerState",
  "aggregators",
  "autotune",
  "broadcast",
  "communication_bytes",
  "diagnostics",
  "distributed",
  "faults",
  "federated",
  "files",
  "hyper",
  "local_update",
  "lora",
  "make_mesh",
  "map_clients",
  "masked_mean",
  "peft",
  "plan",
  "primitives",
  "privacy",
  "quantize",
  "state_shardings",
  "states",
  "tasks",
  "text",
  "weighted_mean",
]
