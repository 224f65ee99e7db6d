"""A federated method = an aggregator + which leaves stay local + which leaves are frozen.

Methods are compositions, not subclasses: each factory below returns a `Method` built from
the pure aggregators in `hyperlora_jax.aggregators`. The head policy (shared or local) is
the same config field for every method (`fed.head_policy`), so comparisons are fair.
Leaf names look like `lora/<module path>/a`, `lora/<module path>/b`, `head/kernel`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from hyperlora_jax import aggregators, lora
from hyperlora_jax.aggregators import Aggregator

HEAD_REGEX = r"head/.*"
A_REGEX = r"lora/.*/a"
B_REGEX = r"lora/.*/b"


@dataclasses.dataclass(frozen=True)
class Method:
  """How one federated method treats the trainable pytree.

  Attributes:
    name: the config's `method`.
    aggregator: the server's pure (init, aggregate) pair for the shared leaves.
    local_regex: leaves kept per client across rounds, never sent (fullmatch on leaf names).
    frozen_regexes: leaves clients do not update; round r uses entry r % len (RoLoRA
      alternates), and frozen shared leaves are not sent up.
    has_global_model: False where no global model exists (local-only): its global
      accuracy is reported as NaN.
    uses_base_delta: the aggregator returns full-rank residuals merged into the frozen
      weights (FedEx-LoRA, FLoRA); the server state then holds them.
    plain_server: the aggregate is exact only with a plain server step (sgd, lr 1, no
      momentum); other server optimizers are refused.
    extra_down_bytes: (targets {path: (d_in, d_out)}, rank, participants) -> bytes sent
      down to each client on top of the shared leaves (FedEx's residual, FLoRA's stacks).
  """
  name: str
  aggregator: Aggregator
  local_regex: str = ""
  frozen_regexes: tuple[str, ...] = ("",)
  has_global_model: bool = True
  uses_base_delta: bool = False
  plain_server: bool = False
  extra_down_bytes: Callable[[dict, int, int], int] = lambda targets, rank, participants: 0


def _join(*regexes: str) -> str:
  return "|".join(f"(?:{r})" for r in regexes if r)


def _local_head(config) -> str:
  return HEAD_REGEX if config.fed.head_policy == "local" else ""


def _scale(config) -> float:
  return lora.lora_scale(config.lora.alpha, config.lora.rank, config.lora.rslora)


def _residual_bytes(targets, rank, participants) -> int:
  return sum(4 * d_in * d_out for d_in, d_out in targets.values())


def _stacked_bytes(targets, rank, participants) -> int:
  # Every participant's (A_k, B_k) goes to every client, minus the client's own shared leaves
  # already counted; the fresh LoRA of the next round comes from a shared seed.
  return max(participants - 1, 0) * sum(4 * rank * (d_in + d_out) for d_in, d_out in targets.values())


def fedit(config) -> Method:
  """FedIT: average A and B (and a shared head)."""
  return Method("fedit", aggregators.fedit(), local_regex=_local_head(config))


def local_only(config) -> Method:
  """Local-only: every client trains alone; nothing is sent (a lower reference)."""
  del config
  return Method("local_only", aggregators.identity(), local_regex=".*", has_global_model=False)


def ffa_lora(config) -> Method:
  """FFA-LoRA (Sun et al., ICLR 2024): A frozen at the shared random init, only B (init 0)
  trained and averaged, which is exact (B̄A = Σ p_k B_k A); half the uplink."""
  return Method("ffa_lora", aggregators.fedit(), local_regex=_local_head(config),
                frozen_regexes=(A_REGEX,))


def fedsa_lora(config) -> Method:
  """FedSA-LoRA (Guo et al., ICLR 2025): A and B trained, only A aggregated; B stays on the
  client, whose model is W0 + s B_k Ā."""
  return Method("fedsa_lora", aggregators.fedit(), local_regex=_join(B_REGEX, _local_head(config)))


def rolora(config) -> Method:
  """RoLoRA (Chen et al., NeurIPS 2025): alternate rounds. Even rounds freeze A and train and
  average B; odd rounds freeze B and train and average A. Each round's average is exact."""
  return Method("rolora", aggregators.fedit(), local_regex=_local_head(config),
                frozen_regexes=(A_REGEX, B_REGEX))


def fedex_lora(config) -> Method:
  """FedEx-LoRA (Singhal et al., ACL 2025): FedIT plus the full-rank residual merged into W0."""
  return Method("fedex_lora", aggregators.fedex_lora(_scale(config)), local_regex=_local_head(config),
                uses_base_delta=True, plain_server=True, extra_down_bytes=_residual_bytes)


def flora(config) -> Method:
  """FLoRA (Wang et al., NeurIPS 2024): stacked factors merged into W0, fresh LoRA each round."""
  return Method("flora", aggregators.flora(_scale(config)), local_regex=_local_head(config),
                uses_base_delta=True, plain_server=True, extra_down_bytes=_stacked_bytes)


def flexlora(config) -> Method:
  """FlexLoRA (Bai et al., NeurIPS 2024): truncated SVD of the weighted product average."""
  return Method("flexlora", aggregators.flexlora(_scale(config)), local_regex=_local_head(config),
                plain_server=True)


def lora_fair(config) -> Method:
  """LoRA-FAIR (Bian et al., ICCV 2025): FedIT with a server-fitted correction ΔB of B̄."""
  fair = config.get("lora_fair", ml_collections.ConfigDict({"lam": 0.01, "steps": 20, "learning_rate": 1e-3}))
  return Method("lora_fair", aggregators.lora_fair(fair.lam, fair.steps, fair.learning_rate),
                local_regex=_local_head(config), plain_server=True)


METHODS: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "fedit": fedit,
    "local_only": local_only,
    "ffa_lora": ffa_lora,
    "fedsa_lora": fedsa_lora,
    "rolora": rolora,
    "fedex_lora": fedex_lora,
    "flora": flora,
    "flexlora": flexlora,
    "lora_fair": lora_fair,
}


def build_method(config: ml_collections.ConfigDict) -> Method:
  if config.method not in METHODS:
    raise ValueError(f"method={config.method!r}; allowed: {sorted(METHODS)}")
  return METHODS[config.method](config)
