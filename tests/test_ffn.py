"""Tests for lm/model/ffn.py and lm/model/norms.py: exact outputs, names, inits, dtypes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.config import Config, ModelConfig
from lm.model import ffn as ffn_lib
from lm.model import norms


def tiny(**overrides) -> ModelConfig:
  c = base.get_config()
  c.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      d_ff=48))
  c.model.update(overrides)
  return Config.from_config_dict(c).model


def _init(module, x):
  return nn.unbox(module.init(jax.random.key(0), x)['params'])


def _x(shape=(2, 5, 32), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _gelu_tanh(h):
  return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


def test_mlp_matches_numpy_gpt2_gelu():
  config = tiny(ffn='mlp')
  x = _x()
  params = _init(ffn_lib.Mlp(config), x)
  assert set(params) == {'fc_in', 'fc_out'}
  p = jax.tree_util.tree_map(np.asarray, params)
  # Non-zero biases so that a dropped bias would show.
  p['fc_in']['bias'] = np.linspace(-1, 1, 48, dtype=np.float32)
  p['fc_out']['bias'] = np.linspace(1, -1, 32, dtype=np.float32)
  y = ffn_lib.Mlp(config).apply({'params': p}, x)
  h = _gelu_tanh(np.asarray(x) @ p['fc_in']['kernel'] + p['fc_in']['bias'])
  np.testing.assert_allclose(y, h @ p['fc_out']['kernel'] + p['fc_out']['bias'],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('use_bias', [False, True])
def test_swiglu_matches_numpy(use_bias):
  config = tiny(ffn='swiglu', use_bias=use_bias)
  x = _x()
  params = _init(ffn_lib.SwiGLU(config), x)
  assert set(params) == {'gate', 'up', 'down'}
  assert all(('bias' in params[k]) == use_bias for k in params)
  p = jax.tree_util.tree_map(np.asarray, params)
  xn = np.asarray(x)
  gate, up = xn @ p['gate']['kernel'], xn @ p['up']['kernel']
  if use_bias:
    gate, up = gate + p['gate']['bias'], up + p['up']['bias']
  expected = (gate / (1 + np.exp(-gate)) * up) @ p['down']['kernel']
  y = ffn_lib.SwiGLU(config).apply({'params': p}, x)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_init_std_and_residual_scaling():
  config = tiny(d_model=256, d_ff=1024, num_layers=8, init_std=0.02)
  params = _init(ffn_lib.Mlp(config), _x((1, 1, 256)))
  assert np.std(params['fc_in']['kernel']) == pytest.approx(0.02, rel=0.03)
  assert np.std(params['fc_out']['kernel']) == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
  assert not np.any(params['fc_in']['bias'])


def test_logical_axis_names():
  config = tiny(ffn='swiglu', use_bias=True)
  boxed = ffn_lib.SwiGLU(config).init(jax.random.key(0), _x())['params']
  assert boxed['gate']['kernel'].names == ('embed', 'mlp')
  assert boxed['gate']['bias'].names == ('mlp',)
  assert boxed['down']['kernel'].names == ('mlp', 'embed')
  assert boxed['down']['bias'].names == ('embed',)


def test_bf16_compute_with_float32_params():
  config = tiny(ffn='swiglu', dtype='bfloat16')
  x = _x()
  variables = ffn_lib.SwiGLU(config).init(jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
  assert ffn_lib.SwiGLU(config).apply(variables, x).dtype == jnp.bfloat16


def test_unknown_ffn_kind_names_choices():
  with pytest.raises(ValueError, match='mlp, swiglu'):
    ffn_lib.ffn_class('geglu')


class _Norm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    return norms.norm(self.config, 'n')(x)


@pytest.mark.parametrize('use_bias', [False, True])
def test_layernorm(use_bias):
  config = tiny(norm='layernorm', use_bias=use_bias, norm_eps=1e-5)
  x = _x() * 3 + 1
  params = _init(_Norm(config), x)['n']
  assert set(params) == ({'scale', 'bias'} if use_bias else {'scale'})
  y = _Norm(config).apply({'params': {'n': params}}, x)
  xn = np.asarray(x)
  mean, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
  np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_rmsnorm():
  config = tiny(norm='rmsnorm', norm_eps=1e-6)
  x = _x() * 3 + 1
  params = jax.tree_util.tree_map(np.asarray, _init(_Norm(config), x))
  assert set(params['n']) == {'scale'}
  params['n']['scale'] = np.linspace(0.5, 2, 32, dtype=np.float32)
  y = _Norm(config).apply({'params': params}, x)
  xn = np.asarray(x)
  expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * params['n']['scale']
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_norm_statistics_are_float32_under_bf16():
  """A large mean would wipe out bf16 statistics; flax computes them in float32."""
  config = tiny(norm='layernorm', dtype='bfloat16')
  x = (_x() + 300.0).astype(jnp.bfloat16)
  variables = _Norm(config).init(jax.random.key(0), x)
  y = _Norm(config).apply(variables, x)
  assert y.dtype == jnp.bfloat16
  xf = np.asarray(x, np.float32)
  expected = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)


@pytest.mark.parametrize('flags', ['', '--xla_disable_hlo_passes=tree_reduction_rewriter'])
@pytest.mark.parametrize('norm, use_bias, param_dtype', [
    ('layernorm', True, 'float32'), ('layernorm', False, 'float32'),
    ('rmsnorm', False, 'float32'), ('layernorm', True, 'bfloat16')])
def test_norm_gradients_match_the_formula(monkeypatch, flags, norm, use_bias, param_dtype):
  """The norm's gradients equal autodiff of the textbook formula: through the custom VJP whose
  token sums are matmuls (tree reductions off), or through plain autodiff (otherwise)."""
  monkeypatch.setenv('XLA_FLAGS', flags)
  config = tiny(norm=norm, use_bias=use_bias, norm_eps=1e-5, param_dtype=param_dtype)
  x = _x() * 3 + 1
  params = {'n': jax.tree.map(lambda p: (p + 0.1 * _x(p.shape, 7)).astype(p.dtype),
                              _init(_Norm(config), x)['n'])}
  weights = _x(seed=9)

  def formula(p, x):
    centred = x - x.mean(-1, keepdims=True) if norm == 'layernorm' else x
    y = centred / jnp.sqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + 1e-5)
    y = y * p['n']['scale'].astype(jnp.float32)
    return jnp.sum((y + p['n']['bias'].astype(jnp.float32) if use_bias else y) * weights)

  module = lambda p, x: jnp.sum(_Norm(config).apply({'params': p}, x) * weights)
  jaxpr = str(jax.make_jaxpr(jax.grad(module, argnums=(0, 1)))(params, x))
  assert ('custom_vjp_call' in jaxpr) == bool(flags)
  got = jax.jit(jax.grad(module, argnums=(0, 1)))(params, x)
  want = jax.grad(formula, argnums=(0, 1))(params, x)
  tolerance = 1e-4 if param_dtype == 'float32' else 2e-2
  jax.tree.map(lambda a, b: (np.testing.assert_equal(a.dtype, b.dtype),
                             np.testing.assert_allclose(np.float32(a), np.float32(b),
                                                        rtol=tolerance, atol=tolerance)),
               got, want)
