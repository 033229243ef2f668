"""Position encodings as pure functions: sinusoidal, RoPE (+ scaling), ALiBi, T5 buckets.

Nothing here owns parameters. The learned tables (absolute positions, T5 relative bias) live in
the modules that use them; this file holds the arithmetic they share, so that each rule can be
tested against its paper on its own. The array functions are jitted: called eagerly (tests,
notebooks) each compiles once per shape rather than op by op; inside a jitted model they inline.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Absolute: sinusoidal (Vaswani et al., 2017).


@functools.partial(jax.jit, static_argnames='d_model')
def sinusoidal(positions_BxT: jax.Array, d_model: int) -> jax.Array:
  """Fixed encodings: sin(p / 10000^(2i/D)) at dim 2i, cos(...) at dim 2i+1 (float32)."""
  half = (d_model + 1) // 2
  inv_freq_I = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / d_model))
  angles_BxTxI = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_I
  x_BxTxIx2 = jnp.stack([jnp.sin(angles_BxTxI), jnp.cos(angles_BxTxI)], axis=-1)
  x_BxTxD = x_BxTxIx2.reshape(*positions_BxT.shape, 2 * half)
  return x_BxTxD[..., :d_model]


# ---------------------------------------------------------------------------------------------
# RoPE (Su et al., 2021), "rotate half" layout as in HF Llama / GPT-NeoX.


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [R] (R = rope_dim / 2) after `rope_scaling`, float32.

  Computed in float32 numpy in the order HF transformers uses, so imported checkpoints see the
  very same angles. A static constant: it depends on the config only.
  """
  dim = config.rope_dim
  exponents_R = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv_freq_R = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents_R)).astype(
      np.float32)
  factor = np.float32(config.rope_scaling_factor)
  if config.rope_scaling == 'none':
    return inv_freq_R
  if config.rope_scaling == 'ntk':
    return (np.float32(1.0) / (ntk_theta(config) ** exponents_R)).astype(np.float32)
  if config.rope_scaling == 'linear':
    # Position interpolation (Chen et al., 2023): angle(p) = p / factor * inv_freq.
    return (inv_freq_R / factor).astype(np.float32)
  if config.rope_scaling == 'llama3':
    return _llama3_scaling(inv_freq_R, factor, np.float32(config.rope_low_freq_factor),
                           np.float32(config.rope_high_freq_factor),
                           np.float32(config.rope_original_max_seq_len))
  raise ValueError(f'model.rope_scaling: unknown {config.rope_scaling!r}. '
                   'Use none, linear, ntk or llama3.')


def ntk_theta(config: ModelConfig) -> np.float32:
  """NTK-aware scaling's base (bloc97, 2023): theta * factor^(d / (d - 2)).

  The larger base slows the lowest frequency by exactly `factor` while the highest stays put,
  so nearby positions stay as distinguishable as in training.
  """
  dim = config.rope_dim
  return np.float32(config.rope_theta) * np.float32(config.rope_scaling_factor) ** np.float32(
      dim / (dim - 2))


def _llama3_scaling(inv_freq_R: np.ndarray, factor: np.float32, low: np.float32,
                    high: np.float32, original_len: np.float32) -> np.ndarray:
  """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
  wavelen_R = np.float32(2 * math.pi) / inv_freq_R
  low_freq_wavelen = original_len / low
  high_freq_wavelen = original_len / high
  slowed_R = np.where(wavelen_R > low_freq_wavelen, inv_freq_R / factor, inv_freq_R)
  smooth_R = (original_len / wavelen_R - low) / (high - low)
  blended_R = (1 - smooth_R) * slowed_R / factor + smooth_R * slowed_R
  is_medium_R = (wavelen_R >= high_freq_wavelen) & (wavelen_R <= low_freq_wavelen)
  return np.where(is_medium_R, blended_R, slowed_R).astype(np.float32)


@jax.jit
def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array,
               inv_freq_R: jax.Array | np.ndarray) -> jax.Array:
  """Rotates the first 2R dims of each head by position; the rest pass through (partial rotary).

  Pairs are (i, i + R) within the rotated block ("rotate half"). Computed in float32 so that
  large positions keep their precision under bf16 compute; cast back to x's dtype.
  """
  num_freqs = inv_freq_R.shape[-1]
  rope_dim = 2 * num_freqs
  angles_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(
      inv_freq_R, jnp.float32)
  cos_BxTx1xR = jnp.cos(angles_BxTxR)[:, :, None, :]
  sin_BxTx1xR = jnp.sin(angles_BxTxR)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1_BxTxNxR = x[..., :num_freqs]
  x2_BxTxNxR = x[..., num_freqs:rope_dim]
  rotated = [x1_BxTxNxR * cos_BxTx1xR - x2_BxTxNxR * sin_BxTx1xR,
             x2_BxTxNxR * cos_BxTx1xR + x1_BxTxNxR * sin_BxTx1xR]
  y_BxTxNxH = jnp.concatenate(rotated + [x[..., rope_dim:]], axis=-1)
  return y_BxTxNxH.astype(x_BxTxNxH.dtype)


# ---------------------------------------------------------------------------------------------
# ALiBi (Press et al., 2022).


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head slopes [N]: a geometric sequence from 2^(-8/N); non-powers of 2 interleave.

  For N not a power of two the paper takes the 2^floor(log2 N) slopes, then fills up with every
  other slope of the next power of two.
  """

  def geometric(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(closest)
  if closest != num_heads:
    slopes += geometric(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


@jax.jit
def alibi_bias(q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
               slopes_N: jax.Array | np.ndarray) -> jax.Array:
  """Additive logits bias [B, N, T, S] = -slope * (q_pos - k_pos); keys after q get masked."""
  distance_BxTxS = (q_positions_BxT[:, :, None] - k_positions_BxS[:, None, :]).astype(
      jnp.float32)
  return -jnp.asarray(slopes_N, jnp.float32)[None, :, None, None] * distance_BxTxS[:, None]


# ---------------------------------------------------------------------------------------------
# T5 relative position buckets (Raffel et al., 2020), causal variant.


@functools.partial(jax.jit, static_argnames=('num_buckets', 'max_distance'))
def relative_bucket(relative_position: jax.Array, num_buckets: int,
                    max_distance: int) -> jax.Array:
  """Bucket ids (int32) for relative_position = k_pos - q_pos (<= 0 for the past).

  bidirectional=False: future keys fall in bucket 0 (they are masked anyway); distances below
  num_buckets // 2 get a bucket each, longer ones share log-spaced buckets up to max_distance,
  beyond which everything lands in the last bucket.
  """
  distance = jnp.maximum(-relative_position, 0).astype(jnp.int32)
  max_exact = num_buckets // 2
  # jnp.maximum keeps log() finite where the exact branch is taken anyway.
  scaled = (jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return jnp.where(distance < max_exact, distance, large)
