"""Peak host memory (RSS) of a round against the cohort size, and of a run against the dataset size.

Each measurement runs in its own child process (peak RSS is a process's high-water mark), so
the numbers do not mix:

  clients:  one round of local training (the default model, 10 Adam steps of batch 32, LoRA)
            for C clients at a fixed `--chunk` (`benchmarks.workloads.client_update_fn`), the images
            drawn from a host pool: gathered for the whole cohort and put on the device before
            the round (`data.feed='round'`), or read chunk by chunk inside it ('chunk');
  dataset:  a whole default run (`--rounds` rounds, evaluation, checkpoints) of FedIT on
            `digits_domains/res16` and on `digits_domains/res16x10` (10x the train and test
            examples), images streamed (`data.stream=True`) and, for comparison, in memory.

  python -m benchmarks.memory --clients 64,256,1024,4096 --out benchmarks/memory.json
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from absl import flags

_CLIENTS = flags.DEFINE_string("clients", "64,256,1024,4096", "Cohort sizes C ('' to skip).")
_CHUNK = flags.DEFINE_integer("chunk", 16, "clients_per_chunk for the cohort measurements.")
_FEEDS = flags.DEFINE_string("feeds", "round,chunk", "How a round's images enter it (data.feed).")
POOL_SIZE = 6036  # Images in the host pool of the cohort measurements (digits_domains' train split).
_DATASETS = flags.DEFINE_string(
  "datasets", "digits_domains/res16,digits_domains/res16x10", "Datasets for the run measurements ('' to skip)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of each dataset run.")
_CHILD = flags.DEFINE_string("child", "", "Internal: the measurement a child process makes.")
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.")


def peak_rss_mb() -> float:
  """This process's peak resident set size in MB (Linux reports KB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _round_child(num_clients: int, chunk: int, feed: str) -> dict:
  """One round's local training from a host pool of `POOL_SIZE` images: the cohort's images
  gathered before the round (`feed='round'`), or read chunk by chunk inside it
  (`feed='chunk'`, `primitives.host_loader`, as `data.feed='chunk'` runs)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.workloads import client_update_fn
  from hyperlora_jax import primitives

  one_client, trainable, config = client_update_fn()
  size = config.data.image_size
  shape = (num_clients, config.fed.local_steps, config.fed.batch_size)
  rng = np.random.default_rng(0)
  pool = rng.integers(0, 256, (POOL_SIZE, size, size, 3), dtype=np.uint8)
  indices = rng.integers(0, POOL_SIZE, shape).astype(np.int32)
  light = {"label": rng.integers(0, 10, shape, dtype=np.int32), "mask": np.ones(shape, np.float32)}
  fn = lambda xs: one_client(*xs)
  if feed == "round":
    block = jax.device_put({"image": pool[indices], **light})
    mapped = jax.jit(lambda starts, b: primitives.map_clients(fn, (starts, b), chunk))
  else:
    read = primitives.host_loader(
      lambda i: pool[np.asarray(i)], lambda s: jax.ShapeDtypeStruct(s.shape + (size, size, 3), jnp.uint8)
    )
    load = lambda xs: (xs[0], {"image": read(xs[1]["indices"]), "label": xs[1]["label"], "mask": xs[1]["mask"]})
    block = jax.device_put({"indices": indices, **light})
    mapped = jax.jit(lambda starts, b: primitives.map_clients(fn, (starts, b), chunk, load_chunk=load))
  start = time.perf_counter()
  jax.block_until_ready(mapped(primitives.broadcast(trainable, num_clients), block))
  return {
    "clients": num_clients,
    "chunk": chunk,
    "feed": feed,
    "image_mb": indices.size * size * size * 3 / 2**20,
    "seconds": time.perf_counter() - start,
    "peak_rss_mb": peak_rss_mb(),
  }


def _dataset_child(name: str, stream: bool, rounds: int) -> dict:
  from configs import default
  from experiments.runner.train import train_and_evaluate

  config = default.get_config(f"rounds={rounds}")
  config.data.name, config.data.stream = name, stream
  config.fed.clients_per_chunk = 0
  config.eval_every = rounds
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir, progress=False, log=lambda _: None)
  return {
    "dataset": name,
    "stream": stream,
    "rounds": rounds,
    "seconds": time.perf_counter() - start,
    "peak_rss_mb": peak_rss_mb(),
    "global_accuracy": result["records"][-1]["global_accuracy"],
  }


def _run_child(spec: str) -> dict:
  """Runs `spec` in a fresh Python process and returns the JSON it prints last."""
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.memory", f"--child={spec}"], capture_output=True, text=True, check=False
  )
  if out.returncode:
    raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    kind, *args = _CHILD.value.split(":")
    if kind == "clients":
      result = _round_child(int(args[0]), int(args[1]), args[2])
    else:
      result = _dataset_child(args[0], args[1] == "1", int(args[2]))
    print(json.dumps(result))
    return
  report = {"machine": platform.machine(), "cpus": os.cpu_count(), "chunk": _CHUNK.value, "clients": [], "datasets": []}
  for num in filter(None, _CLIENTS.value.split(",")):
    for feed in _FEEDS.value.split(","):
      row = _run_child(f"clients:{int(num)}:{_CHUNK.value}:{feed}")
      report["clients"].append(row)
      print(
        f"C={row['clients']:5d} chunk {row['chunk']} feed {feed:5s}: peak RSS {row['peak_rss_mb']:7.0f} MB "
        f"(the round's images {row['image_mb']:6.0f} MB), {row['seconds']:.1f} s",
        flush=True,
      )
  if _DATASETS.value:
    from experiments.runner.data.loader import prepare_dataset  # Prepared here, outside the measurements.

    for name in _DATASETS.value.split(","):
      prepare_dataset(name)
      for stream in (True, False):
        row = _run_child(f"dataset:{name}:{int(stream)}:{_ROUNDS.value}")
        report["datasets"].append(row)
        print(
          f"{name:28s} {'streamed ' if stream else 'in memory'}: peak RSS {row['peak_rss_mb']:7.0f} MB, "
          f"{row['seconds']:.0f} s for {row['rounds']} rounds",
          flush=True,
        )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  from experiments import cli

  cli.run(main, absl_app=True)
