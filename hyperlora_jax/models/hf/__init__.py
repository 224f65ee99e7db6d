"""Hugging Face checkpoints (a `save_pretrained` directory) into the project's models, no PyTorch.

    checkpoint = hf.open_checkpoint(directory)    # config.json, architecture, normalization, tokenizer
    model = models.build_model(checkpoint.model_name, num_classes, **checkpoint.architecture)
    params, dropped = checkpoint.params(abstract)  # Flax layout; dropped: tensors the model does not use
    save_peft(directory, adapter, alpha=8.0, module_name=checkpoint.module_namer())  # attaches in transformers 5
    ids = checkpoint.tokenizer(texts, max_len)      # its tokenizer.json (CLIP: vocab.json + merges.txt)

    model, variables, dropped = hf.load_causal_lm(directory)   # a Llama / Mistral / Qwen2 decoder

The package, by concern:
  checkpoint  `open_checkpoint` -> `Checkpoint`; the registry `FAMILIES` (`SUPPORTED`)
  reading     config.json, (sharded) safetensors, preprocessor_config.json
  tensors     the layout conversions and fit check every family shares; position-table resizing
  tokenizer   `Tokenizer` (tokenizers library) and chat templates
  vit, clip, llama   one module per family: architecture from config.json, module-name table
                     (per transformers version where it differs), params loader (llama: writer too)

Supported: `ViTModel` and `ViTForImageClassification` (model_type "vit") as `models.vit.ViT`,
`CLIPModel` ("clip") as `models.clip.CLIP`, and Llama-family decoders ("llama", "mistral",
"qwen2"; *ForCausalLM or the bare model) as `models.llama.DecoderLM`, in `model.safetensors` or
sharded as `model.safetensors.index.json`. Another model_type is refused by name. A new family is
one module defining a `family.Family` and one line in `checkpoint.FAMILIES`.
"""

from __future__ import annotations

from hyperlora_jax.models.errors import CheckpointError, check_finite
from hyperlora_jax.models.hf.checkpoint import (
  FAMILIES,
  SUPPORTED,
  Checkpoint,
  architecture,
  family_named,
  family_of,
  image_size,
  load_params,
  module_namer,
  open_checkpoint,
  read_checkpoint,
)
from hyperlora_jax.models.hf.clip import clip_arch, clip_module_name, clip_params
from hyperlora_jax.models.hf.family import Family
from hyperlora_jax.models.hf.llama import (
  DECODER_TYPES,
  decoder_arch,
  decoder_config,
  decoder_module_name,
  decoder_params,
  load_causal_lm,
  save_causal_lm,
)
from hyperlora_jax.models.hf.reading import (
  CONFIG_FILE,
  INDEX_FILE,
  WEIGHTS_FILE,
  image_normalization,
  read_config,
  read_tensors,
  square_size,
)
from hyperlora_jax.models.hf.tensors import _bicubic_matrix, resize_position_table  # noqa: F401 (tests)
from hyperlora_jax.models.hf.tokenizer import (
  SENTENCEPIECE_FILE,
  TOKENIZER_FILE,
  Tokenizer,
  clip_bpe_tokenizer,
  render_chat_template,
  sentencepiece_merges,
  sentencepiece_tokenizer,
)
from hyperlora_jax.models.hf.vit import TRANSFORMERS_VERSIONS, vit_arch, vit_module_name, vit_module_namer, vit_params

__all__ = [
  "CONFIG_FILE",
  "DECODER_TYPES",
  "FAMILIES",
  "INDEX_FILE",
  "SENTENCEPIECE_FILE",
  "SUPPORTED",
  "TOKENIZER_FILE",
  "TRANSFORMERS_VERSIONS",
  "WEIGHTS_FILE",
  "Checkpoint",
  "CheckpointError",
  "Family",
  "Tokenizer",
  "architecture",
  "check_finite",
  "clip_arch",
  "clip_bpe_tokenizer",
  "clip_module_name",
  "clip_params",
  "decoder_arch",
  "decoder_config",
  "decoder_module_name",
  "decoder_params",
  "family_named",
  "family_of",
  "image_normalization",
  "image_size",
  "load_causal_lm",
  "load_params",
  "module_namer",
  "open_checkpoint",
  "read_checkpoint",
  "read_config",
  "read_tensors",
  "render_chat_template",
  "resize_position_table",
  "save_causal_lm",
  "sentencepiece_merges",
  "sentencepiece_tokenizer",
  "square_size",
  "vit_arch",
  "vit_module_name",
  "vit_module_namer",
  "vit_params",
]
