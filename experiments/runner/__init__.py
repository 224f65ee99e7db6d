"""The experiment runner: one user of the `hyperlora_jax` library, driven by `configs/`.

It reads configs (`ml_collections`), datasets and files; the library imports none of it.

  config_validation  every check of a run's config, before anything is loaded or compiled
  methods            a method from a config: an aggregator, which leaves stay local or frozen,
                     a generator plug-in, signatures; METHOD_BLOCKS: the config blocks it reads
  optimizers         optax optimizers from config blocks
  config_blocks      the robust and dp blocks as dataclasses, their defaults' one source
  data/              the embedded dataset (render, digits_domains: an offline TFDS builder),
                     loader (any prepared TFDS dataset), partition, blocks (padded client
                     blocks), corruptions (test-time feature shift)
  federated_data     pools + partition + evaluation blocks for a run
  pretrain           the backbone pretrained once and cached, or a real checkpoint loaded
  experiment         build_experiment(config): data, backbone, task, method and round
  chunking           fed.clients_per_chunk=-1: the chunk size measured for this machine
  feeding            each round's sampled clients' padded blocks, on the mesh
  evaluation         global and personalized accuracy, new clients
  records            a round's metrics.jsonl record
  workdir            the lock, recorded config and environment, checkpoints, resume
  train              train_and_evaluate(config, workdir): the loop, in named phases
  reporting          metrics.jsonl, summaries, tables and plots

The entry points beside it (`experiments/main.py`, `sweep.py`, `report.py`, ...) are thin.
"""
