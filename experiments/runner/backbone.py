"""The run's frozen backbone, in one step per modality, from the typed `BackboneSettings`
(`settings.backbone_settings(config)`):

  image_backbone(backbone, log)   -> ImageBackbone: pretrained on the embedded data and cached
                                     (`pretrain`), or a real checkpoint (`pretrain.checkpoint`: a
                                     Hugging Face directory; `pretrain.npz_path`: a `.npz` file)
  text_backbone(backbone, log)    -> TextBackbone: the embedded decoder (`pretrain_text`, built
                                     and cached) or `pretrain.checkpoint`'s, with its tokenizer
  prepare_backbone(backbone, log)    builds the caches only (a multi-process run's main process,
                                     sweeps)

and what the config checks ask before anything is loaded: `opened_checkpoint` (the checkpoint
directory opened once per process, an `hf.Checkpoint` that validation, `model.*` and loading
all read), `real_checkpoint`, and `with_checkpoint_architecture` (the config with `model.*` set
from the checkpoint: the one function here that reads and rewrites the config itself).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple
from collections.abc import Callable

import ml_collections
import numpy as np

from configs import blocks
from experiments.runner import pretrain, pretrain_text
from experiments.runner.config_facts import is_text
from experiments.runner.settings import BackboneSettings
from hyperlora_jax import models
from hyperlora_jax.models import CheckpointError, hf, npz
from hyperlora_jax.models.llama import DecoderLM

# Directories opened in this process: {(absolute path, config.json's mtime and size): Checkpoint}.
_OPENED: dict[tuple, hf.Checkpoint] = {}


def open_directory(directory: str) -> hf.Checkpoint:
  """`hf.open_checkpoint(directory)`, once per process while its config.json is unchanged.

  Raises:
    CheckpointError: the directory holds no supported checkpoint.
  """
  config_file = os.path.join(directory, hf.CONFIG_FILE)
  stat = os.stat(config_file) if os.path.isfile(config_file) else None
  key = (os.path.abspath(directory), stat and (stat.st_mtime_ns, stat.st_size))
  if key not in _OPENED or stat is None:
    _OPENED[key] = hf.open_checkpoint(directory)
  return _OPENED[key]


def opened_checkpoint(directory: str) -> hf.Checkpoint | None:
  """The Hugging Face checkpoint `pretrain.checkpoint` opened (None when there is none).

  Args:
    directory: the field's value ('' for none).
  Returns:
    The `hf.Checkpoint`, or None.
  Raises:
    CheckpointError: prefixed with the field, the directory holds no supported checkpoint.
  """
  if not directory:
    return None
  try:
    return open_directory(directory)
  except CheckpointError as e:
    raise CheckpointError(f"pretrain.checkpoint: {e}") from None


def real_checkpoint(pretraining: blocks.ImagePretrain | blocks.TextPretrain) -> str:
  """The real checkpoint a run loads instead of pretraining ('' for none): `pretrain.checkpoint`
  (a Hugging Face directory) or `pretrain.npz_path` (a `.npz` file).

  Args:
    pretraining: the run's `pretrain` block (`BackboneSettings.pretrain`).
  Returns:
    The path, or ''.
  """
  return pretraining.checkpoint or getattr(pretraining, "npz_path", "")


def with_checkpoint_architecture(
  config: ml_collections.ConfigDict, log: Callable[[str], None] = print
) -> ml_collections.ConfigDict:
  """`config` with `model.*` set from its real checkpoint, each change logged; `config` itself
  when nothing changes.

  A Hugging Face directory gives the model, its sizes, GELU variant, LayerNorm eps, ... (fields
  of another model dropped, the rest kept, e.g. a CLIP's `prompt_template`); a ViT `.npz` its
  pooling (`model.pool`).

  Raises:
    CheckpointError: the directory holds no supported checkpoint, or one of the other modality.
  """
  checkpoint = opened_checkpoint(config.pretrain.get("checkpoint", ""))
  if checkpoint is None:
    return config if is_text(config) else _with_npz_pool(config, log)
  directory = checkpoint.directory
  if is_text(config):
    if checkpoint.model_name != "llama":
      raise CheckpointError(
        f"pretrain.checkpoint: {directory} holds a {checkpoint.model_name} checkpoint; text "
        f"runs take Llama-family decoders"
      )
    model = {"name": "llama", **pretrain_text.compute_fields(config.model), **checkpoint.architecture}
    logged = checkpoint.architecture
  else:
    if checkpoint.model_name not in models.MODELS:
      raise CheckpointError(
        f"pretrain.checkpoint: {directory} holds a decoder language model "
        f"({checkpoint.model_name}); image runs take vit or clip checkpoints"
      )
    name, arch = checkpoint.model_name, checkpoint.architecture
    kept = {k: v for k, v in config.model.items() if k != "name" and k in models.arch_fields(name) and k not in arch}
    model = {"name": name, **kept, **arch}
    logged = None
  if model == config.model.to_dict():
    return config
  if logged is None:
    logged = {k: v for k, v in model.items() if config.model.get(k) != v}
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(model)
  log(f"model: the architecture of {directory}: " + ", ".join(f"model.{k}={v!r}" for k, v in logged.items()))
  return config


def _with_npz_pool(config: ml_collections.ConfigDict, log: Callable[[str], None]) -> ml_collections.ConfigDict:
  """`config` with a ViT's `model.pool` set to its `.npz` checkpoint's (big_vision gap / map)."""
  path = config.pretrain.get("npz_path", "")
  if not path or config.model.name != "vit" or not os.path.isfile(path):
    return config
  pool = npz.npz_pool(npz.npz_names(path))
  if config.model.get("pool", "tok") == pool:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pool = pool
  log(f"model: the pooling of {path}: model.pool={pool!r}")
  return config


class ImageBackbone(NamedTuple):
  """An image run's frozen backbone.

  Attributes:
    variables: {"params": the backbone's params without the classifier head}.
    preprocess: uint8 images [..., H, W, 3] -> the model's inputs (`image_preprocess`).
    tokenizer: a CLIP checkpoint's tokenizer (for its class prompts); None otherwise.
    info: {"source": the checkpoint} or the pretraining's {"holdout_accuracy", "seconds", ...}.
  """

  variables: dict
  preprocess: Callable[[Any], Any]
  tokenizer: hf.Tokenizer | None
  info: dict


def image_backbone(backbone: BackboneSettings, log: Callable[[str], None] = print) -> ImageBackbone:
  """The image run's backbone: `pretrain.checkpoint`'s, `pretrain.npz_path`'s, or pretrained on
  the embedded data (cached, `pretrain.load_or_pretrain`), with its preprocessing.

  Args:
    backbone: `settings.backbone_settings(config)` of an image run.
    log: progress lines.
  Returns:
    The `ImageBackbone`.
  Raises:
    CheckpointError: a checkpoint unreadable or not shaped like `model.*`.
    RuntimeError: a pretraining cache that is not what was written (left in place).
  """
  checkpoint = opened_checkpoint(backbone.checkpoint)
  if checkpoint is not None:
    variables, info = load_hf_backbone(backbone, log)
  elif backbone.pretrain.npz_path:
    variables, info = load_npz_backbone(backbone, log)
  else:
    variables, info = pretrain.load_or_pretrain(backbone, log)
  tokenizer = checkpoint.require_tokenizer() if checkpoint is not None and checkpoint.model_name == "clip" else None
  return ImageBackbone(variables, image_preprocess(backbone.checkpoint), tokenizer, info)


def load_hf_backbone(backbone: BackboneSettings, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """({"params"}, {"source"}) of the Hugging Face directory `pretrain.checkpoint` (tensors the
  run does not use, e.g. a ViT's classifier and pooler, named in the log).

  Raises:
    CheckpointError: unreadable, or not shaped like `model.*`.
  """
  checkpoint = opened_checkpoint(backbone.checkpoint)
  params, dropped = checkpoint.params(pretrain.abstract_backbone(backbone, 1)["params"])
  log(
    f"backbone: loaded the Hugging Face {backbone.model['name']} {checkpoint.directory}"
    + (f" (not loaded: {', '.join(dropped)})" if dropped else "")
  )
  if checkpoint.image_size != backbone.image_size:
    log(
      f"backbone: position embeddings resized from {checkpoint.image_size} px to data.image_size="
      f"{backbone.image_size} px (bicubic, as transformers' interpolate_pos_encoding)"
    )
  return {"params": params}, {"source": checkpoint.directory}


def load_npz_backbone(backbone: BackboneSettings, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """({"params"}, {"source"}) of the `.npz` checkpoint `pretrain.npz_path` (head dropped).

  Raises:
    CheckpointError: unreadable, or not shaped like `model.*`.
  """
  path, name = backbone.pretrain.npz_path, backbone.model["name"]
  flat = npz.read_npz(path)
  params = npz.from_npz(name, flat, pretrain.abstract_backbone(backbone, 1)["params"])
  dropped = npz.dropped_arrays(flat)
  log(f"backbone: loaded {name} from {path}" + (f" (not loaded: {', '.join(dropped)})" if dropped else ""))
  return {"params": params}, {"source": path}


def image_preprocess(checkpoint_directory: str) -> Callable[[Any], Any]:
  """uint8 images [..., H, W, 3] -> the model's inputs: normalized by the checkpoint's
  preprocessor_config.json (image_mean, image_std) when `pretrain.checkpoint` has one, else
  `models.preprocess_images` ([-1, 1], the project's backbones and the google ViTs).

  Args:
    checkpoint_directory: `pretrain.checkpoint` ('' for none).
  Returns:
    The preprocessing function.
  """
  checkpoint = opened_checkpoint(checkpoint_directory)
  if checkpoint is None or checkpoint.normalization is None:
    return models.preprocess_images
  mean, std = (np.asarray(v, np.float32) for v in checkpoint.normalization)

  def preprocess(images):
    return (images.astype("float32") / 255.0 - mean) / std

  return preprocess


class TextBackbone(NamedTuple):
  """A text run's frozen decoder: `model` (`DecoderLM`), `variables` {"params"}, its
  `tokenizer`, and the checkpoint `directory` it was read from."""

  model: DecoderLM
  variables: dict
  tokenizer: hf.Tokenizer
  directory: str


def decoder_checkpoint(
  backbone: BackboneSettings,
  log: Callable[[str], None] = print,
  check_tokenizer: Callable[[hf.Tokenizer], None] | None = None,
) -> hf.Checkpoint:
  """The text run's decoder checkpoint, opened: `pretrain.checkpoint`, or the embedded decoder's
  cache (built on first use, `check_tokenizer` seeing its tokenizer before the pretraining;
  verified on every use: `pretrain_text.decoder_directory`)."""
  checkpoint = opened_checkpoint(backbone.checkpoint)
  if checkpoint is not None:
    return checkpoint
  return open_directory(pretrain_text.decoder_directory(backbone, log, check_tokenizer))


def text_backbone(
  backbone: BackboneSettings,
  log: Callable[[str], None] = print,
  check_tokenizer: Callable[[hf.Tokenizer], None] | None = None,
) -> TextBackbone:
  """The text run's frozen decoder and tokenizer (`decoder_checkpoint`, then its weights).

  Raises:
    CheckpointError: the checkpoint or the cached directory cannot be read.
  """
  checkpoint = decoder_checkpoint(backbone, log, check_tokenizer)
  model, variables, dropped = hf.load_causal_lm(checkpoint, **pretrain_text.compute_fields(backbone.model))
  if dropped:
    log(f"backbone: not loaded (not used): {', '.join(dropped)}")
  return TextBackbone(model, variables, checkpoint.require_tokenizer(), checkpoint.directory)


def prepare_backbone(backbone: BackboneSettings, log: Callable[[str], None] = print) -> None:
  """Builds what an image run's backbone step would build (the pretraining cache), reading no
  real checkpoint; text runs build their decoder with their records (`text_experiment`)."""
  if not real_checkpoint(backbone.pretrain):
    pretrain.load_or_pretrain(backbone, log)
