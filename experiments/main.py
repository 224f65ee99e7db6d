"""Runs one federated LoRA experiment, or several methods side by side on one config.

  python -m experiments.main --config configs/default.py --workdir runs/fedit
  python -m experiments.main --config configs/default.py --methods hyperlora,fedit --workdir runs/default
  python -m experiments.main --config configs/default.py:smoke --workdir /tmp/smoke \
      --config.fed.num_rounds=5

With --methods, each method runs on the same config (same data, partition, backbone, seed) in
WORKDIR/<method>, then a side-by-side table is printed. Rerunning with the same workdir resumes
from the last checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from hyperlora_jax import reporting
from hyperlora_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
_METHODS = flags.DEFINE_list("methods", [], "Methods to compare on the config (default: its `method`).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO.
  if not _METHODS.value:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(result["summary"])
    print(f"  wall time              {result['seconds']:.0f}s; metrics in {_WORKDIR.value}/metrics.jsonl")
    return
  finals = {}
  for method in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.unlock()
    config.method = method
    workdir = f"{_WORKDIR.value}/{method}"
    result = train_and_evaluate(config, workdir)
    print(result["summary"])
    print(f"  wall time              {result['seconds']:.0f}s; metrics in {workdir}/metrics.jsonl\n")
    finals[method] = result["records"]
  print(reporting.side_by_side(finals, reference="fedit"))


if __name__ == "__main__":
  app.run(main)
