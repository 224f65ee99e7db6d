"""`open_checkpoint(directory)`: a Hugging Face checkpoint directory opened once, as one value
that validation, model building and weight loading all read; the registry of families."""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import numpy as np

from hyperlora_jax.models.errors import CheckpointError
from hyperlora_jax.models.hf import clip, llama, vit
from hyperlora_jax.models.hf.family import Family
from hyperlora_jax.models.hf.reading import image_normalization, read_config, read_tensors
from hyperlora_jax.models.hf.tokenizer import Tokenizer, has_tokenizer

# Every family this package reads, one module each; a new family is a module and a line here.
FAMILIES: tuple[Family, ...] = (vit.FAMILY, clip.FAMILY, llama.FAMILY)
SUPPORTED = tuple(family.description for family in FAMILIES)
_FAMILY_OF_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(config: dict) -> Family:
  """The family reading a config.json (by its `model_type`).

  Args:
    config: a config.json dict.
  Returns:
    The `Family`.
  Raises:
    CheckpointError: a model_type no family reads, named with what is supported.
  """
  model_type = config.get("model_type")
  if model_type not in _FAMILY_OF_TYPE:
    raise CheckpointError(f"model_type {model_type!r} is not supported here; supported: {', '.join(SUPPORTED)}")
  return _FAMILY_OF_TYPE[model_type]


def family_named(model_name: str) -> Family:
  """The family building the project's model `model_name` ("vit", "clip", "llama").

  Args:
    model_name: "vit", "clip" or "llama".
  Returns:
    The `Family`.
  Raises:
    CheckpointError: no family builds that model.
  """
  for family in FAMILIES:
    if family.model_name == model_name:
      return family
  raise CheckpointError(f"model {model_name!r}: Hugging Face loading supports {', '.join(SUPPORTED)}")


def architecture(config: dict) -> tuple[str, dict[str, Any]]:
  """(the project's model name, its architecture fields) of a config.json.

  Args:
    config: a config.json dict.
  Returns:
    (model name, {architecture field: value}).
  """
  family = family_of(config)
  return family.model_name, family.architecture(config)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A Hugging Face checkpoint directory, opened once (`open_checkpoint`).

  Attributes:
    directory: the `save_pretrained` directory.
    config: its config.json.
    family: the `Family` that reads it.
    architecture: the model's architecture fields (`models.build_model(model_name, ...,
      **architecture)` for vit / clip, `models.llama.DecoderLM(**architecture)` for llama).
    normalization: (image_mean, image_std) of preprocessor_config.json, None without one.
    tokenizer: its `Tokenizer`, None where it carries none (a ViT).
  The tensors are read when asked for (`tensors`, `params`): a config check never reads them.
  """

  directory: str
  config: dict
  family: Family
  architecture: dict[str, Any]
  normalization: tuple[list[float], list[float]] | None
  tokenizer: Tokenizer | None

  @property
  def model_name(self) -> str:
    """The project's model it builds: "vit", "clip" or "llama"."""
    return self.family.model_name

  @property
  def image_size(self) -> int | None:
    """The image side its position table is for (None for a decoder)."""
    return None if self.family.image_size is None else self.family.image_size(self.config)

  def tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({tensor name: array}, {tensor name: file}) of its safetensors (`reading.read_tensors`).

    Returns:
      ({name: array}, {name: file}).
    """
    return read_tensors(self.directory)

  def params(self, abstract_params: Any) -> tuple[dict, list[str]]:
    """(params shaped like `abstract_params`, float32 NumPy; names of the tensors not loaded).

    Args:
      abstract_params: the model's params tree (arrays or ShapeDtypeStructs), its head left out.
    Raises:
      CheckpointError: naming every missing, misshapen or unexpected tensor and its file.
    """
    tensors, origin = self.tensors()
    return self.family.params(tensors, abstract_params, origin)

  def require_tokenizer(self) -> Tokenizer:
    """Its tokenizer; CheckpointError where the directory carries none.

    Returns:
      The `Tokenizer`.
    """
    if self.tokenizer is None:
      raise CheckpointError(
        f"{self.directory}: no tokenizer.json, nor a SentencePiece tokenizer.model, nor CLIP's vocab.json and merges.txt"
      )
    return self.tokenizer

  def module_namer(self, prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
    """Flax module path -> Hugging Face module name: the `module_name` of `peft.save_peft`.

    Args:
      prefix: the module prefix ("vit." for ViTForImageClassification; a decoder's default "model.").
      transformers_version: the major version whose module names to use (ViT: 4 or 5).
    Returns:
      Flax path -> module name, None for a path with no counterpart.
    """
    return self.family.module_namer(prefix, transformers_version)


def open_checkpoint(directory: str) -> Checkpoint:
  """Opens a Hugging Face checkpoint directory once: config.json, the family's architecture,
  the image normalization and the tokenizer (tensors are read on demand).

  Args:
    directory: a `save_pretrained` directory.
  Returns:
    A `Checkpoint`.
  Raises:
    CheckpointError: no or unreadable config.json, an unsupported model_type or architecture,
      an unreadable preprocessor_config.json or tokenizer.
  """
  config = read_config(directory, ", ".join(SUPPORTED))
  family = family_of(config)
  return Checkpoint(
    directory=directory,
    config=config,
    family=family,
    architecture=family.architecture(config),
    normalization=image_normalization(directory),
    tokenizer=Tokenizer.from_directory(directory) if has_tokenizer(directory) else None,
  )


def read_checkpoint(directory: str) -> tuple[str, dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
  """(model name, its architecture fields, {tensor name: array}, {tensor name: its file}) of a
  checkpoint directory (config.json and every tensor; no tokenizer).

  Args:
    directory: a `save_pretrained` directory.
  Returns:
    (model name, architecture fields, tensors, origin).
  """
  name, arch = architecture(read_config(directory, ", ".join(SUPPORTED)))
  tensors, origin = read_tensors(directory)
  return name, arch, tensors, origin


def load_params(
  model_name: str, tensors: dict[str, np.ndarray], abstract_params: Any, origin: dict[str, str] | None = None
) -> tuple[dict, list[str]]:
  """The family `model_name`'s params loader (`vit_params`, `clip_params`, `decoder_params`).

  Args:
    model_name: "vit", "clip" or "llama".
    tensors, abstract_params, origin: as the family's loader takes them.
  Returns:
    (params, dropped tensor names).
  """
  return family_named(model_name).params(tensors, abstract_params, origin)


def module_namer(model_name: str, *, prefix: str = "", transformers_version: int = 5) -> Callable[[str], str | None]:
  """Flax path -> Hugging Face module name for `model_name` ("vit": `vit_module_name` with these
  arguments; "clip": `clip_module_name`; "llama": `decoder_module_name`, prefix "model." unless
  given): the `module_name` of `peft.save_peft` / `load_peft`.

  Args:
    model_name: "vit", "clip" or "llama".
    prefix, transformers_version: as `Checkpoint.module_namer`.
  Returns:
    Flax path -> module name, None for a path with no counterpart.
  """
  known = [family.model_name for family in FAMILIES]
  if model_name not in known:
    raise ValueError(
      f"model {model_name!r}: Hugging Face module names are known for " + ", ".join(repr(k) for k in known)
    )
  return family_named(model_name).module_namer(prefix, transformers_version)


def image_size(config: dict) -> int:
  """The image side a vit / clip config.json's position embeddings are for.

  Args:
    config: a vit or clip config.json dict.
  Returns:
    The image side in pixels.
  """
  family = family_of(config)
  if family.image_size is None:
    raise CheckpointError(f"model_type {config.get('model_type')!r} is not an image model")
  return family.image_size(config)
