"""MLP-Mixer (Tolstikhin et al., 2021) in Flax Linen, with the module names of the
`google-research/vision_transformer` checkpoints, so their `.npz` files load by name.

Module paths (what LoRA's `target_regex` matches):
  stem                                           patch projection (Conv)
  MixerBlock_{i}/token_mixing/Dense_{0,1}        token-mixing MLP (mixes across patches)
  MixerBlock_{i}/channel_mixing/Dense_{0,1}      channel-mixing MLP (mixes across features)
  pre_head_layer_norm, head                      final norm, classifier (zero-initialised)
The model knows nothing of federation or LoRA.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [..., D] -> [..., D] through Dense_0 (D -> hidden), GELU, Dense_1 (hidden -> D)."""
    return nn.Dense(x.shape[-1], name="Dense_1")(nn.gelu(nn.Dense(self.hidden, name="Dense_0")(x)))


class MixerBlock(nn.Module):
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, D] -> [B, T, D]: token mixing on [B, D, T], then channel mixing."""
    y = nn.LayerNorm(name="LayerNorm_0")(x).swapaxes(1, 2)
    x = x + MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y).swapaxes(1, 2)
    y = nn.LayerNorm(name="LayerNorm_1")(x)
    return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class Mixer(nn.Module):
  """MLP-Mixer classifier (Mixer-B/16: patch 16, width 768, depth 12, 384, 3072).

  Attributes:
    num_classes: classifier outputs.
    patch_size: side of a square patch.
    width: channels C of every token.
    depth: number of Mixer blocks.
    tokens_mlp_dim: hidden width D_S of the token-mixing MLP.
    channels_mlp_dim: hidden width D_C of the channel-mixing MLP.
  """

  num_classes: int
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  tokens_mlp_dim: int = 32
  channels_mlp_dim: int = 128

  @nn.compact
  def __call__(self, images: jnp.ndarray, return_features: bool = False) -> jnp.ndarray:
    """images: [B, H, W, 3] float -> logits [B, num_classes] (or features [B, width])."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="stem")(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for i in range(self.depth):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, name=f"MixerBlock_{i}")(x)
    features = nn.LayerNorm(name="pre_head_layer_norm")(x).mean(axis=1)
    if return_features:
      return features
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(features)
