"""`build_text_experiment(config)`: a text run's `Experiment` (configs/instruction_tuning.py, and
configs/preference_tuning.py's DPO runs: pairs from `data.preferences`, the task
`tasks.preference.PreferenceLM`, the chosen sequences standing for a pair where one sequence is
read: LoRA's targets, HyperLoRA's hidden-state signatures).

The same round, methods, checkpoints, records and report as an image run; what differs is built
here: the frozen decoder and its tokenizer (`backbone.text_backbone`), the instruction records tokenized
into `instructions.TextDataset` pools partitioned by their groups, the `tasks.causal_lm` task
(next-token loss on response tokens; accuracy = next-token accuracy), and HyperLoRA's text
signatures (`assembly.every_client_signature` with the decoder's featurizer): the group
histogram ("label") and statistics of the frozen decoder's mean hidden state per record
("features"), clipped and noised as image signatures are under DP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import blocks as config_blocks
from experiments.runner import backbone as backbone_lib
from experiments.runner.settings import RunSettings, backbone_settings, data_block, run_settings
from experiments.runner.assembly import Experiment, assemble, checked_method, every_client_signature, sharded_backbone
from experiments.runner.config_facts import ConfigError, is_preference, typed_block
from experiments.runner.data import instructions, multiple_choice, preferences
from experiments.runner.federated_data import FederatedData, partitioned
from hyperlora_jax import lora, text
from hyperlora_jax.tasks import causal_lm, preference
from hyperlora_jax.tasks.common import backbone_dtype


def prepare_text_inputs(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> None:
  """Makes what a text run reads from disk: the embedded decoder (pretrained and cached, unless
  `pretrain.checkpoint` names one) and `data.name` tokenized by its tokenizer
  (`instructions.prepare_tokenized`). For the main process of a multi-process run, and sweeps;
  the decoder's weights are read by the runs, not here."""
  backbone, data = backbone_settings(config), data_block(config)
  check = lambda tokenizer: check_records_fit(data, backbone.pretrain, tokenizer, log)
  check(backbone_lib.decoder_checkpoint(backbone, log, check).require_tokenizer())


def check_records_fit(
  data: config_blocks.TextData,
  pretraining: config_blocks.TextPretrain,
  tokenizer: Any,
  log: Callable[[str], None] = print,
) -> None:
  """`data.name` tokenized by `tokenizer` (once, cached) keeps a response token within
  `data.max_len` in at least half its records; else ConfigError naming data.max_len. Run as
  soon as the tokenizer exists: for the embedded decoder, before its pretraining. A preference
  run's pairs are read (and checked) in memory by the run itself: nothing to do.

  Args:
    data, pretraining: the run's `data` and `pretrain` blocks.
    tokenizer: the decoder's (`hf.Tokenizer`).
    log: progress lines.
  """
  if data.layout in text.PREFERENCE_LAYOUTS:
    return
  refuse_lost_records(data, pretraining, instructions.prepare_tokenized(data, tokenizer, log))


def refuse_lost_records(
  data: config_blocks.TextData, pretraining: config_blocks.TextPretrain, records: instructions.TokenizedRecords
) -> None:
  """ConfigError naming data.max_len when more than half of `records` keep no response token.

  Args:
    data, pretraining: the run's `data` and `pretrain` blocks (named in the message).
    records: the tokenized records.
  """
  refuse_lost(data, pretraining, int(records.no_loss.sum()), len(records.no_loss))


def refuse_lost(data: config_blocks.TextData, pretraining: config_blocks.TextPretrain, lost: int, total: int) -> None:
  """ConfigError naming data.max_len when `lost` of `total` records (or pairs) keep no response
  token (more than half).

  Args:
    data, pretraining: the run's `data` and `pretrain` blocks (named in the message).
    lost, total: the counts.
  """
  if lost > total / 2:
    raise ConfigError(
      f"data.max_len: {lost} of {total} records keep no response token within "
      f"data.max_len={data.max_len} tokens (their prompts fill it); raise it"
      + (
        ""
        if pretraining.checkpoint
        else f" (or pretrain.vocab_size={pretraining.vocab_size}: a larger vocabulary takes fewer tokens)"
      )
    )


def build_text_federated_data(
  config: ml_collections.ConfigDict, tokenizer, log: Callable[[str], None], model_vocab_size: int | None = None
) -> tuple[ml_collections.ConfigDict, FederatedData]:
  """(config with data.num_clients resolved (`with_clients_of`), the data): the records of
  `data.name` tokenized (once, kept in `data.data_dir`), split per group into train / test,
  in memory or streamed (`data.stream`), partitioned, every client holding at least
  data.min_client_size training records; every id checked against the tokenizer's vocabulary
  and the model's embedding rows (`model_vocab_size`)."""
  vocab = min(tokenizer.vocab_size, model_vocab_size or tokenizer.vocab_size)
  unresolved = data_block(config)
  if is_preference(config):
    train, test = preferences.load_preference_datasets(unresolved, tokenizer, config.seed, vocab)
    refuse_lost(unresolved, backbone_settings(config).pretrain, train.no_loss + test.no_loss, len(train) + len(test))
    config = with_clients_of(config, train.class_names, log)
    block = data_block(config)
  else:
    records = instructions.prepare_tokenized(unresolved, tokenizer, log, vocab)
    refuse_lost_records(unresolved, backbone_settings(config).pretrain, records)
    config = with_clients_of(config, records.group_names, log)
    block = data_block(config)  # data.num_clients resolved.
    train, test = instructions.split_records(records, block, config.seed)
  lost = train.no_loss + test.no_loss
  log(
    f"data: {len(train)} train / {len(test)} test {'pairs' if is_preference(config) else 'records'} of "
    f"{block.name!r}{' (streamed)' if block.stream else ''} in {train.num_classes} "
    f"group(s) by {block.group_field or '(none)'!r}; {train.truncated + test.truncated} cut to "
    f"data.max_len={block.max_len} tokens ({lost} with no response token left)"
  )
  data = partitioned(block, config.seed, config.eval_batch, train, test)
  sizes = data.train_sizes()
  if sizes.min() < block.min_client_size:
    k = int(np.argmin(sizes))
    who = (
      f"{block.group_field} {records.group_names[k]!r}" if block.partition == "one_domain_per_client" else f"client {k}"
    )
    raise ConfigError(
      f"data.min_client_size: {who} has {sizes[k]} training record(s), fewer than "
      f"data.min_client_size={block.min_client_size} ({int(np.sum(sizes < block.min_client_size))} "
      f"client(s) in all); drop such records from {block.name!r} or lower data.min_client_size"
    )
  if block.packing:
    data = packed_training(data, tokenizer.pad_id, log)
  return config, data


def packed_training(data: FederatedData, pad_id: int, log: Callable[[str], None]) -> FederatedData:
  """`data` whose local steps read each client's training records packed into rows
  (`instructions.pack_clients`; `data.packing`), the held-out new clients' too; logs the
  padding fraction of the packed training records' slots, one a row (those with a response token),
  and of their rows'."""
  rows, parts = instructions.pack_clients(data.train_pool, data.train_parts + data.new_train_parts, pad_id)
  training = np.concatenate(parts[: data.num_clients])
  packed, tokens = int(np.sum(rows.plan[training] >= 0)), int(rows.row_tokens[training].sum())
  slots = lambda count: max(count * data.train_pool.max_len, 1)
  log(
    f"data: {packed} training records packed into {len(training)} rows of "
    f"{data.train_pool.max_len} tokens; padding {1 - tokens / slots(packed):.1%} of the records' slots, "
    f"{1 - tokens / slots(len(training)):.1%} of the rows'"
  )
  return dataclasses.replace(
    data, step_pool=rows, step_parts=parts[: data.num_clients], new_step_parts=parts[data.num_clients :]
  )


def with_clients_of(
  config: ml_collections.ConfigDict, groups: tuple[str, ...], log: Callable[[str], None]
) -> ml_collections.ConfigDict:
  """`config` with data.num_clients = the number of `groups` when it is 0 (one client per group,
  as many as the file has; logged), after checking fed.clients_per_round against it. With
  `data.partition='one_domain_per_client'` a nonzero data.num_clients must be that number
  (ConfigError naming it, before any client is built)."""
  one_per_group = config.data.partition == "one_domain_per_client"
  if config.data.num_clients and one_per_group and config.data.num_clients != len(groups):
    raise ConfigError(
      f"data.num_clients: {config.data.num_clients} clients, but data.partition='one_domain_per_client' gives one "
      f"per {config.data.group_field or 'group'} of {config.data.name!r}: {len(groups)} ({', '.join(groups)}); "
      f"set it to {len(groups)}, or 0 for as many as the file has"
    )
  if config.data.num_clients:
    return config
  if config.fed.clients_per_round > len(groups):
    raise ConfigError(
      f"fed.clients_per_round: {config.fed.clients_per_round} exceeds the {len(groups)} clients, one "
      f"per {config.data.group_field or 'group'} of {config.data.name!r} ({', '.join(groups)}); "
      f"lower it (e.g. --config.fed.clients_per_round={len(groups)})"
    )
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_clients = len(groups)
  log(
    f"data.num_clients: 0 -> {len(groups)}, one client per {config.data.group_field or 'group'} of {config.data.name!r}"
  )
  return config


def build_text_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """A text run's `Experiment` from a config whose `model.*` is final
  (`backbone.with_checkpoint_architecture`): every config check first, then the decoder, the
  records (data.num_clients resolved), the causal-LM task and the text signatures, then
  `assembly.assemble` (no compilation)."""
  mesh, method, server_optimizer = checked_method(config)
  backbone_step = backbone_settings(config)
  model, backbone, tokenizer, _ = backbone_lib.text_backbone(
    backbone_step,
    log,
    check_tokenizer=lambda tokenizer: check_records_fit(data_block(config), backbone_step.pretrain, tokenizer, log),
  )
  backbone = sharded_backbone(backbone, mesh, log)
  compute_dtype = backbone_dtype(config.compute.backbone_dtype)
  model = model.clone(dtype=compute_dtype)
  config, data = build_text_federated_data(config, tokenizer, log, model.vocab_size)
  settings = run_settings(config)  # data.num_clients resolved.
  pairs = is_preference(config)  # Tokens [N, 2, T]: the chosen sequence stands for the pair below.
  example = {k: jnp.asarray(v[:1, 0] if pairs else v[:1]) for k, v in data.train_pool.tokens.items()}
  targets = lora.find_targets(
    model, backbone, example["input_ids"], example["attention_mask"], target_regex=settings.lora.target_regex
  )
  trainable = {
    "lora": lora.init_lora(jax.random.fold_in(jax.random.key(settings.seed), 1), targets, settings.lora.rank),
    "head": {},
  }
  task: Any = causal_lm.CausalLM(
    model, lora.lora_scale(settings.lora.alpha, settings.lora.rank, settings.lora.rslora), compute_dtype
  )
  if pairs:
    dpo = typed_block(config_blocks.DPO, config, "dpo")
    task = preference.PreferenceLM(task, dpo.beta, dpo.loss_type, dpo.label_smoothing)
  featurize = lambda ids, mask: causal_lm.mean_hidden_state(model, backbone, ids, mask)
  signatures = (
    every_client_signature(
      settings,
      method,
      data,
      model,
      backbone,
      example_keys=("input_ids", "attention_mask"),
      featurize=(lambda ids, mask: featurize(ids[:, 0], mask[:, 0])) if pairs else featurize,
    )
    if method.signature_kinds
    else (None, None)
  )
  exp = assemble(
    settings,
    log,
    mesh=mesh,
    method=method,
    server_optimizer=server_optimizer,
    data=data,
    task=task,
    backbone=backbone,
    targets=targets,
    trainable=trainable,
    signatures=signatures,
  )
  exp.multiple_choice = multiple_choice_block(settings, tokenizer, log)
  exp.tokenizer = tokenizer
  return exp


def multiple_choice_block(settings: RunSettings, tokenizer: Any, log: Callable[[str], None]) -> dict | None:
  """The `mc` questions encoded (`text.encode_multiple_choice`) with their subjects [Q], or None."""
  block = settings.multiple_choice
  if block is None or not block.path:
    return None
  questions = multiple_choice.read_questions(block.path, block.max_questions)
  encoded = text.encode_multiple_choice(tokenizer, questions, block.max_len or settings.input_size[1])
  encoded["subject"] = np.asarray([q["subject"] for q in questions])
  log(f"multiple choice: {len(questions)} questions from {block.path} ({len(set(encoded['subject']))} subjects)")
  return encoded
