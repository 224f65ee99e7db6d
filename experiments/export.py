"""Writes a run's adapters as Hugging Face PEFT directories, from a checkpoint of its workdir.

  python -m experiments.export --workdir runs/llama_fedit
  python -m experiments.export --workdir runs/llama_fedit --round 8 --clients 0,3 --out adapters/
  python -m experiments.export --workdir runs/llama_flora --max_rank 64 --base_model meta-llama/Llama-2-7b-hf

writes OUT/global/ (the model evaluated as global) and OUT/client-<k>/ (client k's personalized
model) for the checkpoint of round --round (default: the latest the run keeps; a run keeps its
last two, and `export_every` writes adapters while it trains). OUT defaults to
WORKDIR/adapters/round-<R>. Each directory loads in PyTorch with

  peft.AutoPeftModelForCausalLM.from_pretrained(OUT/global)          # a text run
  peft.PeftModel.from_pretrained(transformers.AutoModel...(base), OUT/global)

(`base_model_name_or_path` is the run's checkpoint directory unless --base_model names
another; `task_type` is CAUSAL_LM for text runs). FedEx-LoRA's and FLoRA's merged residuals are
folded into the adapter exactly (higher ranks) unless --max_rank caps them. See
`experiments/runner/export.py` for the layout.
"""

from __future__ import annotations

import argparse
import sys

from experiments import cli


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="The run's directory (config.json, checkpoints/).")
  parser.add_argument("--round", type=int, default=None, help="The checkpointed round (default: the latest).")
  parser.add_argument("--clients", default="", help="Personalized adapters too: 'all' or ids '0,3' (default none).")
  parser.add_argument("--out", default="", help="Directory to write (default WORKDIR/adapters/round-<R>).")
  parser.add_argument("--base_model", default="", help="base_model_name_or_path to write (default: the run's).")
  parser.add_argument("--max_rank", type=int, default=0, help="Cap on folded residual ranks (0: exact).")
  parser.add_argument("--verbose", action="store_true", help="Tracebacks on errors.")
  args = parser.parse_args(argv)
  cli.run_reporting_errors(lambda: export(args), argv)


def export(args: argparse.Namespace) -> None:
  from experiments.runner import export as export_lib
  from experiments.runner import workdir as workdir_lib
  from experiments.runner.train import restore_checkpointed
  from experiments.runner.settings import backbone_settings

  if args.max_rank < 0:
    raise ValueError(f"--max_rank={args.max_rank}: give 0 (exact) or a positive rank")
  config = workdir_lib.recorded_config(args.workdir)
  exp, state, done, clients = restore_checkpointed(config, args.workdir, args.round, args.clients)
  target = export_lib.adapter_target(backbone_settings(config), exp, base_model=args.base_model)
  directory = args.out or export_lib.round_directory(args.workdir, done)
  written = export_lib.export_state(
    exp, state, directory, target, clients, round_done=done, workdir=args.workdir, max_rank=args.max_rank
  )
  print(
    f"{config.method}, round {done} of {config.fed.num_rounds}; base model: {target.base_model_name_or_path or '-'}"
  )
  for path in written:
    record = export_lib.read_export(path)
    folded = record.get("folded_base_delta", {})
    extra = (
      f", {len(folded)} residuals folded (ranks up to {max(f['rank'] for f in folded.values())})" if folded else ""
    )
    print(f"  {path}: rank {record['rank']}, lora_alpha {record['lora_alpha']:g}{extra}")


if __name__ == "__main__":
  main(sys.argv[1:])
