"""Federated instruction tuning of a decoder language model (FedIT's setting, Shepherd; OpenFedLLM).

Embedded default (no download): a small Llama-architecture decoder (width 64, 2 blocks, GQA 4/2
heads, SwiGLU 172) with its byte-level BPE tokenizer, pretrained here on the Python Language
Reference's text (`pydoc_data.topics`, cached after the first run), instruction-tuned with LoRA
(r=4, α=8 on attention query/value) by 13 clients, one per category of the standard library's
docstring records (`stdlib_docs`: "What does `math.gcd` do?" -> its docstring), as FedIT splits
Dolly-15k by category. Alpaca's prompt template; the loss on the response tokens only; metrics
are next-token accuracy over the response tokens (`global_accuracy`, `personalized_accuracy_*`).

  python -m experiments.main --config configs/instruction_tuning.py:method=fedit --workdir runs/text_fedit

Args (comma-separated in the `:arg`), plus configs/default.py's method, seed, rounds, smoke:
  data=PATH          a local Dolly-15k (.jsonl) or Alpaca (.json) file, or a .parquet of either
  layout=dolly|alpaca  its fields (default dolly; Alpaca has no category: partition=dirichlet)
  partition=category|dirichlet   one client per category, as many as the file has (default;
                     data.num_clients=0), or `clients` clients with a Dirichlet(alpha) over the
                     categories (alpha default 0.5)
  clients=N          with partition=dirichlet (default 20)
  checkpoint=DIR     a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3
                     directory (config.json, safetensors, tokenizer.json) instead of the embedded
                     decoder; its config.json sets model.*
  mc, mc=PATH        multiple-choice accuracy at the last round on the embedded set, or on a
                     local MMLU-style file or directory, or a MedQA / MedMCQA / PubMedQA / FPB /
                     TFNS file (default none)
  gen=N              exact match and ROUGE-L of greedy responses to N held-out prompts per client
                     (default 0: none)
  chat               prompts with the checkpoint's chat template instead of Alpaca's
  pack               each client's training records packed into rows of data.max_len tokens
                     (data.packing): few padding slots, several records a row
  stream             token rows read from the tokenized files when a block needs them, not held in
                     memory (the records are tokenized once, into data.data_dir, either way)

  python -m experiments.main --config configs/instruction_tuning.py:data=/data/databricks-dolly-15k.jsonl,checkpoint=/ckpt/TinyLlama-1.1B,method=hyperlora \
      --workdir runs/dolly_tinyllama
"""

import ml_collections

from configs import blocks as config_blocks
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = default.parse_arg(arg)
  config = default.get_config(arg)
  config.task = "instruction_tuning"
  config.benchmark = "instruction_tuning"

  # The data block's fields, defaults and meanings: `configs.blocks.TextData`.
  layout = args.get("layout", "dolly")
  group_field = "category" if layout == "dolly" else ""
  partition, num_clients = client_partition(args, group_field)
  config.data = config_blocks.as_config(
    config_blocks.TextData(
      name=args.get("data", "stdlib_docs"),  # The embedded records, or a file.
      layout=layout,
      group_field=group_field,
      chat_template=bool(args.get("chat", False)),
      packing=bool(args.get("pack", False)),
      partition=partition,
      num_clients=num_clients,
      dirichlet_alpha=args.float("alpha", 0.5),
      min_client_size=4,
      stream=bool(args.get("stream", False)),  # Token rows read from the tokenized files as needed.
    )
  )

  config.model = ml_collections.ConfigDict()
  config.model.name = "llama"
  config.model.width = 64
  config.model.depth = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 172
  config.model.remat = False
  # The backward recomputes each layer's attention weights instead of keeping [heads, T, T] per
  # sequence (`DecoderLM.recompute_attention`: the same numbers up to rounding, less memory; the
  # plan, experiments.plan, tries it where nothing fits).
  config.model.recompute_attention = False

  # The embedded decoder, or a Hugging Face one: `configs.blocks.TextPretrain`.
  config.pretrain = config_blocks.as_config(config_blocks.TextPretrain(checkpoint=args.get("checkpoint", "")))

  config.fed.num_rounds = args.int("rounds", 30)
  config.fed.clients_per_round = 6
  config.fed.local_steps = 5
  config.fed.batch_size = 8
  config.fed.clients_per_chunk = -1  # Measured for this machine at start-up, as for images (on a
  # 2-core CPU: 1, one client at a time; all at once is slower there).
  config.fed.head_policy = "shared"  # A decoder has no head; kept for the shared checks.
  config.client_optimizer.learning_rate = 3e-3
  config.eval_batch = 32
  config.eval_every = 5
  # Multiple-choice accuracy at the last round (`configs.blocks.MultipleChoice`; `:mc` the embedded
  # set, `:mc=FILE` a local MMLU-style file). Off by default: on the default run it adds 14-20 s to
  # the 30 rounds' 39 s on 2 cores (docs/benchmarks.md), and the embedded decoder answers at chance.
  config.mc = config_blocks.as_config(config_blocks.MultipleChoice(path=_choices(args, "")))
  # Exact match and ROUGE-L of greedy responses to held-out prompts (`configs.blocks.GenerationEval`,
  # `:gen=N` per client; off by default: 8 per client take 77 s on the default run).
  config.gen = config_blocks.as_config(config_blocks.GenerationEval(examples_per_client=args.int("gen", 0)))

  if args.get("smoke"):
    config.model.width, config.model.depth, config.model.num_heads, config.model.num_kv_heads = 32, 1, 2, 1
    config.model.mlp_dim = 64
    config.pretrain.steps = 60
    config.fed.num_rounds = args.int("rounds", 3)
    config.fed.clients_per_round, config.fed.local_steps, config.fed.batch_size = 4, 2, 4
    config.eval_every, config.checkpoint_every = 1, 2
    config.fed.clients_per_chunk = 0  # Tests compare runs bit for bit: no measured choice.
  return config


def client_partition(args: default.Args, group_field: str) -> tuple[str, int]:
  """(data.partition, data.num_clients) of `:partition=category|dirichlet` and `:clients=N`: one
  client per group, as many as the data has (num_clients 0), by default when records have a
  group field; else N clients (default 20) with a Dirichlet over the groups."""
  by_group = args.choice("partition", "category" if group_field else "dirichlet", ("category", "dirichlet"))
  if by_group == "category":
    return "one_domain_per_client", 0
  return "dirichlet_label_skew", args.int("clients", 20)


def _choices(args: default.Args, absent: str) -> str:
  """`mc.path` from `:mc=...`: a path, 'embedded' (a bare `:mc`), or '' (`:mc=none`, or absent)."""
  value = args.get("mc", absent)
  return "embedded" if value is True else ("" if value == "none" else value)
