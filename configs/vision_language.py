"""Vision-language: a CLIP-style dual encoder (ViT image tower + transformer text tower),
pretrained contrastively by the project on captions of the `source` digits, adapted
federatedly with LoRA on the attention query/value of *both* towers, and evaluated by
zero-shot classification: logits are exp(t) <image, text("a photo of the digit {class}")>,
so there is no classifier head at all (the prompt template is not among the pretraining
captions). Data and partition as configs/domainnet_like.py (six domains, chance 10%).

  python -m experiments.main --config configs/vision_language.py:method=hyperlora --workdir runs/vl

Args: clients_per_domain (1 | 5, default 5), alpha, plus configs/default.py's method, seed,
rounds, smoke. 15 rounds of 10 local steps (batch 32).

A real CLIP instead: `checkpoint=DIR`, a Hugging Face `CLIPModel` directory (config.json,
safetensors, tokenizer.json or vocab.json + merges.txt, preprocessor_config.json; e.g.
`huggingface-cli download openai/clip-vit-base-patch32 --local-dir /ckpt/clip-b32`). Its
config.json gives the architecture, its tokenizer the zero-shot prompts, its image processor
the normalization; images are resized to its image_size:

  python -m experiments.main --config configs/vision_language.py:checkpoint=/ckpt/clip-b32,method=hyperlora \
      --workdir runs/vl_clip
"""

from configs import benchmarks, default, domainnet_like
from hyperlora_jax.models import hf


def get_config(arg: str | None = None):
  args = default.parse_arg(arg)
  config = domainnet_like.get_config(arg)
  config.benchmark = config.benchmark.replace("domainnet_like", "vision_language")
  benchmarks.set_model(config, benchmarks.EMBEDDED_MODELS["clip"], smoke=bool(args.get("smoke")))
  if args.get("checkpoint"):
    config.pretrain.checkpoint = args["checkpoint"]
    config.pretrain.data_name = ""  # No pretraining: the checkpoint is the backbone.
    config.data.image_size = hf.image_size(hf.read_config(args["checkpoint"]))
  return config
