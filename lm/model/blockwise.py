"""Memory-efficient attention: an online softmax over blocks of keys, in plain JAX.

Rabe & Staats (2021) showed that attention needs no [T, S] weight matrix: keys can be taken a
block of C at a time while a running maximum, a running sum and a running weighted sum of values
are carried along (the schedule FlashAttention fuses into one GPU kernel). Only [.., T, C] logits
exist at a time, and under `jax.checkpoint` the backward pass recomputes them block by block, so
memory grows with T x C instead of T x S. Ring attention (ring.py) folds in the key chunks
that arrive from other devices with the same `fold`.

Masks and position biases are functions of key positions, built per block, for the same reason.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_MASKED = jnp.finfo(jnp.float32).min  # as in attention_probs, so fully masked rows agree


class Partial(NamedTuple):
  """The softmax over the key blocks seen so far, not yet normalised."""

  max_BxKxGxT: jax.Array  # float32 running maximum of the logits
  sum_BxKxGxT: jax.Array  # float32 running sum of exp(logit - max)
  out_BxTxKxGxH: jax.Array  # float32 running sum of exp(logit - max) * value


def init(q_BxTxKxGxH: jax.Array) -> Partial:
  batch, q_len, num_kv_heads, groups, head_dim = q_BxTxKxGxH.shape
  stats = (batch, num_kv_heads, groups, q_len)
  return Partial(jnp.full(stats, _MASKED, jnp.float32), jnp.zeros(stats, jnp.float32),
                 jnp.zeros(q_BxTxKxGxH.shape, jnp.float32))


def attend(partial: Partial, q_BxTxKxGxH: jax.Array, k_BxCxKxH: jax.Array, v_BxCxKxH: jax.Array,
           mask_BxTxC: jax.Array, bias_BxNxTxC: jax.Array | None = None,
           softcap: float = 0.0) -> Partial:
  """Folds one block of C keys into the running softmax (logits as attention_probs computes
  them, up to the order of the float32 sums)."""
  head_dim = q_BxTxKxGxH.shape[-1]
  logits_BxKxGxTxC = jnp.einsum('BTKGH,BCKH->BKGTC', q_BxTxKxGxH, k_BxCxKxH,
                                preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  if softcap > 0:
    logits_BxKxGxTxC = softcap * jnp.tanh(logits_BxKxGxTxC / softcap)
  if bias_BxNxTxC is not None:
    logits_BxKxGxTxC += bias_BxNxTxC.astype(jnp.float32).reshape(logits_BxKxGxTxC.shape)
  logits_BxKxGxTxC = jnp.where(mask_BxTxC[:, None, None], logits_BxKxGxTxC, _MASKED)
  max_BxKxGxT = jnp.maximum(partial.max_BxKxGxT, logits_BxKxGxTxC.max(axis=-1))
  rescale_BxKxGxT = jnp.exp(partial.max_BxKxGxT - max_BxKxGxT)
  weights_BxKxGxTxC = jnp.exp(logits_BxKxGxTxC - max_BxKxGxT[..., None])
  sum_BxKxGxT = partial.sum_BxKxGxT * rescale_BxKxGxT + weights_BxKxGxTxC.sum(axis=-1)
  out_BxTxKxGxH = jnp.einsum('BKGTC,BCKH->BTKGH', weights_BxKxGxTxC.astype(v_BxCxKxH.dtype),
                             v_BxCxKxH, preferred_element_type=jnp.float32)
  rescale_BxTxKxGx1 = rescale_BxKxGxT.transpose(0, 3, 1, 2)[..., None]
  return Partial(max_BxKxGxT, sum_BxKxGxT, partial.out_BxTxKxGxH * rescale_BxTxKxGx1
                 + out_BxTxKxGxH)


def finish(partial: Partial) -> jax.Array:
  """The attention output [B, T, K, G, H] in float32."""
  return partial.out_BxTxKxGxH / partial.sum_BxKxGxT.transpose(0, 3, 1, 2)[..., None]


def group_heads(q_BxTxNxH: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, K, G, H]: the queries that share each KV head side by side."""
  batch, q_len, num_heads, head_dim = q_BxTxNxH.shape
  return q_BxTxNxH.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)


MaskFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (pos_BxC, seg_BxC, order_C)
BiasFn = Callable[[jax.Array], jax.Array]  # k_positions_BxC -> [B, N, T, C]


def fold(partial: Partial, q_BxTxKxGxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
         k_positions_BxS: jax.Array, k_segment_ids_BxS: jax.Array, k_order_S: jax.Array,
         mask_fn: MaskFn, bias_fn: BiasFn | None, block: int,
         softcap: float = 0.0) -> Partial:
  """Folds S keys into `partial`, scanning blocks of `block` keys (0: all S in one block).

  `mask_fn` and `bias_fn` see one block's key positions, segment ids and order; keys padded on
  to fill the last block are given an order no query reaches, so masks hide them.
  """
  batch, k_len = k_BxSxKxH.shape[:2]
  block = min(block or k_len, k_len)
  blocks = -(-k_len // block)
  pad = blocks * block - k_len

  def split(x, fill):  # [B, S, ...] -> [blocks, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(batch, blocks, block, *x.shape[2:]), 1, 0)

  xs = (split(k_BxSxKxH, 0), split(v_BxSxKxH, 0), split(k_positions_BxS, 0),
        split(k_segment_ids_BxS, -1),
        jnp.pad(k_order_S, (0, pad), constant_values=jnp.iinfo(jnp.int32).max).reshape(
            blocks, block))

  @jax.checkpoint  # the backward pass recomputes each block's weights instead of storing them
  def step(partial, x):
    k_BxCxKxH, v_BxCxKxH, positions_BxC, segment_ids_BxC, order_C = x
    bias = None if bias_fn is None else bias_fn(positions_BxC)
    return attend(partial, q_BxTxKxGxH, k_BxCxKxH, v_BxCxKxH,
                  mask_fn(positions_BxC, segment_ids_BxC, order_C), bias, softcap), None

  partial, _ = lax.scan(step, partial, xs)
  return partial


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
              k_positions_BxS: jax.Array, k_segment_ids_BxS: jax.Array, k_order_S: jax.Array,
              mask_fn: MaskFn, bias_fn: BiasFn | None, block: int,
              softcap: float = 0.0) -> jax.Array:
  """Attention output [B, T, N, H] (q's dtype), scanning key blocks of `block` keys."""
  q_BxTxKxGxH = group_heads(q_BxTxNxH, k_BxSxKxH.shape[2])
  partial = fold(init(q_BxTxKxGxH), q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, k_positions_BxS,
                 k_segment_ids_BxS, k_order_S, mask_fn, bias_fn, block, softcap)
  return finish(partial).reshape(q_BxTxNxH.shape).astype(q_BxTxNxH.dtype)
