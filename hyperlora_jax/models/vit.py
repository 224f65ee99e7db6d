"""A Vision Transformer in Flax Linen, from a tiny CPU size up to ViT-B/16.

The defaults are the project's own small ViT (tanh GELU, LayerNorm eps 1e-6, as flax's and
`google-research/vision_transformer`'s); a checkpoint's own config sets `gelu`, `layer_norm_eps`
and `mlp_dim` to its architecture (Hugging Face ViT: exact GELU, eps 1e-12; `models.hf`).

Module paths (what LoRA's `target_regex` matches):
  embedding                               patch projection (Conv)
  pre_norm                                LayerNorm before the encoder (`pre_norm=True` only)
  encoder/block_{i}/attn/{query,key,value,out}   attention projections (nn.Dense)
  encoder/block_{i}/mlp/{fc1,fc2}         MLP (nn.Dense)
  map_head/{query,key,value,out}, map_head/mlp/{fc1,fc2}   attention pooling (`pool="map"` only)
  head                                    classifier (nn.Dense, zero-initialised)
The model knows nothing of federation or LoRA.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


GELUS = ("tanh", "exact", "quick")


def gelu(x: jnp.ndarray, variant: str) -> jnp.ndarray:
  """GELU: "tanh" (the tanh approximation, flax's default and HF's gelu_new), "exact" (erf,
  PyTorch's and HF's "gelu") or "quick" (x σ(1.702 x), OpenAI CLIP's quick_gelu).

  Args:
    x: any shape.
    variant: "tanh", "exact" or "quick".
  Returns:
    x's shape and dtype.
  """
  if variant == "tanh":
    return nn.gelu(x, approximate=True)
  if variant == "exact":
    return nn.gelu(x, approximate=False)
  if variant == "quick":
    return x * nn.sigmoid(1.702 * x)
  raise ValueError(f"gelu variant {variant!r}; allowed: {GELUS}")


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with separate `nn.Dense` query/key/value/out projections; `causal`: each
  token attends to itself and the tokens before it (a text tower's mask); `qkv_bias`: the
  query/key/value projections have biases (Hugging Face ViT's `qkv_bias`; `out` always has one)."""

  num_heads: int
  causal: bool = False
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, D] -> [B, T, D]."""
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"model.width={width} must be divisible by model.num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(batch, tokens, self.num_heads, head_dim)
    q = split(nn.Dense(width, use_bias=self.qkv_bias, name="query")(x))
    k = split(nn.Dense(width, use_bias=self.qkv_bias, name="key")(x))
    v = split(nn.Dense(width, use_bias=self.qkv_bias, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    if self.causal:
      logits = jnp.where(jnp.tril(jnp.ones((tokens, tokens), bool)), logits, jnp.finfo(logits.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v)
    return nn.Dense(width, name="out")(attended.reshape(batch, tokens, width))


class MlpBlock(nn.Module):
  hidden: int
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [..., D] -> [..., D]."""
    return nn.Dense(x.shape[-1], name="fc2")(gelu(nn.Dense(self.hidden, name="fc1")(x), self.gelu))


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's `MAPHead`): a learned probe attends to the tokens,
  then a residual MLP on its LayerNorm. x: [B, T, D] -> [B, D]."""

  num_heads: int
  mlp_dim: int
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    probe = jnp.tile(self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), x.dtype), (batch, 1, 1))
    q = nn.Dense(width, name="query")(probe).reshape(batch, 1, self.num_heads, head_dim)
    k = nn.Dense(width, name="key")(x).reshape(batch, tokens, self.num_heads, head_dim)
    v = nn.Dense(width, name="value")(x).reshape(batch, tokens, self.num_heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v).reshape(batch, 1, width)
    y = nn.Dense(width, name="out")(attended)
    y = y + MlpBlock(self.mlp_dim, self.gelu, name="mlp")(nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm")(y))
    return y[:, 0]


POOLS = ("tok", "gap", "map")


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  mlp_dim: int = 0
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6
  causal: bool = False
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Pre-LN transformer block, x: [B, T, D] -> [B, T, D]."""
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, name=name)
    x = x + MultiHeadSelfAttention(self.num_heads, self.causal, self.qkv_bias, name="attn")(norm("norm1")(x))
    hidden = self.mlp_dim or int(self.mlp_ratio * x.shape[-1])
    return x + MlpBlock(hidden, self.gelu, name="mlp")(norm("norm2")(x))


class Encoder(nn.Module):
  """`depth` encoder blocks and a final LayerNorm; `remat`: recompute each block's activations
  in the backward pass instead of storing them (less memory, about one more forward pass)."""

  depth: int
  num_heads: int
  mlp_ratio: float
  remat: bool = False
  mlp_dim: int = 0
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6
  causal: bool = False
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(
        self.num_heads,
        self.mlp_ratio,
        self.mlp_dim,
        self.gelu,
        self.layer_norm_eps,
        self.causal,
        self.qkv_bias,
        name=f"block_{i}",
      )(x)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm")(x)


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
    mlp_dim: the MLP hidden width (0: int(mlp_ratio x width)); checkpoints give it exactly.
    gelu: "tanh", "exact" or "quick" (`gelu`).
    layer_norm_eps: every LayerNorm's epsilon.
    pre_norm: a LayerNorm ("pre_norm") on the embedded tokens before the encoder (CLIP's image
      tower: `pre_layrnorm`).
    patch_bias: the patch projection has a bias (CLIP's has none).
    pool: the image feature: "tok" (a class token's final state), "gap" (the mean of the
      patch tokens' final states; no class token) or "map" (`MAPHead` on them, module
      "map_head"; no class token): big_vision's pool_type.
    qkv_bias: the attention's query/key/value projections have biases (Hugging Face ViT's
      `qkv_bias`; False drops those three bias params).
  """

  num_classes: int
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 2.0
  remat: bool = False
  mlp_dim: int = 0
  gelu: str = "tanh"
  layer_norm_eps: float = 1e-6
  pre_norm: bool = False
  patch_bias: bool = True
  pool: str = "tok"
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, images: jnp.ndarray, return_features: bool = False, return_hidden: bool = False) -> jnp.ndarray:
    """images: [B, H, W, 3] float -> logits [B, num_classes]; `return_features`: the pooled
    feature [B, D] instead (`pool`); `return_hidden`: every token's final state [B, T, D], T =
    1 + N patches with a class token, else N (Hugging Face's `last_hidden_state`)."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias, name="embedding")(images)
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r}; allowed: {POOLS}")
    batch, h, w, d = x.shape
    x = x.reshape(batch, h * w, d)
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:], x.dtype)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="pre_norm")(x)
    hidden = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_ratio,
      self.remat,
      self.mlp_dim,
      self.gelu,
      self.layer_norm_eps,
      qkv_bias=self.qkv_bias,
      name="encoder",
    )(x)
    if return_hidden:
      return hidden
    if self.pool == "tok":
      features = hidden[:, 0]
    elif self.pool == "gap":
      features = jnp.mean(hidden, axis=1)
    else:
      features = MAPHead(
        self.num_heads, self.mlp_dim or int(self.mlp_ratio * d), self.gelu, self.layer_norm_eps, name="map_head"
      )(hidden)
    if return_features:
      return features
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(features)
