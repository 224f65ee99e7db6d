"""Config blocks as typed values: their defaults have one source, these dataclasses, and the
runner reads a validated config through them (`from_config`) instead of passing the whole
`ConfigDict` down.

`configs/default.py` builds each block from its dataclass (`as_config`), and
`workdir.ADDED_FIELDS` reads the same defaults as the values that mean "as before" for runs
recorded before a block existed. (The faults block is the library's `hyperlora_jax.faults.Faults`.)
Importing this module imports nothing of the runner.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

Block = TypeVar("Block")


@dataclasses.dataclass(frozen=True)
class ClientData:
  """The fields both tasks' `data` blocks share: which records, and how they are split over clients.

  Attributes:
    name: the dataset (a prepared TFDS name, '+'-joined for several; a text run's embedded
      records or a records file).
    data_dir: where it is prepared ('' = the default cache).
    partition: how the clients are drawn (`experiments.runner.data.partition`).
    num_clients: the clients (a text run: 0 = one per group).
    dirichlet_alpha: α of the Dirichlet partitions.
    classes_per_client: classes of each client (the `pathological` partition).
    min_client_size: the fewest training examples a client may hold.
    heldout_clients: new clients never trained on, evaluated at the end.
    max_client_examples: > 0: each client keeps a random subset of at most this many training
      examples (data-scarce regimes); its test split is unchanged. 0: all.
    validation_fraction: > 0: this fraction of each client's training examples is held out and
      every evaluation reads it instead of the test split (hyperparameter tuning). 0: off.
    stream: read examples on demand from the prepared files (host memory: the index and a few
      blocks).
    stream_chunk_examples: examples per evaluation / signature block (bounds device memory; with
      `stream`, host memory too).
    feed: "round" (a round's inputs gathered before it runs, on the devices), "chunk" (read
      chunk by chunk inside it: memory flat in clients per round; one device) or "host"
      (gathered before it runs into pinned host memory, moved to the devices a chunk at a time:
      device memory holds one chunk's inputs; any number of devices, image and text runs).
  """

  name: str = "digits_domains/res16"
  data_dir: str = ""
  partition: str = "dirichlet_label_skew"
  num_clients: int = 20
  dirichlet_alpha: float = 0.5
  classes_per_client: int = 2
  min_client_size: int = 10
  heldout_clients: int = 0
  max_client_examples: int = 0
  validation_fraction: float = 0.0
  stream: bool = False
  stream_chunk_examples: int = 4096
  feed: str = "round"


@dataclasses.dataclass(frozen=True)
class ImageData(ClientData):
  """An image run's `data` block: `ClientData` and the images.

  Attributes:
    train_split, test_split: the dataset's splits.
    image_size: the side the images are resized to.
  """

  train_split: str = "train"
  test_split: str = "test"
  image_size: int = 16


@dataclasses.dataclass(frozen=True)
class TextData(ClientData):
  """A text run's `data` block: `ClientData` and the records' tokenization.

  Attributes:
    layout: the records' fields ("dolly", "alpaca", ...; `experiments.runner.data.instructions`).
    group_field: the field whose value groups records (clients of `one_domain_per_client`).
    test_fraction: of each group's records, held out for test.
    max_len: tokens per example (prompt + response + eos), padded.
    chat_template: prompts through the tokenizer's chat template.
    packing: each client's training records packed into rows of max_len tokens (best-fit
      decreasing, each record whole and attending only to itself: `text.pack_examples`), so that
      a local step's `fed.batch_size` rows hold several records each and few padding slots.
      Evaluation reads the records unpacked; aggregation weights still count records.
  """

  layout: str = "dolly"
  group_field: str = "category"
  test_fraction: float = 0.2
  max_len: int = 176
  chat_template: bool = False
  packing: bool = False


@dataclasses.dataclass(frozen=True)
class DPO:
  """A preference run's DPO loss (`hyperlora_jax.tasks.preference`; configs/preference_tuning.py).

  Attributes:
    beta: β, the strength of the implicit KL penalty towards the frozen decoder (the reference).
    loss_type: "sigmoid" (DPO) or "ipo" (Azar et al.'s IPO), as TRL names them.
    label_smoothing: conservative DPO's ε, the chance a preference label is flipped ("sigmoid").
  """

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A text run's multiple-choice evaluation (`experiments/runner/data/multiple_choice.py`): each
  choice's letter scored by log-likelihood after MMLU's zero-shot prompt, for the global model
  and every client's personalized model.

  Attributes:
    path: '' (none), 'embedded' (the default set, no download), or a local file or directory in
      MMLU's layouts (its CSVs; JSONL / JSON / parquet records as `cais/mmlu`'s).
    every: rounds between evaluations (0: the last round only).
    max_questions: the first this many questions (0: all).
    max_len: tokens per scored sequence (0: data.max_len); a longer prompt loses its start.
  """

  path: str = ""
  every: int = 0
  max_questions: int = 0
  max_len: int = 0


@dataclasses.dataclass(frozen=True)
class GenerationEval:
  """A text run's generation-based scoring of held-out instructions: greedy responses to each
  client's first test prompts, scored against the references by exact match (SQuAD's
  normalization) and ROUGE-L F1, for the global model (every client's prompts) and each client's
  personalized model (its own).

  Attributes:
    examples_per_client: test prompts per client (0: none).
    max_new_tokens: tokens generated per prompt.
    every: rounds between scorings (0: the last round only).
  """

  examples_per_client: int = 0
  max_new_tokens: int = 32
  every: int = 0


@dataclasses.dataclass(frozen=True)
class ImagePretrain:
  """An image run's backbone: pretrained on the embedded data (cached), or a real checkpoint.

  Attributes:
    data_name, split: the pretraining images.
    steps, batch_size, learning_rate: the pretraining.
    cache_dir: where backbones are cached ('' = ~/.cache/hyperlora_jax/backbones).
    npz_path: a real `.npz` checkpoint (ViT, Mixer) instead of pretraining.
    checkpoint: a Hugging Face ViT or CLIP directory (config.json + safetensors) instead; its
      config.json sets model.*.
  """

  data_name: str = "digits_domains/res16"
  split: str = "pretrain"
  steps: int = 1500
  batch_size: int = 128
  learning_rate: float = 1e-3
  cache_dir: str = ""
  npz_path: str = ""
  checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class TextPretrain:
  """A text run's decoder: the embedded one (a BPE tokenizer and a decoder pretrained on the
  Python Language Reference, cached), or a real checkpoint.

  Attributes:
    checkpoint: a Hugging Face decoder directory (Llama, Mistral, Qwen2) instead.
    cache_dir: where decoders are cached ('' = ~/.cache/hyperlora_jax/backbones).
    vocab_size: the embedded tokenizer's BPE vocabulary.
    sequence_length, steps, batch_size, learning_rate: the embedded decoder's pretraining.
  """

  checkpoint: str = ""
  cache_dir: str = ""
  vocab_size: int = 2048
  sequence_length: int = 64
  steps: int = 600
  batch_size: int = 32
  learning_rate: float = 3e-3


@dataclasses.dataclass(frozen=True)
class Lora:
  """The LoRA adapters every method trains (`hyperlora_jax.lora`).

  Attributes:
    target_regex: the modules adapted (fullmatch on module paths, e.g. `.*attn/(query|value)`).
    rank: r, the rank of every client (r_max with `client_ranks`).
    alpha: α; the update is scaled by α / r (α / √r with `rslora`).
    rslora: rank-stabilized scaling.
    client_ranks: heterogeneous ranks, cyclic over clients, e.g. (2, 4); each <= rank. () = all
      at `rank`.
  """

  target_regex: str = r".*attn/(query|value)"
  rank: int = 4
  alpha: float = 8.0
  rslora: bool = False
  client_ranks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Fed:
  """The federated rounds.

  Attributes:
    num_rounds: rounds of the run.
    clients_per_round: clients sampled each round (the cohort C).
    local_steps: local optimizer steps of each sampled client.
    batch_size: examples per local step.
    clients_per_chunk: clients vmapped together. -1: measured at start-up for this backend and
      model (cached with the backbone, recorded in the workdir); 0: all at once.
    head_policy: "shared" (aggregated like LoRA) or "local".
    num_devices: devices of the mesh; 0 = all.
    model_parallel: M > 1: a (num_devices / M) x M mesh, clients over the first axis, the frozen
      backbone split over the second (a backbone larger than one device).
    new_client_steps: local steps a held-out new client may take.
  """

  num_rounds: int = 30
  clients_per_round: int = 10
  local_steps: int = 10
  batch_size: int = 32
  clients_per_chunk: int = -1
  head_policy: str = "shared"
  num_devices: int = 0
  model_parallel: int = 1
  new_client_steps: int = 2


@dataclasses.dataclass(frozen=True)
class Robust:
  """Robust aggregation (`hyperlora_jax.aggregators.robust`).

  Attributes:
    rule: "mean" (the method's own rule), "median", "trimmed_mean" or "geometric_median".
    space: "factors" (replaces the average of A and B apart: fedit, ffa_lora, fedsa_lora,
      rolora) or "products" (flexlora: the statistic of s a_k b_k).
    trim: trimmed_mean: the fraction cut at each end.
    clip_norm: > 0: every client's update is clipped to this L2 norm (any method).
  """

  rule: str = "mean"
  space: str = "factors"
  trim: float = 0.1
  clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class DP:
  """Client-level differential privacy: DP-FedAvg for the averaging methods, HyperLoRA's private rounds.

  Attributes:
    noise_multiplier: σ; 0 = off. The noise std is σ x clip_norm / participants.
    clip_norm: the clip of each client's update.
    delta: ε is reported at this δ, every round.
    generator_clip_norm: HyperLoRA: the clip of each client's G_φ gradient (DP-SGD).
    signature_clip_norm: HyperLoRA: signatures are clipped to this norm ...
    signature_noise_multiplier: ... and noised with std this x signature_clip_norm (> 0 needed
      under DP when the signatures are data statistics).
  """

  noise_multiplier: float = 0.0
  clip_norm: float = 1.0
  delta: float = 1e-5
  generator_clip_norm: float = 1.0
  signature_clip_norm: float = 1.0
  signature_noise_multiplier: float = 0.0


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax optimizer (`experiments.runner.optimizers.build_optimizer`).

  Attributes:
    name: "adam" or "sgd" (`config_validation.ALLOWED_OPTIMIZERS`).
    learning_rate: its learning rate (> 0).
    momentum: sgd's momentum, in [0, 1).
  """

  name: str = "adam"
  learning_rate: float = 1e-3
  momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class ScheduledOptimizer(Optimizer):
  """An `Optimizer` with a learning-rate schedule.

  Attributes:
    schedule: "constant", or "cosine": decay to final_fraction x learning_rate over decay_steps
      steps (for the generator, one a round with loss='vjp'), e.g. fast early, slow at
      convergence (RESULTS.md).
    decay_steps: the steps of the decay.
    final_fraction: the learning rate at its end, as a fraction of the first.
  """

  schedule: str = "constant"
  decay_steps: int = 100
  final_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class LoraFair:
  """LoRA-FAIR's server correction ΔB of B̄ (method=lora_fair, and hyperlora.corrector='fair').

  Attributes:
    lam: λ, the weight of ‖ΔB‖² in the fit.
    steps: the server's gradient steps on ΔB per round (> 0; 0 would run FedIT).
    learning_rate: their learning rate.
  """

  lam: float = 0.01
  steps: int = 20
  learning_rate: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Generator:
  """The LoRA generator of method=pfedhn and method=hyperlora (`hyperlora_jax.hyper.generator`).

  Attributes:
    hidden: the width of its MLP.
    layer_embed_dim: the width of its learned layer embeddings.
    client_embed_dim: the width of learned client embeddings (pFedHN's v_k; HyperLoRA's
      'embedding' signature).
    loss: "vjp" (the pFedHN rule) or "product_distill".
    server_steps: its server steps per round with loss='product_distill'.
    optimizer: its optimizer, with a schedule.
  """

  hidden: int = 64
  layer_embed_dim: int = 16
  client_embed_dim: int = 16
  loss: str = "vjp"
  server_steps: int = 5
  optimizer: ScheduledOptimizer = ScheduledOptimizer()


@dataclasses.dataclass(frozen=True)
class HyperLoRA:
  """method=hyperlora's parts, each ablatable (configs/hyperlora.py names the ablations).

  Attributes:
    signature: '+'-joined conditioning of the generator: label, features, embedding.
    signature_noise_std: Gaussian noise on the signatures sent (privacy without DP accounting).
    covariance_rank: q of the feature-covariance summary QᵀΣQ.
    generator: False: clients start from the global adapter (no G_φ).
    synthesizer: "learned" (S_ψ) or "uniform" (exact average + rank-r SVD).
    synthesizer_hidden: the width of S_ψ's scorer.
    corrector: "learned" (C_ω), "fair" (LoRA-FAIR's ΔB fit, the lora_fair block) or "none".
    meta_optimizer: the optimizer of (ψ, ω).
    meta_steps: its steps on (ψ, ω) per round, on the round's meta-objective.
  """

  signature: str = "label+features"
  signature_noise_std: float = 0.0
  covariance_rank: int = 8
  generator: bool = True
  synthesizer: str = "learned"
  synthesizer_hidden: int = 32
  corrector: str = "learned"
  meta_optimizer: Optimizer = Optimizer()
  meta_steps: int = 1


def from_config(block_type: type[Block], block: Mapping[str, Any] | None) -> Block:
  """The typed value of a config block: `block_type` (a dataclass of this module, or any frozen
  dataclass such as `hyperlora_jax.faults.Faults`) from a `ConfigDict` (or a recorded dict).

  A field the block lacks takes the dataclass default (a config recorded before the field
  existed); nested blocks become their dataclasses, lists tuples. The config is validated
  before (`experiments.runner.config_validation`), so values are taken as they are.

  Args:
    block_type: the dataclass.
    block: the config block; None (absent) gives the defaults.
  Returns:
    A `block_type`.
  Raises:
    KeyError: the block has a field `block_type` does not know (named).
  """
  values = dict(block.items()) if block is not None else {}
  hints = typing.get_type_hints(block_type)
  known = {field.name for field in dataclasses.fields(block_type)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise KeyError(f"{block_type.__name__} has no field {', '.join(unknown)}")
  typed = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = from_config(hint, value)
    elif typing.get_origin(hint) is tuple:
      value = tuple(value)
    typed[name] = value
  return block_type(**typed)


def as_config(block) -> ml_collections.ConfigDict:
  """The ConfigDict of a block dataclass (nested blocks as nested ConfigDicts)."""
  return ml_collections.ConfigDict(dataclasses.asdict(block))


def dotted_defaults(prefix: str, block) -> dict:
  """{"prefix.field[.subfield]": default} of a block dataclass (`workdir.ADDED_FIELDS`)."""
  flat = {}
  for name, value in dataclasses.asdict(block).items():
    if isinstance(value, dict):
      flat.update({f"{prefix}.{name}.{k}": v for k, v in value.items()})
    else:
      flat[f"{prefix}.{name}"] = value
  return flat
