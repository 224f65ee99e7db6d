"""A CLIP-style dual encoder (Radford et al., 2021): a ViT image tower and a transformer
text tower mapped into one embedding space, classifying zero-shot from class prompts.

Module paths (what LoRA's `target_regex` matches):
  image_tower/...                          a `ViT` (features of its CLS token)
  image_projection                         [width, embed_dim], no bias
  text_tower/token_embedding               nn.Embed over `vocab_size` hashed word ids
  text_tower/encoder/block_{i}/attn/{query,key,value,out}, .../mlp/{fc1,fc2}
  text_projection                          [text_width, embed_dim], no bias
  logit_scale                              log of the softmax temperature (CLIP's t)
LoRA on both towers: `lora.target_regex = r"(image|text)_tower/encoder/block_\\d+/attn/(query|value)"`.

Text goes through `tokenize`: lower-cased words, each hashed (CRC-32) to one of
`vocab_size - 2` ids, so any class name tokenizes without a vocabulary file; 0 pads and 1
starts every sequence. Padding is excluded from the text tower's mean pooling.
The model knows nothing of federation or LoRA.
"""
from __future__ import annotations

import re
import zlib
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.models.vit import ViT, Encoder

PAD_ID, START_ID = 0, 1


def tokenize(texts: Sequence[str], vocab_size: int, max_len: int) -> np.ndarray:
  """Hashed word ids, [len(texts), max_len] int32 (start id, words, then 0 padding; truncated)."""
  out = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    words = re.findall(r"[a-z0-9]+", text.lower())
    ids = [START_ID] + [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in words]
    out[i, :min(len(ids), max_len)] = ids[:max_len]
  return out


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
  """`template` with '{}' filled by each class name (underscores become spaces)."""
  return [template.format(name.replace("_", " ")) for name in class_names]


class TextTower(nn.Module):
  """Transformer over hashed word ids; mean of the non-padding token states."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens: [T, L] int -> features [T, width]."""
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.max_len, self.width))
    x = Encoder(self.depth, self.num_heads, self.mlp_ratio, name="encoder")(x)
    mask = (tokens != PAD_ID).astype(x.dtype)[..., None]
    return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class CLIP(nn.Module):
  """Dual encoder; `__call__(images)` gives zero-shot logits over the class prompts.

  Attributes:
    num_classes: number of class prompts (= len(class_names)).
    class_names: names filled into `prompt_template` for zero-shot classification.
    prompt_template: e.g. 'a photo of the digit {}'.
    patch_size, width, depth, num_heads, mlp_ratio: the image tower (a `ViT`).
    text_width, text_depth, text_heads, vocab_size, max_len: the text tower.
    embed_dim: the shared embedding width.
  """
  num_classes: int
  class_names: tuple[str, ...] = ()
  prompt_template: str = "a photo of the digit {}"
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 2.0
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  vocab_size: int = 1024
  max_len: int = 12
  embed_dim: int = 64

  def setup(self):
    self.image_tower = ViT(num_classes=1, patch_size=self.patch_size, width=self.width,
                           depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.text_tower = TextTower(self.vocab_size, self.max_len, self.text_width, self.text_depth,
                                self.text_heads, self.mlp_ratio)
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def prompt_tokens(self) -> np.ndarray:
    """[num_classes, max_len] tokens of the class prompts (a trace-time constant)."""
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"CLIP needs one class name per class: got {len(self.class_names)} names for "
                       f"{self.num_classes} classes")
    return tokenize(class_prompts(self.class_names, self.prompt_template), self.vocab_size, self.max_len)

  def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
    """images [B, H, W, 3] float -> unit-norm embeddings [B, embed_dim]."""
    x = self.image_projection(self.image_tower(images, return_features=True))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)

  def encode_text(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens [T, max_len] int -> unit-norm embeddings [T, embed_dim]."""
    x = self.text_projection(self.text_tower(tokens))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray | None = None,
               return_features: bool = False) -> jnp.ndarray:
    """Image-to-text logits exp(t) <img, txt>, [B, T]; `tokens` [T, max_len] defaults to the
    class prompts (zero-shot logits [B, num_classes]). `return_features`: the image
    embeddings [B, embed_dim] (the text tower still runs, so `init` creates every parameter)."""
    text = self.encode_text(jnp.asarray(self.prompt_tokens() if tokens is None else tokens))
    image = self.encode_image(images)
    if return_features:
      return image
    return jnp.exp(jnp.minimum(self.logit_scale, np.log(100.0))) * image @ text.T
