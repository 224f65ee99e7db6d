"""Shared pieces of the benchmark configs: the backbones and the `smoke` sizes."""

import ml_collections

# Tiny CPU-sized backbones for the embedded 16x16 benchmarks (`model=vit|mixer|clip`).
EMBEDDED_MODELS = {
  "vit": {"name": "vit", "patch_size": 4, "width": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
  "mixer": {"name": "mixer", "patch_size": 4, "width": 64, "depth": 4, "tokens_mlp_dim": 32, "channels_mlp_dim": 128},
  "clip": {
    "name": "clip",
    "prompt_template": "a photo of the digit {}",
    "patch_size": 4,
    "width": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "text_width": 64,
    "text_depth": 2,
    "text_heads": 4,
    "vocab_size": 1024,
    "max_len": 12,
    "embed_dim": 64,
  },
}
SMOKE_SIZES = {
  "width": 16,
  "depth": 1,
  "num_heads": 2,
  "tokens_mlp_dim": 8,
  "channels_mlp_dim": 32,
  "text_width": 16,
  "text_depth": 1,
  "text_heads": 2,
  "embed_dim": 16,
}
# The published base-size backbones, for real datasets at 224x224 with a `.npz` checkpoint.
BASE_MODELS = {
  "vit": {"name": "vit", "patch_size": 16, "width": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
  "mixer": {
    "name": "mixer",
    "patch_size": 16,
    "width": 768,
    "depth": 12,
    "tokens_mlp_dim": 384,
    "channels_mlp_dim": 3072,
  },
  # OpenAI CLIP ViT-B/32 (openai/clip-vit-base-patch32's config.json), for the benchmarks; a
  # real CLIP run reads its architecture from the checkpoint (`pretrain.checkpoint`).
  "clip": {
    "name": "clip",
    "prompt_template": "a photo of a {}.",
    "patch_size": 32,
    "width": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_dim": 3072,
    "text_width": 512,
    "text_depth": 12,
    "text_heads": 8,
    "text_mlp_dim": 2048,
    "vocab_size": 49408,
    "max_len": 77,
    "embed_dim": 512,
    "gelu": "quick",
    "layer_norm_eps": 1e-5,
    "image_pre_norm": True,
    "patch_bias": False,
    "text_causal": True,
    "text_pooling": "eot",
    "eot_id": -1,
  },
}
# LoRA targets per backbone family (r=4 on the attention query/value or the Mixer MLPs).
LORA_TARGETS = {
  "vit": r".*attn/(query|value)",
  "mixer": r"MixerBlock_\d+/(token_mixing|channel_mixing)/Dense_0",
  "clip": r"(image|text)_tower/encoder/block_\d+/attn/(query|value)",
}


def use_embedded_model(config: ml_collections.ConfigDict, args: dict, benchmark: str) -> None:
  """The `model=vit|mixer|clip` of a config's args (default vit) as its backbone, and the
  benchmark name (with '/<model>' for a non-default backbone)."""
  model = args.get("model", "vit")
  config.benchmark = benchmark if model == "vit" else f"{benchmark}/{model}"
  set_model(config, EMBEDDED_MODELS[model], smoke=bool(args.get("smoke")))


def set_model(config: ml_collections.ConfigDict, fields: dict, smoke: bool = False) -> None:
  """Replaces `config.model` with `fields` (smoke: tiny sizes) and sets the LoRA targets."""
  fields = dict(fields)
  if smoke:
    fields.update({k: v for k, v in SMOKE_SIZES.items() if k in fields})
  config.model = ml_collections.ConfigDict(fields)
  config.lora.target_regex = LORA_TARGETS[fields["name"]]
