"""`build_experiment(config)`: everything a run needs (data, backbone, task, method, round), built
once from a validated config, before anything is compiled: the image builder
(`image_experiment`) or the text one (`text_experiment`), after a checkpoint's config.json has
set `model.*`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from experiments.runner import backbone
from experiments.runner.assembly import Experiment
from experiments.runner.config_facts import is_text
from experiments.runner.image_experiment import build_image_experiment
from experiments.runner.text_experiment import build_text_experiment


def build_experiment(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Experiment:
  """Validates the config, loads data and backbone, builds the round (no compilation yet).

  Every config check runs first (`config_validation`), before any example or weight is read
  (a Hugging Face checkpoint's config.json first sets `model.*`).
  """
  config = backbone.with_checkpoint_architecture(config, log)
  return (build_text_experiment if is_text(config) else build_image_experiment)(config, log)
