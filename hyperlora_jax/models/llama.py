"""A Llama-family decoder language model in Flax Linen (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3,
Phi-3, TinyLlama).

The architecture as those checkpoints define it (and transformers' `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` compute it): token embedding; `depth` pre-norm blocks of
RMSNorm -> grouped-query self-attention with rotary position embeddings -> residual, RMSNorm ->
SwiGLU MLP (down(silu(gate(x)) * up(x))) -> residual; a final RMSNorm; an LM head, or the
embedding table itself when tied. Attention biases on query/key/value (Qwen2: `qkv_bias`) and on
every projection (Llama's `attention_bias`), an RMSNorm of each query and key head (Qwen3's
`qk_norm`), a sliding window (Mistral) and rotary scaling ("linear", "llama3") are options, and so
are Gemma's: (1 + scale) RMSNorms also after the attention and the MLP, GeGLU, embeddings scaled
by sqrt(width), a query scalar, logit soft-caps, sliding and global blocks with two rope bases;
and Phi-3's fused projections;
`models.hf.open_checkpoint` sets them from config.json.

Module paths (what LoRA's `target_regex` matches; the default `.*attn/(query|value)` adapts q and
v, FedIT's choice):
  embed                                           token embedding (nn.Embed; the tied LM head)
  block_{i}/attn/{query,key,value,out}            attention projections (nn.Dense)
  block_{i}/attn/{query_norm,key_norm}            the heads' RMSNorms (qk_norm only)
  block_{i}/attn/qkv, block_{i}/mlp/gate_up       fused projections (Phi-3), instead of query,
                                                  key, value and gate, up
  block_{i}/mlp/{gate,up,down}                    SwiGLU MLP (nn.Dense)
  block_{i}/{attn_norm,mlp_norm}, norm            RMSNorms (Gemma: attn_norm, attn_post_norm,
                                                  mlp_pre_norm, mlp_post_norm)
  lm_head                                         untied LM head (nn.Dense, no bias)

Shapes: B sequences of T tokens; `input_ids` int [B, T]; `attention_mask` [B, T] (1 = a real
token, 0 = padding; padded keys are never attended; or 1, 2, ... the segments of several
sequences packed in a row, each attending only within itself); logits float32 [B, T, vocab].
Positions default to each sequence's count of real tokens before it (0, 1, ... after any left
padding, as transformers' `generate` computes them; from 0 again at each packed sequence). The
model knows nothing of federation or LoRA.

`generate` is greedy decoding with a key/value cache: one prefill of the (left-padded) prompts,
then one token per step inside `jax.lax.scan`, so a whole generation is one compiled function.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3")
Cache = dict  # {"k": [depth, B, S, kv_heads, head_dim], "v": same, "mask": [B, S], "index": int32 []}


class RMSNorm(nn.Module):
  """x / sqrt(mean(x²) + eps) * scale, computed in float32 (transformers' LlamaRMSNorm); with
  `offset` (Gemma's 1), x / sqrt(...) * (offset + scale), cast to x's dtype last (GemmaRMSNorm,
  whose checkpoints hold the scale as a difference from 1, and whose scale starts at 0)."""

  eps: float = 1e-6
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [..., D] -> [..., D], in x's dtype."""
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (h * (self.offset + scale)).astype(x.dtype)
    return scale.astype(x.dtype) * h.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()) -> jnp.ndarray:
  """The rotary inverse frequencies [head_dim // 2]: theta^(-2i/head_dim), scaled by `scaling`
  ((key, value) pairs of config.json's rope_scaling): "linear" divides every frequency by
  `factor`; "llama3" divides the low frequencies by `factor`, keeps the high ones and blends
  between (Llama 3.1's `_compute_llama3_parameters`).

  Args:
    head_dim: the rotary dimension.
    theta: the rope base.
    scaling: (key, value) pairs, () for none.
  Returns:
    [head_dim // 2] float32.
  """
  inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  options = dict(scaling)
  kind = options.get("rope_type", options.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r}; supported: {ROPE_TYPES}")
  if kind == "linear":
    return inv / options["factor"]
  if kind == "llama3":
    factor, low, high = options["factor"], options["low_freq_factor"], options["high_freq_factor"]
    old_context = options["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    scaled = jnp.where(wavelength > old_context / low, inv / factor, inv)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return jnp.where(medium, blended, scaled)
  return inv


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, heads, head_dim] by positions [B, T] with the half-split layout of
  transformers' `rotate_half` (dimension i pairs with i + head_dim/2), in float32.

  Args:
    x: [B, T, heads, head_dim].
    positions: [B, T] int.
    inv_freq: [head_dim // 2] (`rope_frequencies`).
  Returns:
    [B, T, heads, head_dim], x's dtype.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  h = x.astype(jnp.float32)
  half = h.shape[-1] // 2
  rotated = jnp.concatenate([-h[..., half:], h[..., :half]], axis=-1)
  return (h * cos + rotated * sin).astype(x.dtype)


def attention_mask_for(
  query_slots: jnp.ndarray,
  key_slots: jnp.ndarray,
  key_mask: jnp.ndarray,
  sliding_window: int | None,
  query_segments: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """bool [B, 1, Tq, S]: query slot i sees key slot j iff j <= i, the key is a real token,
  (with a sliding window w) i - j < w, and (with `query_segments`, packed sequences) the key is
  in the query's segment. query_slots [Tq], key_slots [S], key_mask [B, S].

  Args:
    query_slots: [Tq] cache slots of the queries; key_slots: [S] of the keys.
    key_mask: [B, S] int segment ids of the keys (0 padding, 1, 2, ... the packed sequences;
      {0, 1} or bool for one sequence a row).
    sliding_window: w, or None (full causal attention).
    query_segments: [B, Tq] the queries' segment ids, or None (one sequence a row). A padding
      query (0) sees every real key before it, as without segments.
  Returns:
    bool [B, 1, Tq, S].
  """
  allowed = key_slots[None, :] <= query_slots[:, None]
  if sliding_window:
    allowed &= query_slots[:, None] - key_slots[None, :] < sliding_window
  allowed = allowed[None, None] & (key_mask[:, None, None, :] > 0)
  if query_segments is None:
    return allowed
  same = key_mask[:, None, None, :] == query_segments[:, None, :, None]
  return allowed & (same | (query_segments[:, None, :, None] == 0))


def segment_positions(segments: jnp.ndarray) -> jnp.ndarray:
  """Each token's position in its own sequence: [B, T] int32 of segment ids [B, T] (0 padding;
  1, 2, ... packed sequences, numbered in order along the row). A row holding one sequence
  ({0, 1}, any padding) gets the count of real tokens before each token, so a left-padded
  prompt starts at 0 and padding repeats its neighbour's position (transformers' `generate`).

  Args:
    segments: [B, T] int.
  Returns:
    [B, T] int32.
  """
  segments = segments.astype(jnp.int32)
  real = segments > 0
  count = jnp.cumsum(real, axis=1, dtype=jnp.int32)  # Real tokens up to and including each one.
  seen = jax.lax.cummax(segments, axis=1)
  before = jnp.pad(seen[:, :-1], ((0, 0), (1, 0)))  # The last segment id before each token.
  starts = real & (segments > before)  # A sequence's first token.
  start_count = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)
  return jnp.maximum(count - 1 - start_count, 0)


def attend(
  q: jnp.ndarray,
  k: jnp.ndarray,
  v: jnp.ndarray,
  bias: jnp.ndarray,
  scale: float = 0.0,
  softcap: float = 0.0,
  recompute: bool = False,
) -> jnp.ndarray:
  """Grouped-query attention: q [B, T, H, hd], k and v [B, S, K, hd] (K divides H; query head h
  reads key/value head h // (H / K)), bias float32 [B, 1, T, S] (0 where allowed, the float32
  minimum where not) -> [B, T, H, hd]. Logits and softmax in float32, the weights then in v's
  dtype.

  Heads first, each key/value head repeated for its query group, so both products are
  [B, H, T, hd] x [B, H, hd, S] matmuls (a grouped 5-D einsum made XLA transpose the [T, S]
  logits back and forth), and a hand-written backward (`_attention_core`): XLA's derivative
  of the masked softmax ran twice as slow on the CPU (measured on the embedded decoder).

  Gemma's options: `scale` multiplies the logits instead of 1 / sqrt(hd) (query_pre_attn_scalar
  ** -0.5), and `softcap` c caps them, c tanh(logits / c), before the mask (Gemma 2's
  attn_logit_softcapping); capped attention is differentiated by XLA.

  `recompute`: the backward recomputes the weights from each row's max and sum [B, H, T]
  instead of keeping the weights [B, H, T, S] from the forward (FlashAttention's trade: one
  more q kᵀ product a layer for no [T, S] residual per head). The same outputs; the weights
  are made by the same steps, so the same gradients up to how XLA fuses them (bit for bit in
  `attend` alone on the CPU; a whole text run's metrics within a few 1e-6 relative).

  Args:
    q: [B, T, H, hd]; k, v: [B, S, K, hd].
    bias: float32 [B, 1, T, S].
    scale: the logits' scale (0: 1 / sqrt(hd)).
    softcap: c (0: none).
    recompute: recompute the weights in the backward (with `softcap`, the capped attention
      under `jax.checkpoint`: only its inputs kept).
  Returns:
    [B, T, H, hd].
  """
  groups = q.shape[2] // k.shape[2]
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  keys = jnp.repeat(heads_first(k), groups, axis=1)  # [B, H, S, hd]
  values = jnp.repeat(heads_first(v), groups, axis=1)
  if scale:  # The core divides by sqrt(hd).
    q = (q.astype(jnp.float32) * (scale * math.sqrt(q.shape[-1]))).astype(q.dtype)
  if softcap:
    capped = jax.checkpoint(_capped_attention, static_argnums=(4,)) if recompute else _capped_attention
    return heads_first(capped(heads_first(q), keys, values, bias, softcap))
  core = _attention_core_recomputed if recompute else _attention_core
  return heads_first(core(heads_first(q), keys, values, bias))


def _capped_attention(q, k, v, bias, softcap: float):
  """softmax(c tanh(q kᵀ / (sqrt(hd) c)) + bias) v: [B, H, T, hd] of q [B, H, T, hd], k, v [B, H, S, hd]."""
  logits = (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(softcap * jnp.tanh(logits / softcap) + bias, axis=-1)
  return weights.astype(v.dtype) @ v


def _attention_logits(q, k, bias):
  """q kᵀ / sqrt(hd) + bias: float32 [B, H, T, S] of q [B, H, T, hd], k [B, H, S, hd]."""
  return (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32) / math.sqrt(q.shape[-1]) + bias


def _attention_weights(q, k, bias):
  """softmax(q kᵀ / sqrt(hd) + bias) float32 [B, H, T, S] of q [B, H, T, hd], k [B, H, S, hd]."""
  return jax.nn.softmax(_attention_logits(q, k, bias), axis=-1)


@jax.custom_vjp
def _attention_core(q, k, v, bias):
  """softmax(q kᵀ / sqrt(hd) + bias) v: [B, H, T, hd] of q [B, H, T, hd], k, v [B, H, S, hd]."""
  return _attention_forward(q, k, v, bias)[0]


def _attention_forward(q, k, v, bias):
  weights = _attention_weights(q, k, bias).astype(v.dtype)  # The only [T, S] residual.
  out = weights @ v
  return out, (q, k, v, weights, out)


def _attention_backward(residuals, grad_out):
  """With P the weights, O = P V and dO the output's cotangent: dV = Pᵀ dO; dP = dO Vᵀ;
  dL = P ⊙ (dP - rowsum(dO ⊙ O)) / sqrt(hd) (the softmax's derivative: rowsum(dP ⊙ P) =
  rowsum(dO ⊙ O), a sum over hd rather than over S, as FlashAttention's backward takes it);
  dQ = dL K; dK = dLᵀ Q. The bias (a mask) gets no gradient."""
  q, k, v, weights, out = residuals  # weights [B, H, T, S] in v's dtype.
  row = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, T, 1]
  grad_weights = (grad_out @ jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
  grad_logits = (weights.astype(jnp.float32) * (grad_weights - row) / math.sqrt(q.shape[-1])).astype(q.dtype)
  return (grad_logits @ k, jnp.swapaxes(grad_logits, -1, -2) @ q, jnp.swapaxes(weights, -1, -2) @ grad_out, None)


_attention_core.defvjp(_attention_forward, _attention_backward)


@jax.custom_vjp
def _attention_core_recomputed(q, k, v, bias):
  """`_attention_core` whose backward recomputes the weights: [B, H, T, hd] as it."""
  return _attention_forward(q, k, v, bias)[0]


def _attention_forward_keeping_row_sums(q, k, v, bias):
  """The softmax written out (jax.nn.softmax's steps) to keep each row's max and sum [B, H, T, 1]."""
  logits = _attention_logits(q, k, bias)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_sum = jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True)
  out = _weights_of(logits, row_max, row_sum).astype(v.dtype) @ v
  return out, (q, k, v, bias, out, row_max, row_sum)


def _weights_of(logits, row_max, row_sum):
  """exp(logits - row_max) / row_sum: the softmax's weights [B, H, T, S] from its row statistics
  (a max and a sum, not a log-sum-exp: a row with no allowed key has logits all at the float32
  minimum, where the log-sum-exp rounds to that minimum and exp(logits - it) would be 1)."""
  return jnp.exp(logits - row_max) / row_sum


def _attention_backward_recomputing(residuals, grad_out):
  """`_attention_backward` with the weights made again from q, k and the rows' max and sum."""
  q, k, v, bias, out, row_max, row_sum = residuals
  # The barrier keeps XLA from merging these logits with the forward's (common subexpressions),
  # which would keep the forward's [T, S] alive until here, as jax.checkpoint's own does.
  q, k, bias = jax.lax.optimization_barrier((q, k, bias))
  weights = _weights_of(_attention_logits(q, k, bias), row_max, row_sum).astype(v.dtype)
  return _attention_backward((q, k, v, weights, out), grad_out)


_attention_core_recomputed.defvjp(_attention_forward_keeping_row_sums, _attention_backward_recomputing)


class Attention(nn.Module):
  """Grouped-query self-attention: `num_heads` query heads share `num_kv_heads` key/value heads."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  out_bias: bool = False
  sliding_window: int | None = None
  qk_norm_eps: float = 0.0  # > 0: an RMSNorm of each query and key head (Qwen3, Gemma 3), this epsilon.
  norm_offset: float = 0.0  # Those norms' `RMSNorm.offset`.
  scale: float = 0.0  # The logits' scale (0: 1 / sqrt(head_dim)).
  softcap: float = 0.0  # Gemma 2's attention logit cap (0: none).
  fused: bool = False  # One projection "qkv" [D, (H + 2K) hd], split in that order (Phi-3's qkv_proj).
  recompute: bool = False  # The backward recomputes the [T, S] weights (`attend`'s `recompute`).

  @nn.compact
  def __call__(self, x, positions, inv_freq, query_slots, key_mask, cache=None, query_segments=None):
    """x [B, T, D], positions [B, T]; query_slots [T] (the tokens' slots in the key sequence);
    key_mask [B, S] (the keys' segment ids); cache: this layer's (k, v) [B, S, kv_heads,
    head_dim] or None (S = T); query_segments [B, T] or None (`attention_mask_for`).
    -> ([B, T, D], the updated (k, v) or None)."""
    batch, tokens, width = x.shape
    dense = lambda features, bias, name: nn.Dense(features, use_bias=bias, name=name)
    query_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    if self.fused:
      qkv = dense(query_size + 2 * kv_size, self.qkv_bias, "qkv")(x)
      q, k, v = jnp.split(qkv, [query_size, query_size + kv_size], axis=-1)
    else:
      q = dense(query_size, self.qkv_bias, "query")(x)
      k = dense(kv_size, self.qkv_bias, "key")(x)
      v = dense(kv_size, self.qkv_bias, "value")(x)
    q = q.reshape(batch, tokens, self.num_heads, self.head_dim)
    k = k.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
    if self.qk_norm_eps:  # Over head_dim, one scale shared by the heads, before the rotation.
      q = RMSNorm(self.qk_norm_eps, self.norm_offset, name="query_norm")(q)
      k = RMSNorm(self.qk_norm_eps, self.norm_offset, name="key_norm")(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    v = v.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
    if cache is not None:  # Write this call's keys and values at their slots.
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), query_slots[0], axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), query_slots[0], axis=1)
    key_slots = jnp.arange(k.shape[1])
    mask = attention_mask_for(query_slots, key_slots, key_mask, self.sliding_window, query_segments)  # [B, 1, T, S]
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    attended = attend(q, k.astype(q.dtype), v.astype(x.dtype), bias, self.scale, self.softcap, self.recompute)
    out = dense(width, self.out_bias, "out")(attended.reshape(batch, tokens, self.num_heads * self.head_dim))
    return out, (None if cache is None else (k, v))


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


class SwiGLU(nn.Module):
  """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with "gelu_tanh" (Gemma's
  gelu_pytorch_tanh)."""

  hidden: int
  bias: bool = False
  activation: str = "silu"
  fused: bool = False  # One projection "gate_up" [D, 2 hidden], gate first (Phi-3's gate_up_proj).

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [..., D] -> down(act(gate(x)) * up(x)): [..., D]."""
    if self.fused:
      gate, up = jnp.split(nn.Dense(2 * self.hidden, use_bias=self.bias, name="gate_up")(x), 2, axis=-1)
    else:
      gate = nn.Dense(self.hidden, use_bias=self.bias, name="gate")(x)
      up = nn.Dense(self.hidden, use_bias=self.bias, name="up")(x)
    return nn.Dense(x.shape[-1], use_bias=self.bias, name="down")(ACTIVATIONS[self.activation](gate) * up)


class DecoderBlock(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rms_norm_eps: float
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  qk_norm: bool = False
  norm_offset: float = 0.0
  post_norms: bool = False
  activation: str = "silu"
  attention_scale: float = 0.0
  attention_softcap: float = 0.0
  fused_projections: bool = False
  recompute_attention: bool = False

  @nn.compact
  def __call__(self, x, positions, inv_freq, query_slots, key_mask, cache=None, query_segments=None):
    """x [B, T, D] -> ([B, T, D], updated cache or None); arguments as `Attention`'s. With
    `post_norms` (Gemma 2/3), the attention's and the MLP's outputs are normed too before each
    residual add (norms attn_norm, attn_post_norm, mlp_pre_norm, mlp_post_norm)."""
    norm = lambda name: RMSNorm(self.rms_norm_eps, self.norm_offset, name=name)
    attended, cache = Attention(
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
      self.qkv_bias,
      self.out_bias,
      self.sliding_window,
      self.rms_norm_eps if self.qk_norm else 0.0,
      self.norm_offset,
      self.attention_scale,
      self.attention_softcap,
      self.fused_projections,
      self.recompute_attention,
      name="attn",
    )(norm("attn_norm")(x), positions, inv_freq, query_slots, key_mask, cache, query_segments)
    mlp = SwiGLU(self.mlp_dim, self.mlp_bias, self.activation, self.fused_projections, name="mlp")
    if not self.post_norms:
      x = x + attended
      return x + mlp(norm("mlp_norm")(x)), cache
    x = x + norm("attn_post_norm")(attended)
    return x + norm("mlp_post_norm")(mlp(norm("mlp_pre_norm")(x))), cache


class DecoderLM(nn.Module):
  """A Llama-family causal language model.

  Attributes:
    vocab_size: the token table's rows.
    width: the hidden size D (4096 for Llama-2-7B).
    depth: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention; 0: num_heads).
    head_dim: per-head width (0: width // num_heads).
    mlp_dim: the SwiGLU hidden width.
    rms_norm_eps: every RMSNorm's epsilon.
    rope_theta: the rotary base.
    rope_scaling: config.json's rope_scaling as sorted (key, value) pairs; () for none.
    tie_embeddings: the LM head is the embedding table (logits = h @ embedᵀ).
    qkv_bias: biases on query/key/value (Qwen2).
    out_bias: a bias on the attention output (Llama's attention_bias sets both).
    mlp_bias: biases in the MLP (Llama's mlp_bias).
    sliding_window: each token attends to at most this many tokens (itself included; Mistral);
      None: all before it.
    qk_norm: an RMSNorm (`rms_norm_eps`) of each query and key head over head_dim before the
      rotation, one scale [head_dim] shared by the heads (Qwen3, Gemma 3).
    sliding_layers: per block, 1 if it attends within `sliding_window`, 0 if to every token
      before it (Gemma 2: (1, 0, 1, 0, ...); Gemma 3: five of six); (): every block alike.
    local_rope_theta: the rotary base of the sliding blocks, unscaled (Gemma 3's
      rope_local_base_freq); 0: `rope_theta` and `rope_scaling` everywhere.
    norm_offset: every RMSNorm multiplies by (offset + scale) (Gemma: 1, scales stored as
      differences from 1).
    post_norms: Gemma 2/3's norms of the attention's and the MLP's outputs.
    activation: the gated MLP's, "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU).
    embed_scale: the embeddings are multiplied by sqrt(width) (Gemma; the tied head is not).
    query_pre_attn_scalar: attention logits scaled by its -1/2 power instead of head_dim's
      (Gemma); 0: head_dim.
    attention_softcap: attention logits capped to c tanh(logits / c) (Gemma 2); 0: none.
    final_softcap: the output logits capped likewise (Gemma 2); 0: none.
    fused_projections: query, key and value as one projection `attn/qkv` and the MLP's gate and
      up as one `mlp/gate_up` (Phi-3's qkv_proj and gate_up_proj, which PEFT adapts whole).
    remat: recompute each block's activations in the backward pass (less memory).
    recompute_attention: the backward recomputes each layer's attention weights from the
      rows' saved max and sum [B, H, T] instead of keeping the [B, H, T, S] weights (`attend`'s
      `recompute`: one more q kᵀ product a layer for less memory; the same outputs, the same
      gradients up to rounding).
    dtype: the activations' dtype (e.g. bfloat16 with bfloat16 weights); logits are float32.
  """

  vocab_size: int = 256
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 172
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()
  tie_embeddings: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  qk_norm: bool = False
  sliding_layers: tuple = ()
  local_rope_theta: float = 0.0
  norm_offset: float = 0.0
  post_norms: bool = False
  activation: str = "silu"
  embed_scale: bool = False
  query_pre_attn_scalar: float = 0.0
  attention_softcap: float = 0.0
  final_softcap: float = 0.0
  fused_projections: bool = False
  remat: bool = False
  recompute_attention: bool = False
  dtype: Any = jnp.float32

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_width(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
    """An empty cache for `batch` sequences of up to `length` tokens (prompt + generated).

    Args:
      batch: sequences.
      length: slots per sequence.
      dtype: the cache's dtype (None: the model's).
    Returns:
      A `Cache` of zeros.
    """
    shape = (self.depth, batch, length, self.kv_heads, self.head_width)
    return {
      "k": jnp.zeros(shape, dtype or self.dtype),
      "v": jnp.zeros(shape, dtype or self.dtype),
      "mask": jnp.zeros((batch, length), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
    }

  @nn.compact
  def __call__(
    self,
    input_ids: jnp.ndarray,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    cache: Cache | None = None,
    return_hidden: bool = False,
  ):
    """input_ids int [B, T] -> logits float32 [B, T, vocab] (`return_hidden`: the final
    RMSNorm's output [B, T, D] instead).

    attention_mask [B, T]: 1 for real tokens (default all), or the segment ids of packed
    sequences (0 padding, 1, 2, ... in order along the row; `text.pack_examples`): a token then
    attends only within its own sequence. positions [B, T]: default each token's position in its
    sequence (`segment_positions`: the count of real tokens before it in one sequence a row; with
    a cache: continuing from the cached ones). With `cache`
    (`init_cache`), the tokens go at slots cache["index"]... and attend to every cached real
    token; returns (logits, the updated cache).
    """
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}")
    batch, tokens = input_ids.shape
    mask = jnp.ones((batch, tokens), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    offset: jax.Array | int
    if cache is None:
      query_slots, key_mask, offset = jnp.arange(tokens), mask, 0
    else:
      query_slots = cache["index"] + jnp.arange(tokens)
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, cache["index"], axis=1)
      offset = jnp.sum(cache["mask"], axis=1, keepdims=True)
    if positions is None:
      positions = offset + segment_positions(mask)
    if self.sliding_layers and len(self.sliding_layers) != self.depth:
      raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for depth={self.depth}")
    embed = nn.Embed(self.vocab_size, self.width, name="embed")
    x = embed(input_ids).astype(self.dtype)
    if self.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.width), self.dtype)
    global_freq = rope_frequencies(self.head_width, self.rope_theta, self.rope_scaling)
    local_freq = rope_frequencies(self.head_width, self.local_rope_theta) if self.local_rope_theta else global_freq
    block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
    new_k, new_v = [], []
    for i in range(self.depth):
      sliding = bool(self.sliding_layers[i]) if self.sliding_layers else self.sliding_window is not None
      layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
      x, layer_cache = block(
        self.num_heads,
        self.kv_heads,
        self.head_width,
        self.mlp_dim,
        self.rms_norm_eps,
        self.qkv_bias,
        self.out_bias,
        self.mlp_bias,
        self.sliding_window if sliding else None,
        self.qk_norm,
        self.norm_offset,
        self.post_norms,
        self.activation,
        self.query_pre_attn_scalar**-0.5 if self.query_pre_attn_scalar else 0.0,
        self.attention_softcap,
        self.fused_projections,
        self.recompute_attention,
        name=f"block_{i}",
      )(x, positions, local_freq if sliding else global_freq, query_slots, key_mask, layer_cache, mask)
      if layer_cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    hidden = RMSNorm(self.rms_norm_eps, self.norm_offset, name="norm")(x)
    if return_hidden:
      out = hidden
    elif self.tie_embeddings:
      out = embed.attend(hidden.astype(jnp.float32)).astype(jnp.float32)
    else:
      out = nn.Dense(self.vocab_size, use_bias=False, name="lm_head")(hidden).astype(jnp.float32)
    if self.final_softcap and not return_hidden:
      out = self.final_softcap * jnp.tanh(out / self.final_softcap)
    if cache is None:
      return out
    return out, {"k": jnp.stack(new_k), "v": jnp.stack(new_v), "mask": key_mask, "index": cache["index"] + tokens}


def generate(
  apply_fn: Callable[..., Any],
  model: DecoderLM,
  prompt_ids: jnp.ndarray,
  prompt_mask: jnp.ndarray,
  max_new_tokens: int,
  eos_id: int | None = None,
  pad_id: int = 0,
) -> jnp.ndarray:
  """Greedy decoding with a key/value cache.

  Args:
    apply_fn: (input_ids, attention_mask, cache) -> (logits, cache): the model applied to its
      variables, e.g. `lambda *a: model.apply(variables, *a)` or, with a LoRA adapter,
      `lambda *a: lora.apply(model, variables, adapter, *a, scale=s)`.
    prompt_ids: int [B, P], left-padded (each prompt's tokens at the end).
    prompt_mask: [B, P], 1 for the prompts' tokens.
    max_new_tokens: N, the tokens generated per prompt.
    eos_id: after a sequence emits it, the rest of its tokens are `pad_id`.

  Returns:
    int32 [B, N]: the generated tokens (as transformers' `generate(do_sample=False)`).
  """
  batch, length = prompt_ids.shape
  cache = model.init_cache(batch, length + max_new_tokens)
  logits, cache = apply_fn(prompt_ids, prompt_mask, cache)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token, done, cache = carry
    logits, cache = apply_fn(token[:, None], jnp.ones((batch, 1), jnp.int32), cache)
    emitted = jnp.where(done, pad_id, token)
    done = done | (token == eos_id) if eos_id is not None else done
    return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), done, cache), emitted

  (last, done, _), tokens = jax.lax.scan(
    step, (first, jnp.zeros((batch,), bool), cache), None, length=max_new_tokens - 1
  )
  return jnp.concatenate([tokens, jnp.where(done, pad_id, last)[None]], axis=0).T
