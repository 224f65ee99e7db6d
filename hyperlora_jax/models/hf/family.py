"""`Family`: what the checkpoint package knows of one model family, in one record per family
module (`vit.FAMILY`, `clip.FAMILY`, `llama.FAMILY`). A new family is one module defining one."""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import numpy as np

# (tensors {name: array}, abstract params, origin {name: file} or None) -> (params, dropped names).
ParamsLoader = Callable[[dict[str, np.ndarray], Any, "dict[str, str] | None"], tuple[dict, list[str]]]
# (prefix, transformers major version) -> (Flax module path -> Hugging Face module name or None).
ModuleNamer = Callable[[str, int], Callable[[str], "str | None"]]


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family of Hugging Face checkpoints.

  Attributes:
    model_types: the config.json `model_type` values it reads ("llama", "mistral", ...).
    model_name: the project's model it builds ("vit", "clip", "llama": `models.MODELS` or
      `models.llama.DecoderLM`).
    description: what it supports, as errors list it.
    architecture: config.json -> the model's architecture fields (raises CheckpointError for
      what the model cannot run).
    params: checkpoint tensors -> the model's params (`ParamsLoader`).
    module_namer: the `module_name` of `peft.save_peft` / `load_peft` (`ModuleNamer`).
    image_size: config.json -> the image side its position table is for (None: not an image
      model).
  """

  model_types: tuple[str, ...]
  model_name: str
  description: str
  architecture: Callable[[dict], dict[str, Any]]
  params: ParamsLoader
  module_namer: ModuleNamer
  image_size: Callable[[dict], int] | None = None
