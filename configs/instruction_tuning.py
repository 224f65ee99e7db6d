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
  checkpoint=DIR     a Hugging Face Llama / Mistral / Qwen2 directory (config.json, safetensors,
                     tokenizer.json) instead of the embedded decoder; its config.json sets model.*
  chat               prompts with the checkpoint's chat template instead of Alpaca's
  stream             token rows read from the tokenized files when a block needs them, not held in
                     memory (the records are tokenized once, into data.data_dir, either way)

  python -m experiments.main --config configs/instruction_tuning.py:data=/data/databricks-dolly-15k.jsonl,checkpoint=/ckpt/TinyLlama-1.1B,method=hyperlora \
      --workdir runs/dolly_tinyllama
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = default.parse_arg(arg)
  config = default.get_config(arg)
  config.task = "instruction_tuning"
  config.benchmark = "instruction_tuning"

  config.data = ml_collections.ConfigDict()
  config.data.name = args.get("data", "stdlib_docs")  # The embedded records, or a file.
  config.data.data_dir = ""  # Tokenized records kept here; '' = ~/.cache/hyperlora_jax/tokenized
  config.data.layout = args.get("layout", "dolly")
  config.data.group_field = "category" if config.data.layout == "dolly" else ""
  config.data.test_fraction = 0.2  # Of each category's records, held out for test.
  config.data.max_len = 176  # Tokens per example (prompt + response + eos), padded:
  # 95% of the embedded records fit whole.
  config.data.chat_template = bool(args.get("chat", False))
  by_category = (
    args.choice("partition", "category" if config.data.group_field else "dirichlet", ("category", "dirichlet"))
    == "category"
  )
  config.data.partition = "one_domain_per_client" if by_category else "dirichlet_label_skew"
  config.data.num_clients = 0 if by_category else args.int("clients", 20)  # 0: one per group in the data.
  config.data.dirichlet_alpha = args.float("alpha", 0.5)
  config.data.classes_per_client = 2
  config.data.min_client_size = 4
  config.data.heldout_clients = 0
  config.data.max_client_examples = 0
  config.data.validation_fraction = 0.0
  config.data.stream = bool(args.get("stream", False))  # Token rows read from the tokenized files as needed.
  config.data.stream_chunk_examples = 4096
  config.data.feed = "round"

  config.model = ml_collections.ConfigDict()
  config.model.name = "llama"
  config.model.width = 64
  config.model.depth = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 172
  config.model.remat = False

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.checkpoint = args.get("checkpoint", "")  # A Hugging Face decoder directory instead.
  config.pretrain.cache_dir = ""  # '' = ~/.cache/hyperlora_jax/backbones
  config.pretrain.vocab_size = 2048  # The embedded tokenizer's BPE vocabulary.
  config.pretrain.sequence_length = 64
  config.pretrain.steps = 600
  config.pretrain.batch_size = 32
  config.pretrain.learning_rate = 3e-3

  config.fed.num_rounds = args.int("rounds", 30)
  config.fed.clients_per_round = 6
  config.fed.local_steps = 5
  config.fed.batch_size = 8
  config.fed.clients_per_chunk = 0  # All sampled clients vmapped at once.
  config.fed.head_policy = "shared"  # A decoder has no head; kept for the shared checks.
  config.client_optimizer.learning_rate = 3e-3
  config.eval_batch = 32
  config.eval_every = 5

  if args.get("smoke"):
    config.model.width, config.model.depth, config.model.num_heads, config.model.num_kv_heads = 32, 1, 2, 1
    config.model.mlp_dim = 64
    config.pretrain.steps = 60
    config.fed.num_rounds = args.int("rounds", 3)
    config.fed.clients_per_round, config.fed.local_steps, config.fed.batch_size = 4, 2, 4
    config.eval_every, config.checkpoint_every = 1, 2
  return config
