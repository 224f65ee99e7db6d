"""Default federated LoRA run on the embedded `digits_domains` benchmark.

A ViT (width 64, depth 4, patch 4) pretrained on the `source` domain of the embedded
digits (cached after the first run), adapted with LoRA (r=4, α=8 on attention query/value,
plus a shared head) by 20 clients holding the six federated domains under a Dirichlet
label skew (α=0.5); 10 clients per round, 10 local Adam steps of batch 32, 30 rounds.

  python -m experiments.main --config configs/default.py --workdir runs/fedit
  python -m experiments.main --config configs/default.py:method=local_only --workdir runs/local

Variants (comma-separated in the `:arg`): `smoke` (tiny model and data, a few rounds: for
tests), `key=value` for `method`, `seed`, `rounds`.
"""

import ml_collections

from configs import blocks as config_blocks
from hyperlora_jax import faults


class ConfigArgumentError(ValueError):
  """A `:key=value` argument of a config file that is not what the key takes."""


class Args(dict):
  """A config file's `:arg` parsed ({key: value string, or True for a bare flag}), with typed
  reads that name the argument when its value is not of the type."""

  def _typed(self, key: str, default, kind, name: str):
    value = self.get(key, default)
    try:
      return kind(value)
    except (TypeError, ValueError):
      raise ConfigArgumentError(f"config argument {key}={value!r}: {name} expected") from None

  def int(self, key: str, default: int) -> int:
    return self._typed(key, default, int, "an integer")

  def float(self, key: str, default: float) -> float:
    return self._typed(key, default, float, "a number")

  def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = self.get(key, default)
    if value not in allowed:
      raise ConfigArgumentError(f"config argument {key}={value!r}: one of {', '.join(allowed)} expected")
    return value


def parse_arg(arg: str | None) -> Args:
  """'smoke,method=fedit' -> {'smoke': True, 'method': 'fedit'}."""
  out = Args()
  for token in filter(None, (arg or "").split(",")):
    key, _, value = token.partition("=")
    out[key.strip()] = value.strip() if value else True
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.benchmark = "default"  # Name the report groups runs by.
  config.method = args.get("method", "fedit")
  config.seed = args.int("seed", 0)

  # The data, the backbone's pretraining, LoRA and the rounds: fields, defaults and meanings are
  # the dataclasses of `configs.blocks` (data.name: or any prepared TFDS dataset, e.g. 'cifar100';
  # data.feed='chunk' / 'host': a round's images read, or moved to the devices, chunk by chunk; pretrain.checkpoint: a Hugging
  # Face directory whose config.json sets model.*; fed.clients_per_chunk=-1: measured at start-up).
  config.data = config_blocks.as_config(config_blocks.ImageData())

  config.model = ml_collections.ConfigDict()
  config.model.name = "vit"
  config.model.patch_size = 4
  config.model.width = 64
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.mlp_ratio = 2.0
  config.model.remat = False  # Recompute encoder blocks in the backward pass.

  config.pretrain = config_blocks.as_config(config_blocks.ImagePretrain())

  config.lora = config_blocks.as_config(config_blocks.Lora())
  config.fed = config_blocks.as_config(config_blocks.Fed(num_rounds=args.int("rounds", 30)))

  config.client_optimizer = config_blocks.as_config(config_blocks.Optimizer(name="adam", learning_rate=3e-3))
  # sgd with learning rate 1 = plain aggregation (FedAvg).
  config.server_optimizer = config_blocks.as_config(config_blocks.Optimizer(name="sgd", learning_rate=1.0))

  # Method-specific blocks (each checked and saved only for the methods that read it,
  # `methods.METHOD_BLOCKS`): their fields, defaults and meanings are the dataclasses of
  # `configs.blocks`.
  config.lora_fair = config_blocks.as_config(config_blocks.LoraFair())  # method=lora_fair.
  config.generator = config_blocks.as_config(config_blocks.Generator())  # pfedhn and hyperlora.
  config.hyperlora = config_blocks.as_config(config_blocks.HyperLoRA())  # Every part ablatable.

  # Injected client faults: each a fraction of a round's participants (dropout: update lost;
  # straggler: only straggler_steps of the local steps done; nonfinite: NaN/Inf sent; byzantine:
  # a malicious update sent, byzantine_kind sign_flip / scale / random). The dataclass
  # `hyperlora_jax.faults.Faults` holds the defaults (all off); the run builds it from this block.
  config.faults = config_blocks.as_config(faults.Faults())

  # Robust aggregation and client-level DP: the fields and their defaults are the dataclasses
  # `configs.blocks.Robust` and `.DP` (all off).
  config.robust = config_blocks.as_config(config_blocks.Robust())
  config.dp = config_blocks.as_config(config_blocks.DP())

  config.compute = ml_collections.ConfigDict()
  config.compute.backbone_dtype = "auto"  # 'float32', 'bfloat16' or 'auto' (bf16 on GPU/TPU,
  # float32 on CPU): the frozen backbone's compute.
  config.compute.backbone_quantization = "none"  # 'none', 'int8' or 'nf4': the frozen kernels held in
  # 8 or 4 bits, computed in backbone_dtype (QLoRA-style; `hyperlora_jax.quantize`).
  config.compute.quantization_block = 0  # Weights per scale (0: int8 one per output channel, nf4 64).

  config.eval_every = 1
  config.eval_batch = 256
  config.checkpoint_every = 5
  config.export_every = 0  # Rounds between PEFT adapters written to workdir/adapters/round-<R> (and at
  # the last round); 0: none (`python -m experiments.export` writes them from a checkpoint).
  config.export_clients = ""  # Personalized adapters written too: '' none, 'all', or ids '0,3'.

  if args.get("smoke"):
    config.model.width, config.model.depth, config.model.num_heads = 16, 1, 2
    config.pretrain.steps, config.pretrain.batch_size = 300, 32  # About 69% holdout accuracy: above chance.
    config.pretrain.learning_rate = 3e-3
    config.data.num_clients = 6
    config.fed.num_rounds = args.int("rounds", 3)
    config.fed.clients_per_round, config.fed.local_steps, config.fed.batch_size = 4, 2, 8
    config.eval_batch = 128
    config.checkpoint_every = 2
    config.fed.clients_per_chunk = 0  # Tests compare runs bit for bit: no measured choice.
  return config
