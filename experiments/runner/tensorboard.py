"""TensorBoard event files beside metrics.jsonl, written by the main process (`tensorboardX`, which
needs no TensorFlow):

  workdir/tensorboard/events.out.tfevents.*   (tensorboard --logdir workdir/tensorboard)

Each round's record as it is in metrics.jsonl: every number a scalar tagged with its key (the
step is the round), every list of numbers a histogram (`aggregation_bias_per_layer`, over the
adapted layers); and the per-client distributions as histograms under `clients/`
(`clients/personalized_accuracy`: each client's own model on its own test split, over the
clients with test examples, at the rounds that evaluate). A resumed run purges the steps after
its checkpoint (TensorBoard's `purge_step`), as metrics.jsonl drops them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes rounds' records to workdir/tensorboard.

  Args:
    workdir: the run's directory.
    first_round: the first round this run writes (done + 1 on resume: later steps are purged).
  """

  def __init__(self, workdir: str, first_round: int = 1):
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(
      logdir=os.path.join(workdir, TENSORBOARD_DIR),
      purge_step=first_round if first_round > 1 else None,
      filename_suffix=f".from-round-{first_round}",  # A resume within the same second gets a file of its own.
    )

  def write(self, record: Mapping, per_client: Mapping[str, np.ndarray] | None = None) -> None:
    """One round's `record` (its "round" is the step) and its per-client arrays [N]."""
    step = int(record["round"])
    for key, value in record.items():
      if key == "round" or isinstance(value, bool):
        continue
      if isinstance(value, (int, float)) and math.isfinite(value):
        self.writer.add_scalar(key, value, step)
      elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        values = np.asarray(value, np.float64)
        if np.all(np.isfinite(values)):
          self.writer.add_histogram(key, values, step)
    for key, values in (per_client or {}).items():
      values = np.asarray(values, np.float64)
      values = values[np.isfinite(values)]
      if values.size:
        self.writer.add_histogram(f"clients/{key}", values, step)
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
