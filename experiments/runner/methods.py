"""A federated method = an aggregator + which leaves stay local + which are frozen (+ plug-ins).

This is the experiments' layer: each factory reads the typed blocks a method needs
(`MethodSettings`, unpacked once from a run config by `method_settings`) and returns a `Method`
composed from the library's pure pieces (`hyperlora_jax.aggregators`,
`hyperlora_jax.hyper`); what an aggregator can do (exact only with a plain server step,
heterogeneous ranks, extra bytes) is declared on the aggregator itself. The head policy
(shared or local) is the same config field for every method (`fed.head_policy`), so
comparisons are fair. Leaf names look like `lora/<module path>/a`, `lora/<module path>/b`,
`head/kernel`. Method-specific config blocks (`lora_fair`, `generator`, `hyperlora`) belong
to the methods that read them (`METHOD_BLOCKS`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import ml_collections

from hyperlora_jax import aggregators, lora
from hyperlora_jax.aggregators import Aggregator
from hyperlora_jax.hyper import generator as generator_lib
from hyperlora_jax.hyper import signatures as signatures_lib
from hyperlora_jax.hyper.synthesis import CrossRoundDerivativeWarning, SynthesisConfig, hyperlora_synthesizer
from configs import blocks
from experiments.runner.config_facts import ConfigError, typed_block
from experiments.runner.optimizers import build_optimizer

HEAD_REGEX = r"head/.*"
A_REGEX = r"lora/.*/a"
B_REGEX = r"lora/.*/b"


@dataclasses.dataclass(frozen=True)
class Method:
  """How one federated method treats the trainable pytree.

  Attributes:
    name: the config's `method`.
    aggregator: the server rule, with its declared capabilities.
    local_regex: leaves kept per client across rounds, never sent (fullmatch on leaf names).
    frozen_regexes: leaves clients do not update; round r uses entry r % len (RoLoRA
      alternates), and frozen shared leaves are not sent up.
    has_global_model: False where no global model exists (local-only): its global
      accuracy is reported as NaN.
    pooled_data: centralized reference: one learner on the union of the clients' data.
    make_generator: (targets, num_clients, signature_dim) -> `Generator` for methods whose
      clients start from generated factors (pFedHN, HyperLoRA; a round plug-in); None otherwise.
    generator_target: what the generator learns (`hyper.plugins.GENERATOR_TARGETS`).
    signature_kinds: client signatures the method needs (`hyperlora_jax.hyper.signatures`).
    generator_privacy: (clip_norm, noise_multiplier) of the generator plug-in's private
      mean-change release (`hyper.plugins.generator_plugin`); None without DP.
    releases_per_round: private releases a round makes under client-level DP (the
      accountant's m, `hyperlora_jax.privacy`).
    plain_average: the space in which the server rule is a plain weighted average that a robust
      rule (`robust.space`) or DP-FedAvg may replace: "factors" (A and B apart), "products"
      (B A); "" where it is not one.
    private_rounds: the method builds its own private rounds under client-level DP (HyperLoRA)
      instead of taking DP-FedAvg.
    client_embeddings: the generator learns a per-client embedding (`generator.client_embed_dim`
      must be >= 1).
  """

  name: str
  aggregator: Aggregator
  local_regex: str = ""
  frozen_regexes: tuple[str, ...] = ("",)
  has_global_model: bool = True
  pooled_data: bool = False
  make_generator: Callable[[dict, int, int], generator_lib.Generator] | None = None
  generator_target: str = "from_global"
  signature_kinds: tuple[str, ...] = ()
  generator_privacy: tuple[float, float] | None = None
  releases_per_round: int = 1
  plain_average: str = ""
  private_rounds: bool = False
  client_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """What a method's factory reads of a run config, as typed blocks (`configs.blocks`).

  Attributes:
    name: the config's `method`.
    head_policy: `fed.head_policy`, "shared" or "local".
    lora: the `lora` block (rank, α, scaling).
    generator, hyperlora, lora_fair: the method blocks (`METHOD_BLOCKS`; defaults where a run
      config lacks them).
    robust, dp: the server options (`with_server_options`).
  """

  name: str
  head_policy: str = "shared"
  lora: blocks.Lora = blocks.Lora()
  generator: blocks.Generator = blocks.Generator()
  hyperlora: blocks.HyperLoRA = blocks.HyperLoRA()
  lora_fair: blocks.LoraFair = blocks.LoraFair()
  robust: blocks.Robust = blocks.Robust()
  dp: blocks.DP = blocks.DP()


_SETTINGS_BLOCKS = {
  "lora": blocks.Lora,
  "generator": blocks.Generator,
  "hyperlora": blocks.HyperLoRA,
  "lora_fair": blocks.LoraFair,
  "robust": blocks.Robust,
  "dp": blocks.DP,
}


def method_settings(config: ml_collections.ConfigDict) -> MethodSettings:
  """The typed blocks a method reads of `config` (the boundary: nothing below takes a config).

  Args:
    config: a run config (blocks it lacks take their defaults).
  Returns:
    Its `MethodSettings`.
  Raises:
    ConfigError: a block has a field its dataclass does not know (named).
  """
  typed = {name: typed_block(block_type, config, name) for name, block_type in _SETTINGS_BLOCKS.items()}
  return MethodSettings(config.method, config.fed.head_policy, **typed)


def _join(*regexes: str) -> str:
  return "|".join(f"(?:{r})" for r in regexes if r)


def _local_head(settings: MethodSettings) -> str:
  return HEAD_REGEX if settings.head_policy == "local" else ""


def _scale(settings: MethodSettings) -> float:
  return lora.lora_scale(settings.lora.alpha, settings.lora.rank, settings.lora.rslora)


def dp_on(dp: blocks.DP) -> bool:
  """Whether the `dp` block asks for client-level DP (`dp.noise_multiplier` > 0)."""
  return dp.noise_multiplier > 0


def generator_factory(settings: MethodSettings, *, client_embeddings: bool, private: bool = False):
  """(targets, num_clients, signature_dim) -> `Generator` from the `generator` block (with
  DP-SGD steps, clip `dp.generator_clip_norm`, when `private`)."""
  gen = settings.generator
  privacy = (settings.dp.generator_clip_norm, settings.dp.noise_multiplier) if private else None

  def make(targets, num_clients, signature_dim):
    module = generator_lib.LoraGenerator(
      targets=generator_lib.target_triples(targets),
      rank=settings.lora.rank,
      num_clients=num_clients,
      client_embed_dim=gen.client_embed_dim if client_embeddings else 0,
      hidden=gen.hidden,
      layer_embed_dim=gen.layer_embed_dim,
    )
    return generator_lib.make_generator(
      module,
      loss=gen.loss,
      optimizer=build_optimizer(gen.optimizer),
      scale=_scale(settings),
      server_steps=gen.server_steps,
      signature_dim=signature_dim,
      privacy=privacy,
    )

  return make


def fedit(settings: MethodSettings) -> Method:
  """FedIT: average A and B (and a shared head)."""
  return Method("fedit", aggregators.fedit(), local_regex=_local_head(settings), plain_average="factors")


def local_only(settings: MethodSettings) -> Method:
  """Local-only: every client trains alone; nothing is sent (a lower reference)."""
  del settings
  return Method("local_only", aggregators.identity(), local_regex=".*", has_global_model=False)


def ffa_lora(settings: MethodSettings) -> Method:
  """FFA-LoRA (Sun et al., ICLR 2024): A frozen at the shared random init, only B (init 0)
  trained and averaged, which is exact (B̄A = Σ p_k B_k A); half the uplink."""
  return Method(
    "ffa_lora",
    aggregators.fedit(),
    local_regex=_local_head(settings),
    frozen_regexes=(A_REGEX,),
    plain_average="factors",
  )


def fedsa_lora(settings: MethodSettings) -> Method:
  """FedSA-LoRA (Guo et al., ICLR 2025): A and B trained, only A aggregated; B stays on the
  client, whose model is W0 + s B_k Ā."""
  return Method(
    "fedsa_lora", aggregators.fedit(), local_regex=_join(B_REGEX, _local_head(settings)), plain_average="factors"
  )


def rolora(settings: MethodSettings) -> Method:
  """RoLoRA (Chen et al., NeurIPS 2025): alternate rounds. Even rounds freeze A and train and
  average B; odd rounds freeze B and train and average A. Each round's average is exact."""
  return Method(
    "rolora",
    aggregators.fedit(),
    local_regex=_local_head(settings),
    frozen_regexes=(A_REGEX, B_REGEX),
    plain_average="factors",
  )


def fedex_lora(settings: MethodSettings) -> Method:
  """FedEx-LoRA (Singhal et al., ACL 2025): FedIT plus the full-rank residual merged into W0."""
  return Method("fedex_lora", aggregators.fedex_lora(_scale(settings)), local_regex=_local_head(settings))


def flora(settings: MethodSettings) -> Method:
  """FLoRA (Wang et al., NeurIPS 2024): stacked factors merged into W0, fresh LoRA each round."""
  return Method("flora", aggregators.flora(_scale(settings)), local_regex=_local_head(settings))


def flexlora(settings: MethodSettings) -> Method:
  """FlexLoRA (Bai et al., NeurIPS 2024): truncated SVD of the weighted product average to
  r_max; a client of rank r_k keeps the first r_k components, the best rank-r_k approximation."""
  return Method(
    "flexlora", aggregators.flexlora(_scale(settings)), local_regex=_local_head(settings), plain_average="products"
  )


def hetlora(settings: MethodSettings) -> Method:
  """HetLoRA (Cho et al., EMNLP 2024): zero-padded factors averaged with norm weights,
  truncated to each client's rank."""
  return Method("hetlora", aggregators.hetlora(), local_regex=_local_head(settings))


def pfedhn(settings: MethodSettings) -> Method:
  """pFedHN (Shamsian et al., ICML 2021) for LoRA: a server hypernetwork maps a learned client
  embedding v_k to the client's LoRA factors θ_k = θ_0 + h(v_k; φ); after K local steps the
  server applies φ ← φ − η (∂θ_k/∂φ)^T (θ_k − θ̃_k) (and the same for v_k). The head follows
  `fed.head_policy`; the generated factors are sent down and the trained ones up."""
  return Method(
    "pfedhn",
    aggregators.head_only(),
    local_regex=_local_head(settings),
    make_generator=generator_factory(settings, client_embeddings=True),
    client_embeddings=True,
  )


def hyperlora(settings: MethodSettings) -> Method:
  """HyperLoRA (Gupta, Shanker, Sethi, FL@FM-IJCAI'26): generator G_φ (signature -> LoRA
  offset from the global factors), product-space synthesizer S_ψ and residual corrector C_ω
  trained by a held-out meta-objective. Every component can be switched off (`hyperlora`
  config block); see `aggregators.synthesis` and `generator`.

  Under client-level DP (`dp.noise_multiplier` > 0) a round makes 1 + (1 + generator steps)
  private releases (`hyperlora_jax.privacy`): the product-space update (clip `dp.clip_norm`),
  and with the generator the cohort's mean factor change (clip `dp.clip_norm`) and each
  DP-SGD step of G_φ (clip `dp.generator_clip_norm`). S_ψ and C_ω are not meta-learned then."""
  hl = settings.hyperlora
  kinds = signatures_lib.parse_kinds(hl.signature)
  synthesis = SynthesisConfig(
    scale=_scale(settings),
    rank=settings.lora.rank,
    corrector=hl.corrector,
    learned_weights=hl.synthesizer == "learned",
    fair_lam=settings.lora_fair.lam,
    fair_steps=settings.lora_fair.steps,
    fair_learning_rate=settings.lora_fair.learning_rate,
  )
  learned = hl.synthesizer == "learned" or hl.corrector == "learned"
  private = dp_on(settings.dp)  # `config_validation` refuses learned parts and embeddings under DP.
  steps = (1 if settings.generator.loss == "vjp" else settings.generator.server_steps) if hl.generator else 0
  update_release = (settings.dp.clip_norm, settings.dp.noise_multiplier) if private else None
  with warnings.catch_warnings():  # The runner never differentiates through rounds.
    warnings.simplefilter("ignore", CrossRoundDerivativeWarning)
    synthesizer = hyperlora_synthesizer(
      synthesis,
      build_optimizer(hl.meta_optimizer),
      hidden=hl.synthesizer_hidden,
      meta_learning=learned,
      meta_steps=hl.meta_steps,
      privacy=update_release,
    )
  return Method(
    "hyperlora",
    synthesizer,
    local_regex=_local_head(settings),
    make_generator=(
      generator_factory(settings, client_embeddings="embedding" in kinds, private=private) if hl.generator else None
    ),
    generator_target="deviation",  # The global carries the mean change; G_φ the personal part.
    signature_kinds=kinds,
    generator_privacy=update_release if hl.generator else None,
    releases_per_round=1 + (1 + steps if steps else 0),
    private_rounds=True,
    client_embeddings=bool(hl.generator) and "embedding" in kinds,
  )


def centralized(settings: MethodSettings) -> Method:
  """Centralized reference: one learner on the pooled data of all clients, with the compute
  of a federated round per round (clients_per_round x local_steps steps); nothing is sent."""
  del settings
  return Method("centralized", aggregators.fedit(), pooled_data=True)


def lora_fair(settings: MethodSettings) -> Method:
  """LoRA-FAIR (Bian et al., ICCV 2025): FedIT with a server-fitted correction ΔB of B̄."""
  fair = settings.lora_fair
  return Method(
    "lora_fair", aggregators.lora_fair(fair.lam, fair.steps, fair.learning_rate), local_regex=_local_head(settings)
  )


METHODS: dict[str, Callable[[MethodSettings], Method]] = {
  "fedit": fedit,
  "local_only": local_only,
  "ffa_lora": ffa_lora,
  "fedsa_lora": fedsa_lora,
  "rolora": rolora,
  "fedex_lora": fedex_lora,
  "flora": flora,
  "flexlora": flexlora,
  "lora_fair": lora_fair,
  "hetlora": hetlora,
  "pfedhn": pfedhn,
  "centralized": centralized,
  "hyperlora": hyperlora,
}


# The config blocks each method reads besides the common ones; other methods' blocks are
# neither validated nor saved with a run (so their defaults can change without touching it).
METHOD_BLOCKS: dict[str, tuple[str, ...]] = {
  "lora_fair": ("lora_fair",),
  "pfedhn": ("generator",),
  "hyperlora": ("hyperlora", "generator", "lora_fair"),
}


def with_server_options(method: Method, settings: MethodSettings) -> Method:
  """`method` with the robust rule, update clipping or DP-FedAvg of `settings` in place of its
  aggregator (`robust`, `dp` blocks), where its capabilities take them (`plain_average`,
  `private_rounds`); raises ConfigError where they do not (`check_server_options`)."""
  check_server_options(settings, method, METHODS)
  robust, dp = settings.robust, settings.dp
  aggregator = method.aggregator
  if robust.rule != "mean":
    aggregator = (
      aggregators.robust_factors(robust.rule, robust.trim)
      if robust.space == "factors"
      else aggregators.robust_products(robust.rule, _scale(settings), robust.trim)
    )
  if dp_on(dp):
    if not method.private_rounds:  # HyperLoRA is built private.
      aggregator = aggregators.dp_fedavg(dp.clip_norm, dp.noise_multiplier)
  elif robust.clip_norm > 0:
    aggregator = aggregators.clip_updates(aggregator, robust.clip_norm)
  return dataclasses.replace(method, aggregator=aggregator)


def build_method(settings: MethodSettings) -> Method:
  """The method `settings.name` names, with its server options (`with_server_options`).

  Args:
    settings: `method_settings(config)`.
  Returns:
    The `Method`.
  Raises:
    ValueError: an unknown method. ConfigError: server options it cannot take.
  """
  if settings.name not in METHODS:
    raise ValueError(f"method={settings.name!r}; allowed: {sorted(METHODS)}")
  return with_server_options(METHODS[settings.name](settings), settings)


def check_server_options(settings: MethodSettings, method, allowed_methods) -> None:
  """Raises `ConfigError` where the `robust` or `dp` block asks for what `method` cannot take:
  a robust rule replaces a plain average in its space (`Method.plain_average`), DP-FedAvg the
  plain average of factors; HyperLoRA has its own private rounds (`Method.private_rounds`)."""
  robust, dp = settings.robust, settings.dp
  robust_rule = robust.rule != "mean"
  if robust_rule and method.plain_average != robust.space:
    takers = _methods_with(settings, allowed_methods, lambda m: m.plain_average == robust.space)
    raise ConfigError(
      f"robust.rule: {robust.rule!r} in {robust.space} space replaces the average of "
      f"{', '.join(takers)}, not method {method.name!r}"
    )
  if dp_on(dp) and not (method.private_rounds and not robust_rule):
    if method.plain_average != "factors" or robust_rule:
      takers = _methods_with(settings, allowed_methods, lambda m: m.plain_average == "factors")
      raise ConfigError(
        f"dp.noise_multiplier: DP-FedAvg replaces the plain average of "
        f"{', '.join(takers)} (with robust.rule='mean'), and HyperLoRA has its "
        f"own private rounds; not method {method.name!r}"
      )


def _methods_with(settings: MethodSettings, allowed_methods, capability) -> list[str]:
  """The names of the methods that, built from `settings`, have `capability` (for messages)."""
  names = []
  for name, build in allowed_methods.items():
    try:
      if capability(build(settings)):
        names.append(name)
    except (ConfigError, ValueError):  # A method these settings cannot build has no capability here.
      pass
  return names
