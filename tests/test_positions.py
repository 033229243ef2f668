"""Position encodings against their papers' formulas, computed independently in numpy."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.config import Config
from lm.model import positions


def model_config(**overrides):
  cd = base.get_config()
  cd.model.update(d_model=32, num_heads=2, num_kv_heads=2, pos_emb='rope')
  cd.model.update(overrides)
  return Config.from_config_dict(cd).model


def random_heads(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('d_model', [16, 7])
def test_sinusoidal_matches_formula(d_model):
  pos_BxT = np.array([[0, 1, 2, 7], [100, 3, 0, 2048]])
  got = np.asarray(positions.sinusoidal(jnp.asarray(pos_BxT), d_model))
  want = np.zeros(pos_BxT.shape + (d_model,))
  for b, t, d in np.ndindex(*want.shape):
    angle = pos_BxT[b, t] / 10000 ** (2 * (d // 2) / d_model)
    want[b, t, d] = math.sin(angle) if d % 2 == 0 else math.cos(angle)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_rope_frequencies_plain():
  config = model_config(head_dim=16, rope_theta=500.0)
  want = [1 / 500.0 ** (2 * i / 16) for i in range(8)]
  np.testing.assert_allclose(positions.rope_frequencies(config), want, rtol=1e-6)


def test_rope_rotate_half_layout():
  """Dim i pairs with dim i + R: a unit vector on dim 0 turns towards dim R."""
  inv_freq_R = np.array([0.5, 0.25], np.float32)
  x = jnp.zeros((1, 1, 1, 6)).at[..., 0].set(1.0).at[..., 5].set(3.0)
  y = np.asarray(positions.apply_rope(x, jnp.array([[3]]), inv_freq_R))[0, 0, 0]
  np.testing.assert_allclose(y, [math.cos(1.5), 0, math.sin(1.5), 0, 0, 3.0], atol=1e-6)


@pytest.mark.parametrize('scaling', ['none', 'llama3'])
def test_rope_scores_depend_only_on_relative_position(scaling):
  config = model_config(head_dim=16, rope_scaling=scaling, rope_scaling_factor=8.0,
                        rope_original_max_seq_len=64)
  inv_freq = positions.rope_frequencies(config)
  q, k = random_heads((1, 6, 1, 16), 1), random_heads((1, 6, 1, 16), 2)
  pos = jnp.array([[0, 1, 2, 5, 9, 30]])

  def scores(offset):
    qr = positions.apply_rope(q, pos + offset, inv_freq)
    kr = positions.apply_rope(k, pos + offset, inv_freq)
    return np.asarray(jnp.einsum('BTNH,BSNH->BTS', qr, kr))

  base_scores = scores(0)
  np.testing.assert_allclose(scores(137), base_scores, atol=1e-4)
  # ... and do depend on it: not a no-op.
  assert not np.allclose(base_scores, np.einsum('BTNH,BSNH->BTS', q, k), atol=1e-2)


def test_partial_rotary_leaves_tail_untouched():
  config = model_config(head_dim=16, rope_fraction=0.25)
  assert config.rope_dim == 4
  inv_freq = positions.rope_frequencies(config)
  assert inv_freq.shape == (2,)
  x = random_heads((2, 5, 3, 16))
  y = positions.apply_rope(x, jnp.broadcast_to(jnp.arange(5), (2, 5)) + 1, inv_freq)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  assert not np.allclose(y[..., :4], x[..., :4], atol=1e-3)


def test_rope_keeps_dtype():
  x = random_heads((1, 3, 2, 8)).astype(jnp.bfloat16)
  assert positions.apply_rope(x, jnp.array([[0, 1, 2]]), np.ones(4, np.float32)).dtype == (
      jnp.bfloat16)


def test_linear_scaling_is_rope_at_divided_positions():
  plain = positions.rope_frequencies(model_config(head_dim=16))
  linear = positions.rope_frequencies(
      model_config(head_dim=16, rope_scaling='linear', rope_scaling_factor=4.0))
  x = random_heads((1, 7, 2, 16))
  pos = jnp.array([[0, 1, 3, 4, 10, 99, 1000]])
  np.testing.assert_allclose(
      positions.apply_rope(x, pos, linear),
      positions.apply_rope(x, pos.astype(jnp.float32) / 4.0, plain), atol=1e-5)


def test_ntk_scaling_stretches_low_frequencies_and_keeps_the_highest():
  dim, factor = 16, 4.0
  plain = positions.rope_frequencies(model_config(head_dim=dim))
  ntk = positions.rope_frequencies(
      model_config(head_dim=dim, rope_scaling='ntk', rope_scaling_factor=factor))
  # theta' = theta * factor^(d / (d - 2)): the highest frequency is untouched, the lowest is
  # divided by exactly the factor, and every one in between is slowed by less.
  assert ntk[0] == plain[0]
  np.testing.assert_allclose(ntk[-1], plain[-1] / factor, rtol=1e-5)
  ratio = plain / ntk
  assert np.all(np.diff(ratio) > 0) and ratio[-1] == pytest.approx(factor, rel=1e-5)


def llama3_reference(theta, dim, factor, low, high, original):
  """The Llama 3.1 rule, written out per frequency in float64."""
  out = []
  for i in range(0, dim, 2):
    freq = 1.0 / theta ** (i / dim)
    wavelen = 2 * math.pi / freq
    if wavelen < original / high:
      out.append(freq)
    elif wavelen > original / low:
      out.append(freq / factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_scaling_matches_published_rule():
  # Llama 3.1 8B: head_dim 128, theta 5e5, factor 8, low 1, high 4, original 8192.
  config = model_config(d_model=256, num_heads=2, rope_theta=500000.0, rope_scaling='llama3',
                        rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)
  got = positions.rope_frequencies(config)
  want = llama3_reference(500000.0, 128, 8.0, 1.0, 4.0, 8192)
  assert got.dtype == np.float32 and got.shape == (64,)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  plain = llama3_reference(500000.0, 128, 1.0, 1.0, 4.0, 8192)
  # All three regimes are exercised: kept, smoothed, slowed by the factor.
  assert got[0] == pytest.approx(plain[0])
  assert got[-1] == pytest.approx(plain[-1] / 8, rel=1e-6)
  assert np.any((got < plain * 0.99) & (got > plain / 8 * 1.01))


def test_alibi_slopes_power_of_two():
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  np.testing.assert_allclose(positions.alibi_slopes(4), [2.0 ** -i for i in (2, 4, 6, 8)])


def test_alibi_slopes_non_power_of_two():
  # The 4 slopes of 4 heads, then every other slope of 8 heads: 2^-1, 2^-3.
  np.testing.assert_allclose(positions.alibi_slopes(6),
                             [2.0 ** -i for i in (2, 4, 6, 8, 1, 3)])
  np.testing.assert_allclose(positions.alibi_slopes(12),
                             [2.0 ** -i for i in range(1, 9)] +
                             [2.0 ** -i for i in (0.5, 1.5, 2.5, 3.5)])


def test_alibi_bias_penalises_distance():
  q_pos = jnp.array([[4, 5]])
  k_pos = jnp.array([[0, 4, 5]])
  bias = np.asarray(positions.alibi_bias(q_pos, k_pos, np.array([0.5, 0.25], np.float32)))
  assert bias.shape == (1, 2, 2, 3)
  np.testing.assert_allclose(bias[0, 0], [[-2.0, 0.0, 0.5], [-2.5, -0.5, 0.0]])
  np.testing.assert_allclose(bias[0, 1], bias[0, 0] / 2)


def test_relative_buckets_hand_computed():
  # num_buckets=8, max_distance=16: distances 0..3 exact; then 4 + floor(4 log(d/4) / log 4).
  distance = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 16, 100])
  want = np.array([0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 7, 7])
  got = positions.relative_bucket(jnp.asarray(-distance), 8, 16)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.int32
  # Keys after the query (masked anyway) share bucket 0.
  np.testing.assert_array_equal(positions.relative_bucket(jnp.array([1, 5]), 8, 16), [0, 0])


def test_relative_buckets_t5_defaults():
  got = positions.relative_bucket(-jnp.array([15, 16, 31, 127, 128, 5000]), 32, 128)
  np.testing.assert_array_equal(got, [15, 16, 21, 31, 31, 31])
