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

The defaults are the project's own small CLIP-style model. Its fields also give OpenAI CLIP's
architecture, as a Hugging Face `CLIPModel` checkpoint defines it (`models.hf` sets them): a
causal text tower pooled at the end-of-text token (`text_causal`, `text_pooling="eot"`), a
LayerNorm before the image encoder (`image_pre_norm`), no patch-projection bias, quick GELU,
LayerNorm eps 1e-5, and class prompts tokenized by the checkpoint's BPE (`prompt_ids`).
The model knows nothing of federation or LoRA.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.models.vit import ViT, Encoder

PAD_ID, START_ID = 0, 1


def tokenize(texts: Sequence[str], vocab_size: int, max_len: int) -> np.ndarray:
  """Hashed word ids, [len(texts), max_len] int32 (start id, words, then 0 padding; truncated).

  Args:
    texts: the texts.
    vocab_size: ids are in [2, vocab_size) (0: padding, 1: start).
    max_len: the sequence length.
  Returns:
    [len(texts), max_len] int32.
  """
  out = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    words = re.findall(r"[a-z0-9]+", text.lower())
    ids = [START_ID] + [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in words]
    out[i, : min(len(ids), max_len)] = ids[:max_len]
  return out


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
  """`template` with '{}' filled by each class name (underscores become spaces).

  Args:
    class_names: the classes.
    template: a text with '{}'.
  Returns:
    One prompt per class.
  """
  return [template.format(name.replace("_", " ")) for name in class_names]


TEXT_POOLINGS = ("mean", "eot")


class TextTower(nn.Module):
  """Transformer over token ids, pooled by `pooling`: "mean" of the non-padding token states, or
  "eot": the state at the end-of-text token (the first `eot_id`; `eot_id` < 0: the largest id,
  where OpenAI's vocabulary puts end-of-text). `causal`: each token sees only those before it."""

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  mlp_dim: int = 0
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6
  causal: bool = False
  pooling: str = "mean"
  eot_id: int = -1

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, return_hidden: bool = False) -> jnp.ndarray:
    """tokens: [T, L] int -> features [T, width] (`return_hidden`: every token's [T, L, width])."""
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.max_len, self.width))[:, : x.shape[1]]
    x = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_ratio,
      mlp_dim=self.mlp_dim,
      gelu=self.gelu,
      layer_norm_eps=self.layer_norm_eps,
      causal=self.causal,
      name="encoder",
    )(x)
    if return_hidden:
      return x
    if self.pooling == "eot":
      position = jnp.argmax(tokens == self.eot_id if self.eot_id >= 0 else tokens, axis=-1)
      return jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
    if self.pooling != "mean":
      raise ValueError(f"text pooling {self.pooling!r}; allowed: {TEXT_POOLINGS}")
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
    mlp_dim, text_mlp_dim: each tower's MLP width (0: by mlp_ratio).
    gelu, layer_norm_eps: both towers' GELU variant ("tanh", "exact", "quick") and LayerNorm eps.
    image_pre_norm: a LayerNorm on the image tokens before the encoder; patch_bias: the patch
      projection's bias.
    text_causal, text_pooling, eot_id: the text tower's causal mask and pooling (`TextTower`).
    prompt_ids: the class prompts' token ids, one tuple of `max_len` ids per class (a real
      tokenizer's, `models.hf.Tokenizer`); () tokenizes them by hashing (`tokenize`).
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
  mlp_dim: int = 0
  text_mlp_dim: int = 0
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6
  image_pre_norm: bool = False
  patch_bias: bool = True
  text_causal: bool = False
  text_pooling: str = "mean"
  eot_id: int = -1
  prompt_ids: tuple[tuple[int, ...], ...] = ()

  def setup(self):
    self.image_tower = ViT(
      num_classes=1,
      patch_size=self.patch_size,
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      mlp_dim=self.mlp_dim,
      gelu=self.gelu,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=self.image_pre_norm,
      patch_bias=self.patch_bias,
    )
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.text_tower = TextTower(
      self.vocab_size,
      self.max_len,
      self.text_width,
      self.text_depth,
      self.text_heads,
      self.mlp_ratio,
      self.text_mlp_dim,
      self.gelu,
      self.layer_norm_eps,
      self.text_causal,
      self.text_pooling,
      self.eot_id,
    )
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def prompt_tokens(self) -> np.ndarray:
    """[num_classes, max_len] tokens of the class prompts (a trace-time constant).

    Returns:
      [num_classes, max_len] int32 NumPy.
    """
    if self.prompt_ids:
      if len(self.prompt_ids) != self.num_classes:
        raise ValueError(
          f"CLIP needs one prompt per class: got {len(self.prompt_ids)} prompt_ids for {self.num_classes} classes"
        )
      return np.asarray(self.prompt_ids, np.int32)
    if len(self.class_names) != self.num_classes:
      raise ValueError(
        f"CLIP needs one class name per class: got {len(self.class_names)} names for {self.num_classes} classes"
      )
    return tokenize(class_prompts(self.class_names, self.prompt_template), self.vocab_size, self.max_len)

  def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
    """images [B, H, W, 3] float -> unit-norm embeddings [B, embed_dim].

    Args:
      images: [B, H, W, 3] float (preprocessed).
    Returns:
      [B, embed_dim].
    """
    x = self.image_projection(self.image_tower(images, return_features=True))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)

  def encode_text(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens [T, max_len] int -> unit-norm embeddings [T, embed_dim].

    Args:
      tokens: [T, max_len] int.
    Returns:
      [T, embed_dim].
    """
    x = self.text_projection(self.text_tower(tokens))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)

  def __call__(
    self, images: jnp.ndarray, tokens: jnp.ndarray | None = None, return_features: bool = False
  ) -> jnp.ndarray:
    """Image-to-text logits exp(t) <img, txt>, [B, T]; `tokens` [T, max_len] defaults to the
    class prompts (zero-shot logits [B, num_classes]). `return_features`: the image
    embeddings [B, embed_dim] (the text tower still runs, so `init` creates every parameter)."""
    text = self.encode_text(jnp.asarray(self.prompt_tokens() if tokens is None else tokens))
    image = self.encode_image(images)
    if return_features:
      return image
    return jnp.exp(self.logit_scale) * image @ text.T  # As transformers' CLIPModel: no clamp at inference.


MAX_LOGIT_SCALE = float(np.log(100.0))


def clamp_logit_scale(variables: dict) -> dict:
  """`variables` with the `logit_scale` parameter clipped to [0, ln 100]: CLIP's training rule
  (OpenAI's and open_clip's, after each optimizer step); the forward pass applies the value as is.

  Args:
    variables: CLIP's variables ({"params": {..., "logit_scale"}}).
  Returns:
    A new variables tree.
  """
  params = dict(variables["params"])
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
  return {**variables, "params": params}
