"""Runs one federated LoRA experiment.

  python -m experiments.main --config configs/default.py --workdir runs/fedit
  python -m experiments.main --config configs/default.py:smoke --workdir /tmp/smoke \
      --config.fed.num_rounds=5

Rerunning with the same workdir resumes from its last checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from hyperlora_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO.
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(result["summary"])
  print(f"  wall time              {result['seconds']:.0f}s; metrics in {_WORKDIR.value}/metrics.jsonl")


if __name__ == "__main__":
  app.run(main)
