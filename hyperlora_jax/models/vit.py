"""A Vision Transformer in Flax Linen, from a tiny CPU size up to ViT-B/16.

Module paths (what LoRA's `target_regex` matches):
  embedding                               patch projection (Conv)
  encoder/block_{i}/attn/{query,key,value,out}   attention projections (nn.Dense)
  encoder/block_{i}/mlp/{fc1,fc2}         MLP (nn.Dense)
  head                                    classifier (nn.Dense, zero-initialised)
The model knows nothing of federation or LoRA.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with separate `nn.Dense` query/key/value/out projections."""
  num_heads: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, D] -> [B, T, D]."""
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"model.width={width} must be divisible by model.num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(batch, tokens, self.num_heads, head_dim)
    q = split(nn.Dense(width, name="query")(x))
    k = split(nn.Dense(width, name="key")(x))
    v = split(nn.Dense(width, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v)
    return nn.Dense(width, name="out")(attended.reshape(batch, tokens, width))


class MlpBlock(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [..., D] -> [..., D]."""
    return nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(x)))


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: float

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Pre-LN transformer block, x: [B, T, D] -> [B, T, D]."""
    x = x + MultiHeadSelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="norm1")(x))
    hidden = int(self.mlp_ratio * x.shape[-1])
    return x + MlpBlock(hidden, name="mlp")(nn.LayerNorm(name="norm2")(x))


class Encoder(nn.Module):
  """`depth` encoder blocks; `remat`: recompute each block's activations in the backward
  pass instead of storing them (less memory, about one more forward pass of compute)."""
  depth: int
  num_heads: int
  mlp_ratio: float
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, name=f"block_{i}")(x)
    return nn.LayerNorm(name="norm")(x)


class ViT(nn.Module):
  """ViT classifier.

  Attributes:
    num_classes: classifier outputs.
    patch_size: side of a square patch (16 for ViT-B/16).
    width: token width D (768 for ViT-B).
    depth: number of encoder blocks (12 for ViT-B).
    num_heads: attention heads (12 for ViT-B).
    mlp_ratio: MLP hidden width / D (4 for ViT-B).
    remat: rematerialize each encoder block in the backward pass (same weights and outputs).
  """
  num_classes: int
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 2.0
  remat: bool = False

  @nn.compact
  def __call__(self, images: jnp.ndarray, return_features: bool = False) -> jnp.ndarray:
    """images: [B, H, W, 3] float -> logits [B, num_classes] (or features [B, D])."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(images)
    batch, h, w, d = x.shape
    x = x.reshape(batch, h * w, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d), x.dtype)
    x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d), x.dtype)
    features = Encoder(self.depth, self.num_heads, self.mlp_ratio, self.remat, name="encoder")(x)[:, 0]
    if return_features:
      return features
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(features)
