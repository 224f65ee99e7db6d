"""Federated preference tuning by DPO of a decoder language model (OpenFedLLM's second objective).

Each client tunes the LoRA adapter with the DPO loss (`hyperlora_jax.tasks.preference`) on its
preference pairs (a prompt, a chosen and a rejected response); the reference policy is the frozen
decoder itself, adapter off. Every method runs on it (`:method=X`), as on instruction tuning
(configs/instruction_tuning.py, whose decoder, LoRA, optimizer, rounds and options it shares). The
accuracies are preference accuracies: the share of held-out pairs whose chosen response gets the
larger implicit reward β (log π - log π_ref).

Embedded default (no download): the standard library's docstring records turned into pairs
(`experiments/runner/data/preferences.py`): "What does `math.gcd` do?", chosen its own docstring,
rejected the docstring of another function of its category; 13 clients, one per category.

  python -m experiments.main --config configs/preference_tuning.py:method=fedit --workdir runs/dpo_fedit

Args, besides configs/instruction_tuning.py's (data, checkpoint, chat, partition, clients, mc,
method, seed, rounds, smoke):
  layout=pairs|hh_rlhf|ultrafeedback   a local file's fields (default pairs: prompt / chosen /
                     rejected, TRL's; hh_rlhf: Anthropic HH-RLHF's chosen / rejected dialogues;
                     ultrafeedback: UltraFeedback binarized's prompt and message lists)
  group=FIELD        the field that groups records into clients (default category; none:
                     partition=dirichlet over a single group, i.e. IID clients)
  beta=B             DPO's β (default 0.1)
  loss=sigmoid|ipo   DPO's loss or IPO's (dpo.loss_type; dpo.label_smoothing for conservative DPO)

  python -m experiments.main --config configs/preference_tuning.py:data=/data/hh-rlhf-helpful.jsonl,layout=hh_rlhf,group=,partition=dirichlet,clients=8,checkpoint=/ckpt/TinyLlama-1.1B-Chat-v1.0 \\
      --workdir runs/hh_dpo
"""

import ml_collections

from configs import blocks as config_blocks
from configs import default, instruction_tuning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = default.parse_arg(arg)
  config = instruction_tuning.get_config(arg)
  config.task = "preference_tuning"
  config.benchmark = "preference_tuning"
  layout = args.choice("layout", "pairs", ("pairs", "hh_rlhf", "ultrafeedback"))
  group = args.get("group", "category")
  group = "" if group in (True, "", "none") else str(group)
  config.data.layout, config.data.group_field = layout, group
  config.data.partition, config.data.num_clients = instruction_tuning.client_partition(args, group)
  config.gen.examples_per_client = 0  # Generation scoring reads instruction records.
  config.dpo = config_blocks.as_config(
    config_blocks.DPO(beta=args.float("beta", 0.1), loss_type=args.choice("loss", "sigmoid", ("sigmoid", "ipo")))
  )
  return config
