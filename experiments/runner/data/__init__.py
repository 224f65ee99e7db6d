"""Data pipelines of the experiments: the embedded dataset, TFDS loading, partitions, client blocks."""
