"""A federated method = an aggregator + which leaves stay local + which leaves are frozen.

Methods are compositions, not subclasses: each factory below returns a `Method` built from
the pure aggregators in `hyperlora_jax.aggregators`. The head policy (shared or local) is
the same config field for every method (`fed.head_policy`), so comparisons are fair.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from hyperlora_jax import aggregators
from hyperlora_jax.aggregators import Aggregator

HEAD_REGEX = r"head/.*"


@dataclasses.dataclass(frozen=True)
class Method:
  """How one federated method treats the trainable pytree.

  Attributes:
    name: the config's `method`.
    aggregator: the server's pure (init, aggregate) pair for the shared leaves.
    local_regex: leaves kept per client across rounds, never sent (fullmatch on leaf names).
    frozen_regex: leaves clients never update.
    has_global_model: False where no global model exists (local-only): its global
      accuracy is reported as NaN.
    uses_base_delta: the aggregator returns full-rank residuals merged into the frozen
      weights (FedEx-LoRA, FLoRA); the server state then holds them.
  """
  name: str
  aggregator: Aggregator
  local_regex: str = ""
  frozen_regex: str = ""
  has_global_model: bool = True
  uses_base_delta: bool = False


def _join(*regexes: str) -> str:
  return "|".join(f"(?:{r})" for r in regexes if r)


def _head_regex(config: ml_collections.ConfigDict) -> str:
  return HEAD_REGEX if config.fed.head_policy == "local" else ""


def fedit(config) -> Method:
  return Method("fedit", aggregators.fedit(), local_regex=_head_regex(config))


def local_only(config) -> Method:
  del config
  return Method("local_only", aggregators.identity(), local_regex=".*", has_global_model=False)


METHODS: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "fedit": fedit,
    "local_only": local_only,
}


def build_method(config: ml_collections.ConfigDict) -> Method:
  if config.method not in METHODS:
    raise ValueError(f"method={config.method!r}; allowed: {sorted(METHODS)}")
  return METHODS[config.method](config)
