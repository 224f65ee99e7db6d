"""The embedded decoder of a text run, pretrained here and cached (a run with `pretrain.checkpoint`
reads that Hugging Face directory instead: `backbone.text_backbone`).

The embedded decoder is a small Llama-architecture model (`model.*`) with a byte-level BPE
tokenizer of `pretrain.vocab_size` tokens, both trained on the Python Language Reference's text
(`stdlib_docs.pretraining_text`), which the federated clients never see: their records are the
standard library's docstrings. It is written as a Hugging Face checkpoint directory
(`hf.save_causal_lm`, the tokenizer's files beside it), so it loads like a downloaded one and its
exported adapters attach to it with `peft`. The cache key hashes everything that determines
it. A cache is built in a directory of its own process, a manifest of its files' sha256 written
last (`hyperlora_jax.files`), then renamed into place (several runs may build it at once: the
first rename wins, the others drop theirs); it is verified whenever it is used, and one that
does not match is reported by name, never replaced.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.runner.settings import BackboneSettings
from experiments.runner.data import stdlib_docs
from hyperlora_jax import files
from hyperlora_jax.models import hf
from hyperlora_jax.models.llama import DecoderLM

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
PRETRAIN_SEED = 0
CACHE_FORMAT = 2  # In the key: 2 has a manifest of checksums (caches without one are not read).
# DecoderLM fields that change how the decoder computes, not what: not in the pretraining cache's
# key, and kept from the config where a checkpoint's architecture replaces the rest.
COMPUTE_FIELDS = ("remat", "recompute_attention")
# DecoderLM fields a text config's `model` block may set (the rest keep their defaults).
ARCH_FIELDS = (
  "vocab_size",
  "width",
  "depth",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "mlp_dim",
  "rms_norm_eps",
  "rope_theta",
  "tie_embeddings",
  "qkv_bias",
  "out_bias",
  "mlp_bias",
  "qk_norm",
  "local_rope_theta",  # Gemma 2/3's fields (a checkpoint's; the embedded decoder has none).
  "norm_offset",
  "post_norms",
  "activation",
  "embed_scale",
  "query_pre_attn_scalar",
  "attention_softcap",
  "final_softcap",
  "fused_projections",  # Phi-3's.
) + COMPUTE_FIELDS
# The last three converted by `decoder_from_config`.
MODEL_FIELDS = ARCH_FIELDS + ("rope_scaling", "sliding_window", "sliding_layers")


def compute_fields(model_config: Mapping[str, Any]) -> dict[str, bool]:
  """The config's `COMPUTE_FIELDS` (False where absent)."""
  return {k: bool(model_config.get(k, False)) for k in COMPUTE_FIELDS}


def decoder_from_config(model_config: Mapping[str, Any], vocab_size: int | None = None) -> DecoderLM:
  """A `DecoderLM` of the config's `model` block (name 'llama'; a `ConfigDict` or a dict);
  `vocab_size` from the tokenizer."""
  arch = {k: v for k, v in model_config.items() if k in ARCH_FIELDS}
  if "rope_scaling" in model_config:
    arch["rope_scaling"] = tuple(tuple(p) for p in model_config["rope_scaling"])
  if model_config.get("sliding_window"):
    arch["sliding_window"] = int(model_config["sliding_window"])
  if model_config.get("sliding_layers"):
    arch["sliding_layers"] = tuple(int(s) for s in model_config["sliding_layers"])
  if vocab_size is not None:
    arch["vocab_size"] = vocab_size
  return DecoderLM(**arch)


def _key_fields(backbone: BackboneSettings) -> dict:
  model = {k: v for k, v in backbone.model.items() if k not in (*COMPUTE_FIELDS, "name", "vocab_size")}
  pretraining = backbone.pretrain
  return {
    "model": model,
    "text": "pydoc_data.topics",
    "vocab_size": pretraining.vocab_size,
    "steps": pretraining.steps,
    "batch_size": pretraining.batch_size,
    "learning_rate": pretraining.learning_rate,
    "sequence_length": pretraining.sequence_length,
    "seed": PRETRAIN_SEED,
    "cache_format": CACHE_FORMAT,
  }


def cache_path(backbone: BackboneSettings) -> str:
  """The cache directory of the embedded decoder `backbone` describes (a hash of everything that
  determines its tokenizer and weights).

  Args:
    backbone: `settings.backbone_settings(config)` of a text run.
  Returns:
    The directory (it may not exist yet).
  """
  return backbone.cache_directory("decoder", _key_fields(backbone))


def train_tokenizer(texts: list[str], vocab_size: int, directory: str) -> hf.Tokenizer:
  """A byte-level BPE (Llama 3's kind) trained on `texts`, begin-of-text added in front, written
  as tokenizer.json + tokenizer_config.json; deterministic for the same texts."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(texts, trainer)
  bos = SPECIAL_TOKENS[0]
  tokenizer.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
  )
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, hf.TOKENIZER_FILE))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": "right",
      },
      f,
      indent=2,
    )
  return hf.Tokenizer.from_directory(directory)


def packed_sequences(tokenizer: hf.Tokenizer, texts: list[str], length: int) -> np.ndarray:
  """[M, length] int32: every text's ids (with begin-of-text) and end-of-text, concatenated and cut."""
  stream = np.concatenate([np.asarray(tokenizer.encode(t) + [tokenizer.eos_id], np.int32) for t in texts])
  count = len(stream) // length
  return stream[: count * length].reshape(count, length)


def pretrain_decoder(
  model: DecoderLM,
  sequences: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float,
  seed: int = PRETRAIN_SEED,
  log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
  """Next-token training of `model` on packed `sequences` [M, T] (95% train, 5% held out).

  Returns:
    (variables, {"holdout_perplexity", "seconds"}).
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sequences))
  n_hold = max(1, len(sequences) // 20)
  hold, train = sequences[order[:n_hold]], sequences[order[n_hold:]]
  variables = model.init(jax.random.key(seed), jnp.asarray(train[:1]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), max(steps, 1))
  optimizer = optax.adamw(schedule, weight_decay=1e-4)

  def loss_fn(variables, ids):
    logits = model.apply(variables, ids)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step(variables, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(variables, ids)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  start = time.time()
  opt_state = optimizer.init(variables)
  for i in range(steps):
    ids = jnp.asarray(train[rng.choice(len(train), size=min(batch_size, len(train)), replace=False)])
    variables, opt_state, loss = step(variables, opt_state, ids)
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"  pretrain step {i + 1}/{steps}: loss {float(loss):.3f}")
  held_out = float(
    jnp.mean(jnp.stack([jax.jit(loss_fn)(variables, jnp.asarray(hold[i : i + 64])) for i in range(0, len(hold), 64)]))
  )
  return variables, {"holdout_perplexity": float(np.exp(held_out)), "seconds": time.time() - start}


def decoder_directory(
  backbone: BackboneSettings,
  log: Callable[[str], None] = print,
  check_tokenizer: Callable[[hf.Tokenizer], None] | None = None,
) -> str:
  """The Hugging Face directory of the run's frozen decoder: `pretrain.checkpoint`, or the
  embedded decoder's cache (built on first use, verified against its manifest on every use).
  `check_tokenizer` sees the embedded tokenizer as soon as it is trained, before the decoder's
  pretraining (a run that cannot use it is refused in seconds, not after the pretraining).

  Raises:
    models.load.CheckpointError: the cache is not what was written (left in place).
  """
  directory = backbone.checkpoint
  if not directory:
    directory = cache_path(backbone)
    if not os.path.isdir(directory):
      _build_embedded(backbone, directory, log, check_tokenizer)
    else:
      try:
        files.verify_manifest(directory)
      except files.IntegrityError as e:
        raise hf.CheckpointError(
          f"the embedded decoder's cache {directory} is not what was written ({e}); it was "
          f"left in place. Remove that directory to pretrain again."
        ) from None
      log(f"backbone: restored from {directory}")
  return directory


def _build_embedded(
  backbone: BackboneSettings,
  directory: str,
  log: Callable[[str], None],
  check_tokenizer: Callable[[hf.Tokenizer], None] | None = None,
) -> None:
  texts = stdlib_docs.pretraining_text()
  stats, kept = files.build_directory(
    directory, lambda partial: _write_embedded(backbone, partial, texts, log, check_tokenizer)
  )
  if kept:
    log(
      f"backbone: held-out perplexity {stats['holdout_perplexity']:.1f} after {stats['seconds']:.0f} s; "
      f"cached in {directory}"
    )
  else:  # Another run built the same decoder first (seeded: the same files).
    log(f"backbone: another run cached the same decoder in {directory} first; using it")


def _write_embedded(
  backbone: BackboneSettings,
  partial: str,
  texts: list[str],
  log: Callable[[str], None],
  check_tokenizer: Callable[[hf.Tokenizer], None] | None,
) -> dict:
  """The embedded decoder pretrained and written into `partial`; its pretraining statistics."""
  p = backbone.pretrain
  tokenizer = train_tokenizer(texts, p.vocab_size, partial)
  if check_tokenizer is not None:
    check_tokenizer(tokenizer)
  model = decoder_from_config(backbone.model, tokenizer.vocab_size)
  sequences = packed_sequences(tokenizer, texts, p.sequence_length)
  log(
    f"backbone: pretraining a {model.depth}-block decoder (width {model.width}, vocab {tokenizer.vocab_size}) "
    f"on {len(sequences)} sequences of the Python Language Reference for {p.steps} steps"
  )
  variables, stats = pretrain_decoder(
    model, sequences, steps=p.steps, batch_size=p.batch_size, learning_rate=p.learning_rate, log=log
  )
  hf.save_causal_lm(partial, model, variables)
  with open(os.path.join(partial, "pretraining.json"), "w") as f:
    json.dump({**_key_fields(backbone), **stats}, f, indent=2)
  return stats
