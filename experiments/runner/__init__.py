"""The experiment runner: one user of the `hyperlora_jax` library, driven by `configs/`.

It reads configs (`ml_collections`), datasets and files; the library imports none of it.

Its imports are acyclic (`tests/test_layout.py`); read top down:

  config_facts       what every module may ask of a config: ConfigError, is_text, the cache root
  config_validation  every check of a run's config, before anything is loaded or compiled
  settings           the config unpacked into typed values (configs/blocks.py's dataclasses): the
                     backbone step's, the data block, the run's; nothing below the builders takes
                     the whole config
  memory             whether a run fits the device: before anything is prepared, after compiling
  methods            a method from its typed blocks: an aggregator, which leaves stay local or frozen,
                     a generator plug-in, signatures; METHOD_BLOCKS: the config blocks it reads
  optimizers         optax optimizers from typed blocks (`configs/blocks.py`)
  data/              the embedded dataset (render, digits_domains: an offline TFDS builder),
                     loader (any prepared TFDS dataset), partition, blocks (padded client
                     blocks), corruptions (test-time feature shift), instructions (text records)
  federated_data     pools + partition + evaluation blocks for a run
  pretrain           the backbone pretrained once and cached, or a real checkpoint loaded;
                     pretrain_text: a text run's decoder and tokenizer
  chunking           fed.clients_per_chunk=-1: the chunk size measured for this machine
  assembly           the Experiment record and the parts both tasks share; assemble() builds
                     the round, the only place one is built
  image_experiment, text_experiment   each task's data, backbone and task, ending in assemble()
  experiment         build_experiment(config): the checkpoint's architecture, then one builder
  feeding            each round's sampled clients' padded blocks, on the mesh
  evaluation         global and personalized accuracy, new clients
  records            a round's metrics.jsonl record
  workdir            the lock, recorded config and environment, checkpoints, resume
  train              train_and_evaluate(config, workdir): the loop, in named phases
  reporting          metrics.jsonl, summaries, tables and plots

The entry points beside it (`experiments/main.py`, `sweep.py`, `report.py`, ...) are thin.
"""
