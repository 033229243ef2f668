"""Tests for lm/model/ffn.py and lm/model/norms.py: exact outputs, names, inits, dtypes."""

import math

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.config import Config, ModelConfig
from lm.model import ffn as ffn_lib
from lm.model import matmul
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


# --- lm/model/matmul.py: nn.Dense's matmul with its weight gradient reoriented on CPU.


@pytest.mark.parametrize('k, n', [(48, 16), (16, 48), (24, 24)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_equal_lax_dot_general(k, n, dtype):
  x_BxTxK = _x((2, 5, k)).astype(dtype)
  w_KxN = _x((k, n), seed=2).astype(dtype)
  dims = (((2,), (0,)), ((), ()))
  loss = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims).astype(jnp.float32)))
  grads = jax.jit(jax.grad(loss(matmul.dot_general), argnums=(0, 1)))(x_BxTxK, w_KxN)
  expected = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x_BxTxK, w_KxN)
  for got, want in zip(grads, expected):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2 if
                               dtype == jnp.bfloat16 else 1e-5, atol=1e-5)


def _weight_gradient_dot_shapes(k, n):
  x, w = _x((3, 7, k)), _x((k, n), seed=2)
  f = lambda w: jnp.sum(matmul.dot_general(x, w, (((2,), (0,)), ((), ()))) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(f))(w)
  shapes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        shapes.append(tuple(eqn.outvars[0].aval.shape))
      for sub in jax_core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return shapes


def test_matmul_weight_gradient_takes_the_wider_orientation():
  # Besides the forward [3, 7, N] and dx [3, 7, K], one matmul gives the weight gradient: dW
  # [16, 48] itself, or dW^T [16, 48] when dW is [48, 16] (then transposed), never [48, 16].
  for k, n in [(16, 48), (48, 16)]:
    shapes = _weight_gradient_dot_shapes(k, n)
    assert sorted(shapes) == sorted([(3, 7, n), (3, 7, k), (16, 48)]), (k, n, shapes)


def test_matmul_leaves_other_contractions_to_lax():
  a, b = _x((4, 6)), _x((5, 6), seed=2)
  dims = (((1,), (1,)), ((), ()))
  np.testing.assert_array_equal(matmul.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
  assert 'custom_vjp' not in str(jax.make_jaxpr(lambda a, b: matmul.dot_general(a, b, dims))(a, b))
