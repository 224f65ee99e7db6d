"""Runs one federated LoRA experiment, or several methods side by side on one config.

  python -m experiments.main --config configs/default.py --workdir runs/fedit
  python -m experiments.main --config configs/default.py --methods hyperlora,fedit --workdir runs/default
  python -m experiments.main --config configs/default.py:smoke --workdir /tmp/smoke \
      --config.fed.num_rounds=5

With --methods, each method runs on the same config (same data, partition, backbone, seed) in
WORKDIR/<method>, then a side-by-side table is printed. Rerunning with the same workdir resumes
from the last checkpoint.

Several processes (hosts) run one experiment together: start the same command in each, with
--coordinator HOST:PORT (process 0's), --num_processes N and --process_id i, or --distributed_auto
on TPU pods and Slurm. The clients axis spans every process's devices; process 0 writes the files.

  python -m experiments.main --config configs/default.py:smoke --workdir /tmp/mp \
      --coordinator 127.0.0.1:29500 --num_processes 2 --process_id 0   # and 1, in another shell
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from hyperlora_jax import distributed
from experiments import cli
from experiments.runner import reporting
from experiments.runner.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
_METHODS = flags.DEFINE_list("methods", [], "Methods to compare on the config (default: its `method`).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: process 0's HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")
_AUTO = flags.DEFINE_bool("distributed_auto", False, "Multi-process: detect the cluster (TPU, Slurm).")


_MAIN_STARTED = False


def main(argv):
  del argv
  global _MAIN_STARTED
  _MAIN_STARTED = True
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _AUTO.value)
  say = print if distributed.is_main_process() else (lambda *_: None)
  if not _METHODS.value:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    say(result["summary"])
    say(f"  wall time              {result['seconds']:.0f}s; metrics in {_WORKDIR.value}/metrics.jsonl")
    return
  finals = {}
  for method in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.unlock()
    config.method = method
    workdir = f"{_WORKDIR.value}/{method}"
    result = train_and_evaluate(config, workdir)
    say(result["summary"])
    say(f"  wall time              {result['seconds']:.0f}s; metrics in {workdir}/metrics.jsonl\n")
    finals[method] = result["records"]
  say(reporting.side_by_side(finals, reference="fedit"))


def run() -> None:
  """`app.run(main)`, its errors as one line (`experiments.cli`; --verbose: with the traceback),
  and an override of a field the config does not have reported by name: ml_collections raises
  a bare AttributeError/KeyError for it while the flags are parsed, before `main` starts."""
  try:
    cli.run(main, absl_app=True, load_config=cli.load_config_file)
  except (AttributeError, KeyError) as e:
    if _MAIN_STARTED:
      raise
    overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    raise SystemExit(
      f"config: no field {str(e).strip(chr(34))} in the config (overrides given: "
      f"{', '.join(overrides) or 'none'}); see the config file for its fields"
    ) from None


if __name__ == "__main__":
  run()
