"""Causal self-attention: MHA, GQA and MQA in one module, with a KV cache for decoding.

The number of KV heads K picks the variant (K = N: MHA, 1 < K < N: GQA, K = 1: MQA). Queries
are grouped as [B, T, K, G, H] so that shared keys and values are never repeated in memory.
Every mask (causal, document, sliding window, cache fill) is one boolean [B, T, S] array built
from positions, so packed documents with restarted positions and decoding over a cache use the
same code as training. The pure helpers are jitted for the same reason as in positions.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lm.config import ModelConfig
from lm.model import blockwise
from lm.model import lora as lora_lib
from lm.model import matmul
from lm.model import positions as pos_lib
from lm.model import ring


@functools.partial(jax.jit, static_argnames=('window', 'stride', 'summary'))
def attention_mask(q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                   q_segment_ids_BxT: jax.Array, k_segment_ids_BxS: jax.Array,
                   q_index_T: jax.Array, k_index_S: jax.Array,
                   window: int = 0, stride: int = 0, summary: int = 1) -> jax.Array:
  """Which keys each query may see, [B, T, S] bool.

  Causality is checked twice: by positions (packed documents restart them) and by index order
  (so that restarted positions never let a token see a later slot). Segment ids separate
  documents and padding; `window` > 0 limits the span to the last `window` positions.
  `stride` > 0 is the Sparse Transformer's fixed pattern (Child et al., 2019): a query sees its
  own block of `stride` positions and the last `summary` positions of every earlier block.
  """
  q_pos_BxTx1 = q_positions_BxT[:, :, None]
  k_pos_Bx1xS = k_positions_BxS[:, None, :]
  mask_BxTxS = k_pos_Bx1xS <= q_pos_BxTx1
  mask_BxTxS &= (k_index_S[None, :] <= q_index_T[:, None])[None]
  mask_BxTxS &= k_segment_ids_BxS[:, None, :] == q_segment_ids_BxT[:, :, None]
  if window > 0:
    mask_BxTxS &= q_pos_BxTx1 - k_pos_Bx1xS < window
  if stride > 0:
    same_block_BxTxS = q_pos_BxTx1 // stride == k_pos_Bx1xS // stride
    mask_BxTxS &= same_block_BxTxS | (k_pos_Bx1xS % stride >= stride - summary)
  return mask_BxTxS


def mask_options(config: ModelConfig) -> dict[str, int]:
  """attention_mask's static arguments for a model's attention pattern."""
  fixed = config.attention_pattern == 'fixed'
  return dict(window=config.attention_window, stride=config.attention_stride if fixed else 0,
              summary=config.attention_summary)


@functools.partial(jax.jit, static_argnames=('num_buckets', 'max_distance'))
def relative_bias(q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                  table_bucketsxN: jax.Array, num_buckets: int,
                  max_distance: int) -> jax.Array:
  """T5's learned bias [B, N, T, S] (float32): one value per head and distance bucket."""
  relative_BxTxS = k_positions_BxS[:, None, :] - q_positions_BxT[:, :, None]
  bucket_BxTxS = pos_lib.relative_bucket(relative_BxTxS, num_buckets, max_distance)
  bias_BxTxSxN = jnp.take(table_bucketsxN.astype(jnp.float32), bucket_BxTxS, axis=0)
  return bias_BxTxSxN.transpose(0, 3, 1, 2)


@functools.partial(jax.jit, static_argnames='softcap')
def attention_probs(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, mask_BxTxS: jax.Array,
                    bias_BxNxTxS: jax.Array | None = None,
                    softcap: float = 0.0) -> jax.Array:
  """Softmax weights [B, K, G, T, S] in float32: the einsum reference for all variants.

  The soft cap squashes only the content logits q.k; position biases are added after it so that
  ALiBi's linear distance penalty is not saturated.
  """
  batch, q_len, num_heads, head_dim = q_BxTxNxH.shape
  num_kv_heads = k_BxSxKxH.shape[2]
  groups = num_heads // num_kv_heads
  # One [G*T, H] x [H, S] matmul per batch row and KV head (the G query heads sharing that head
  # stacked), both operands laid out as a plain matmul reads them: XLA:CPU then needs neither
  # a 5-D batched matmul nor copies of the logits for the backward pass (BENCHMARKS.md).
  q_BxKxMxH = q_BxTxNxH.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(
      0, 2, 3, 1, 4).reshape(batch, num_kv_heads, groups * q_len, head_dim)
  logits_BxKxMxS = jnp.einsum('BKMH,BKHS->BKMS', q_BxKxMxH, k_BxSxKxH.transpose(0, 2, 3, 1),
                              preferred_element_type=jnp.float32)
  logits_BxKxGxTxS = logits_BxKxMxS.reshape(batch, num_kv_heads, groups, q_len, -1)
  logits_BxKxGxTxS *= 1.0 / math.sqrt(head_dim)
  if softcap > 0:
    logits_BxKxGxTxS = softcap * jnp.tanh(logits_BxKxGxTxS / softcap)
  if bias_BxNxTxS is not None:
    logits_BxKxGxTxS += bias_BxNxTxS.astype(jnp.float32).reshape(logits_BxKxGxTxS.shape)
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS,
                               jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BxKxGxTxS, axis=-1)


def attend_values(probs_BxKxGxTxS: jax.Array, v_BxSxKxH: jax.Array) -> jax.Array:
  """The attention output [B, T, N, H]: each query's probability-weighted values, in the
  layout of attention_probs' matmul."""
  batch, num_kv_heads, groups, q_len, k_len = probs_BxKxGxTxS.shape
  probs_BxKxMxS = probs_BxKxGxTxS.reshape(batch, num_kv_heads, groups * q_len, k_len)
  y_BxKxMxH = jnp.einsum('BKMS,BKSH->BKMH', probs_BxKxMxS, v_BxSxKxH.transpose(0, 2, 1, 3))
  return y_BxKxMxH.reshape(batch, num_kv_heads, groups, q_len, -1).transpose(
      0, 3, 1, 2, 4).reshape(batch, q_len, num_kv_heads * groups, -1)


def _implementation(config: ModelConfig) -> str | None:
  """jax.nn.dot_product_attention's backend: cuDNN if asked for (GPU only), else JAX picks."""
  if config.attention_impl != 'cudnn':
    return None
  if jax.default_backend() != 'gpu':
    raise ValueError(
        f"model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on "
        f"{jax.default_backend()!r}. Use attention_impl='dot_product_attention' (cuDNN where it "
        "applies, XLA elsewhere) or 'xla'.")
  return 'cudnn'


class _FlatSafePartitioned(nn.LogicallyPartitioned):
  """A logically partitioned DenseGeneral kernel.

  DenseGeneral initialises its kernel flattened to 2-D and unboxes it before reshaping, and
  flax checks every parameter's shape by running its init in each apply. Under logical axis
  rules (a mesh step) unboxing constrains the value to its names, which the flat kernel has
  too few axes for; that intermediate is left unconstrained.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _partitioned(init: nn.initializers.Initializer, names: tuple[str, ...]):
  return lambda *args: _FlatSafePartitioned(init(*args), names)


class Attention(nn.Module):
  """Multi-head causal self-attention with N query heads over K shared KV heads."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array | None = None, *, deterministic: bool = True,
               decode: bool = False) -> jax.Array:
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    num_heads, num_kv_heads, head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    batch, q_len, _ = x_BxTxD.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.zeros((batch, q_len), jnp.int32)
    positions_BxT = positions_BxT.astype(jnp.int32)
    segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)

    dense = functools.partial(
        nn.DenseGeneral, use_bias=c.use_bias, dtype=dtype, param_dtype=param_dtype,
        dot_general=matmul.projection_dot_general(c.matmul_precision))
    normal = nn.initializers.normal(c.init_std)
    q_BxTxNxH = lora_lib.adapt(c, 'q', dense(
        features=(num_heads, head_dim),
        kernel_init=_partitioned(normal, ('embed', 'heads', 'head_dim')),
        bias_init=_partitioned(nn.initializers.zeros, ('heads', 'head_dim')),
        name='query'))(x_BxTxD, deterministic)
    kv_dense = functools.partial(
        dense, features=(num_kv_heads, head_dim),
        kernel_init=_partitioned(normal, ('embed', 'kv_heads', 'head_dim')),
        bias_init=_partitioned(nn.initializers.zeros, ('kv_heads', 'head_dim')))
    k_BxTxKxH = lora_lib.adapt(c, 'k', kv_dense(name='key'))(x_BxTxD, deterministic)
    v_BxTxKxH = lora_lib.adapt(c, 'v', kv_dense(name='value'))(x_BxTxD, deterministic)

    if c.qk_norm:
      qk_norm = functools.partial(
          nn.RMSNorm, epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype,
          scale_init=_partitioned(nn.initializers.ones, ('head_dim',)))
      q_BxTxNxH = qk_norm(name='query_norm')(q_BxTxNxH)
      k_BxTxKxH = qk_norm(name='key_norm')(k_BxTxKxH)
    if c.pos_emb == 'rope':
      inv_freq_R = pos_lib.rope_frequencies(c)
      q_BxTxNxH = pos_lib.apply_rope(q_BxTxNxH, positions_BxT, inv_freq_R)
      k_BxTxKxH = pos_lib.apply_rope(k_BxTxKxH, positions_BxT, inv_freq_R)

    if not decode and not self.is_initializing() and ring.context_shards() > 1:
      # Context parallelism: T is split over the mesh's 'context' axis. Decoding (KV cache)
      # and init (parameters only) attend as on one device.
      y_BxTxNxH = ring.attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT,
          functools.partial(attention_mask, **mask_options(c)), *self._position_bias(),
          c.attention_block if c.attention_impl == 'blockwise' else 0, c.attn_logit_softcap)
      return self._out(y_BxTxNxH, deterministic)

    # Keys: this call's tokens, or (decoding) every slot of the cache they were written into.
    q_index_T = jnp.arange(q_len, dtype=jnp.int32)
    k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
    k_positions_BxS, k_segment_ids_BxS, k_index_S = positions_BxT, segment_ids_BxT, q_index_T
    if decode and (cached := self._update_cache(
        k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT)) is not None:
      k_BxSxKxH, v_BxSxKxH, k_positions_BxS, k_segment_ids_BxS, k_index_S, q_index_T = cached

    mask_fn = functools.partial(attention_mask, positions_BxT, q_segment_ids_BxT=segment_ids_BxT,
                                q_index_T=q_index_T, **mask_options(c))
    position_bias, bias_arrays = self._position_bias()
    bias_fn = None if position_bias is None else (
        lambda k_positions_BxS: position_bias(positions_BxT, k_positions_BxS, *bias_arrays))

    use_dropout = c.attn_dropout > 0 and not deterministic
    if c.attention_impl == 'blockwise':
      y_BxTxNxH = blockwise.attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, k_positions_BxS, k_segment_ids_BxS, k_index_S,
          lambda pos, seg, order: mask_fn(k_positions_BxS=pos, k_segment_ids_BxS=seg,
                                          k_index_S=order),
          bias_fn, c.attention_block, c.attn_logit_softcap)
      return self._out(y_BxTxNxH, deterministic)
    mask_BxTxS = mask_fn(k_positions_BxS=k_positions_BxS, k_segment_ids_BxS=k_segment_ids_BxS,
                         k_index_S=k_index_S)
    bias_BxNxTxS = None if bias_fn is None else bias_fn(k_positions_BxS)
    # jax.nn.dot_product_attention has neither a logit soft cap nor dropout on the weights;
    # those configurations take the einsum path below.
    if c.attention_impl in ('dot_product_attention', 'cudnn') and not c.attn_logit_softcap and (
        not use_dropout):
      y_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype), v_BxSxKxH.astype(q_BxTxNxH.dtype),
          bias=bias_BxNxTxS, mask=mask_BxTxS[:, None], implementation=_implementation(c))
    else:
      probs_BxKxGxTxS = attention_probs(q_BxTxNxH, k_BxSxKxH, mask_BxTxS, bias_BxNxTxS,
                                        c.attn_logit_softcap)
      # Opt-in hook for attention maps (inspect mode): apply(..., mutable=['attention_weights']).
      # Skipped at init, where every collection is mutable, to keep it out of the variables.
      if not self.is_initializing():
        self.sow('attention_weights', 'probs',
                 probs_BxKxGxTxS.reshape(batch, num_heads, q_len, -1))
      probs_BxKxGxTxS = nn.Dropout(rate=c.attn_dropout)(
          probs_BxKxGxTxS, deterministic=not use_dropout)
      y_BxTxNxH = attend_values(probs_BxKxGxTxS.astype(dtype), v_BxSxKxH.astype(dtype))
    return self._out(y_BxTxNxH, deterministic)

  def _out(self, y_BxTxNxH: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    out_std = c.init_std / math.sqrt(2 * c.num_layers)  # GPT-2: residual projections
    return lora_lib.adapt(c, 'o', nn.DenseGeneral(
        features=c.d_model, axis=(-2, -1), use_bias=c.use_bias, dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
        dot_general=matmul.projection_dot_general(c.matmul_precision),
        kernel_init=_partitioned(nn.initializers.normal(out_std),
                                 ('heads', 'head_dim', 'embed')),
        bias_init=_partitioned(nn.initializers.zeros, ('embed',)),
        name='out'))(y_BxTxNxH, deterministic)

  def _position_bias(self):
    """ALiBi's or T5's bias as a pure function (q_positions_BxT, k_positions_BxS, *arrays) ->
    [B, N, T, S] float32 of actual positions, so it can be built per key block, and the arrays
    it takes (explicit, for ring attention's shard_map); (None, ()) for other schemes."""
    c = self.config
    if c.pos_emb == 'alibi':
      return pos_lib.alibi_bias, (pos_lib.alibi_slopes(c.num_heads),)
    if c.pos_emb == 'relative':
      table_bucketsxN = self.param(
          'relative_bias',
          _partitioned(nn.initializers.normal(c.init_std), ('relative_buckets', 'heads')),
          (c.relative_num_buckets, c.num_heads), jnp.dtype(c.param_dtype))
      return functools.partial(relative_bias, num_buckets=c.relative_num_buckets,
                               max_distance=c.relative_max_distance), (table_bucketsxN,)
    return None, ()

  def _update_cache(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, positions_BxT: jax.Array,
                    segment_ids_BxT: jax.Array):
    """Writes this call's keys into the cache and returns the keys to attend over.

    The first call (`init(..., decode=True)` on [B, L] inputs) only creates zeroed buffers of
    length L and returns None: that call attends over its own inputs. Later calls return (keys,
    values, positions, segment ids, key order [S], query order [T]); a key is visible to a
    query only if it comes no later in that order (besides the position masks). Positions and
    segment ids are cached so that masks and position biases over the cache equal those of a
    full forward pass; pass segment ids on every decode call or on none.

    Full attention: slot i holds token i, so L bounds the tokens decoded (callers must stop
    there; dynamic_update_slice clamps, it does not check). Sliding window: the cache rolls,
    token t going to slot t mod L, so L >= model.attention_window tokens of cache decode any
    number of tokens (flax lm1b style otherwise).
    """
    initialized = self.has_variable('cache', 'cached_key')
    batch, q_len = positions_BxT.shape
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_BxTxKxH.shape,
                               k_BxTxKxH.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_BxTxKxH.shape,
                                 v_BxTxKxH.dtype)
    cached_positions = self.variable('cache', 'cached_positions', jnp.zeros, (batch, q_len),
                                     jnp.int32)
    cached_segment_ids = self.variable('cache', 'cached_segment_ids', jnp.zeros,
                                       (batch, q_len), jnp.int32)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None
    buffers = (cached_key, cached_value, cached_positions, cached_segment_ids)
    new = (k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT)
    start = cache_index.value
    cache_index.value = start + q_len
    if self.config.attention_window:
      return self._roll(buffers, new, start)
    for buffer, value in zip(buffers, new):
      buffer.value = lax.dynamic_update_slice(
          buffer.value, value.astype(buffer.value.dtype), (0, start) + (0,) * (value.ndim - 2))
    cache_len = cached_key.value.shape[1]
    return (*(buffer.value for buffer in buffers), jnp.arange(cache_len, dtype=jnp.int32),
            start + jnp.arange(q_len, dtype=jnp.int32))

  @staticmethod
  def _roll(buffers, new, start: jax.Array):
    """Rolling cache: attend over the cache as it was plus this call's tokens, then keep the
    last L tokens. Cached tokens all precede the new ones; slots never written are hidden."""
    cache_len, q_len = buffers[0].value.shape[1], new[0].shape[1]
    slot_L = jnp.arange(cache_len, dtype=jnp.int32)
    order_S = jnp.concatenate([
        jnp.where(slot_L < start, -1, jnp.iinfo(jnp.int32).max),  # -1: before every query
        jnp.arange(q_len, dtype=jnp.int32)])
    keys = tuple(jnp.concatenate([buffer.value, value.astype(buffer.value.dtype)], axis=1)
                 for buffer, value in zip(buffers, new))
    kept = min(q_len, cache_len)  # a prompt longer than the cache leaves only its tail
    slots_M = (start + q_len - kept + jnp.arange(kept, dtype=jnp.int32)) % cache_len
    for buffer, value in zip(buffers, new):
      buffer.value = buffer.value.at[:, slots_M].set(value[:, q_len - kept:].astype(
          buffer.value.dtype))
    return (*keys, order_S, jnp.arange(q_len, dtype=jnp.int32))
