"""hyperlora_jax: federated LoRA fine-tuning of foundation models in JAX/Flax.

The library (pure functions; no configs, no I/O but `peft`):
  lora         LoRA on any Flax Linen model (Dense, DenseGeneral, Conv, Embed, Einsum) and on
               NNX models (Linear, Embed): find targets, init, apply factored, merge, truncate
  client       `local_update(loss_fn, optimizer)`: one client's local steps for any loss
               `loss_fn(trainable, frozen, batch, rng) -> (loss, aux)`
  primitives   broadcast / map_clients (chunked, sharded) / weighted_mean on a clients axis
  autotune     measure the fastest `clients_per_chunk` on this machine; cache the choice
  aggregators  one contract, `Aggregator(init, aggregate, capabilities)`, for every method;
               the per-layer combinator and `partition`; robust rules, clipping, DP-FedAvg
  federated    `FederatedRound`: the jit-compiled round built from those pieces, with plug-ins
               and server-side guards; `state_shardings`: its per-client store sharded over a
               `clients` mesh axis
  diagnostics  per-round diagnostics the round reports: aggregation bias per layer, client
               drift, first/last local-step loss, generator offset norm
  faults       injected client faults (dropout, stragglers, NaN/Inf, Byzantine) for a round
  privacy      client-level DP: the Gaussian release of clipped updates, ε with `dp_accounting`
  hyper        HyperLoRA: signatures, the generator (a plug-in), the synthesizer (an aggregator)
  peft         adapters to and from Hugging Face PEFT's safetensors layout
  tasks        tasks built on the library (image classification)

Above it (configs, data, model zoo, runs): `models/`, `data/`, `methods.py`, `train.py`,
and `experiments/`.
"""
from hyperlora_jax import (aggregators, autotune, diagnostics, faults, federated, hyper, lora, peft, primitives,
                           privacy)
from hyperlora_jax.client import ClientUpdate, local_update, masked_mean
from hyperlora_jax.federated import (NEW_CLIENT, FederatedRound, Plugin, RoundOutcome, communication_bytes,
                                     state_shardings)
from hyperlora_jax.primitives import broadcast, make_mesh, map_clients, weighted_mean

__version__ = "0.2.0"
__all__ = ["NEW_CLIENT", "ClientUpdate", "FederatedRound", "Plugin", "RoundOutcome", "aggregators",
           "autotune", "broadcast", "communication_bytes", "diagnostics", "faults", "federated", "hyper", "local_update",
           "lora", "make_mesh", "map_clients", "masked_mean", "peft", "primitives", "privacy", "state_shardings",
           "weighted_mean"]
