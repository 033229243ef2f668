"""Tests for lm/model/matmul.py: nn.Dense's matmul with its weight gradient reoriented on CPU."""

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import Transformer
from lm.model import ffn as ffn_lib
from lm.model import matmul
from tests.test_ffn import tiny

DENSE_DIMS = (((2,), (0,)), ((), ()))  # x [B, T, I] @ w [I, O], as nn.Dense calls it


def _normal(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _loss(dot):
  return lambda x, w: jnp.sum(jnp.sin(dot(x, w, DENSE_DIMS).astype(jnp.float32)))


@pytest.mark.parametrize('i, o', [(48, 16), (16, 48), (24, 24)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gradients_equal_lax_dot_general(i, o, dtype):
  x_BxTxI = _normal((2, 5, i), 1).astype(dtype)
  w_IxO = _normal((i, o), 2).astype(dtype)
  grads = jax.jit(jax.grad(_loss(matmul.dot_general), argnums=(0, 1)))(x_BxTxI, w_IxO)
  expected = jax.grad(_loss(jax.lax.dot_general), argnums=(0, 1))(x_BxTxI, w_IxO)
  for got, want in zip(grads, expected):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.float32(got), np.float32(want),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)


def test_gradients_keep_each_operands_dtype():
  x_BxTxI, w_IxO = _normal((2, 5, 16), 1).astype(jnp.bfloat16), _normal((16, 8), 2)
  dx, dw = jax.grad(_loss(matmul.dot_general), argnums=(0, 1))(x_BxTxI, w_IxO)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_gradients_under_vmap_equal_lax():
  # The MoE experts call the MLP under nn.vmap: weights [E, I, O], slots [E, B, C, I].
  x_ExBxCxI, w_ExIxO = _normal((3, 2, 4, 16), 1), _normal((3, 16, 8), 2)
  grad = lambda dot: jax.grad(lambda x, w: jnp.sum(jax.vmap(
      lambda x, w: jnp.sin(dot(x, w, DENSE_DIMS)))(x, w) ** 2), argnums=(0, 1))
  for got, want in zip(grad(matmul.dot_general)(x_ExBxCxI, w_ExIxO),
                       grad(jax.lax.dot_general)(x_ExBxCxI, w_ExIxO)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every dot_general in a jaxpr, sub-jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      shapes.extend(_dot_shapes(sub))
  return shapes


def test_weight_gradient_takes_the_wider_orientation():
  # Besides the forward [3, 7, O] and dx [3, 7, I], one matmul gives the weight gradient: dW
  # [16, 48] itself, or dW^T [16, 48] when dW is [48, 16] (then transposed), never [48, 16].
  for i, o in [(16, 48), (48, 16)]:
    x_BxTxI = _normal((3, 7, i), 1)
    f = lambda w: jnp.sum(matmul.dot_general(x_BxTxI, w, DENSE_DIMS) ** 2)
    shapes = _dot_shapes(jax.make_jaxpr(jax.grad(f))(_normal((i, o), 2)).jaxpr)
    assert sorted(shapes) == sorted([(3, 7, o), (3, 7, i), (16, 48)]), (i, o, shapes)
    narrow = jax.jit(jax.grad(f)).lower(_normal((i, o), 2)).as_text()
    assert ('optimization_barrier' in narrow) == (o < i)


def test_other_contractions_and_backends_use_lax(monkeypatch):
  a, b = _normal((4, 6), 1), _normal((5, 6), 2)
  dims = (((1,), (1,)), ((), ()))
  np.testing.assert_array_equal(matmul.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
  trace = lambda dims, *args: str(jax.make_jaxpr(
      lambda *args: matmul.dot_general(*args, dims))(*args))
  assert 'custom_vjp' not in trace(dims, a, b)
  x_BxTxI, w_IxO = _normal((2, 3, 6), 1), _normal((6, 5), 2)
  assert 'custom_vjp' in trace(DENSE_DIMS, x_BxTxI, w_IxO)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert 'custom_vjp' not in trace(DENSE_DIMS, x_BxTxI, w_IxO)


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu'])
def test_the_ffn_dense_layers_use_it(ffn):
  config = tiny(ffn=ffn)
  module = ffn_lib.ffn_class(ffn)(config)
  x_BxTxD = _normal((2, 5, 32), 1)
  params = nn.unbox(module.init(jax.random.key(0), x_BxTxD)['params'])
  jaxpr = jax.make_jaxpr(lambda p: module.apply({'params': p}, x_BxTxD))(params)
  assert str(jaxpr).count('custom_vjp_call') == (2 if ffn == 'mlp' else 3)


@pytest.mark.parametrize('remat', ['dots', 'dots_no_batch'])
def test_dots_remat_saves_the_dense_outputs(remat, capsys):
  # Without the checkpoint name, 'dots' would recompute fc_in's [B, T, F] output.
  config = tiny(remat=remat, scan_layers=False)
  model = Transformer(config)
  tokens_BxT = jnp.zeros((2, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens_BxT)['params'])
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: jnp.sum(model.apply({'params': p}, tokens_BxT)), params)
  assert f"f32[2,8,48] named '{matmul.CHECKPOINT_NAME}'" in capsys.readouterr().out


TREE_REDUCTIONS_OFF = '--xla_disable_hlo_passes=tree_reduction_rewriter'


def _primitives(fn, *args):
  """The primitives of a fresh trace: make_jaxpr caches by function and shapes, and the choice
  depends on $XLA_FLAGS, which is not part of that key."""
  return {e.primitive.name for e in jax.make_jaxpr(lambda *a: fn(*a))(*args).eqns}


@pytest.mark.parametrize('flags, op', [('', 'reduce_sum'), (TREE_REDUCTIONS_OFF, 'dot_general')])
def test_sum_leading_is_a_matvec_only_without_tree_reductions(monkeypatch, flags, op):
  """Without XLA's tree-reduction rewriter the token sum is ones @ x; either way it is the sum."""
  monkeypatch.setenv('XLA_FLAGS', flags)
  x_BxTxD = _normal((2, 5, 8), 3)
  primitives = _primitives(matmul.sum_leading, x_BxTxD)
  assert op in primitives and not primitives & ({'reduce_sum', 'dot_general'} - {op})
  np.testing.assert_allclose(matmul.sum_leading(x_BxTxD), np.sum(np.asarray(x_BxTxD), (0, 1)),
                             rtol=1e-5, atol=1e-6)


def test_tree_reductions_off_reads_the_last_disabled_passes(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', f'{TREE_REDUCTIONS_OFF} --xla_disable_hlo_passes=foo')
  assert not matmul.tree_reductions_off()
  monkeypatch.setenv('XLA_FLAGS', '--xla_disable_hlo_passes=foo,tree_reduction_rewriter')
  assert matmul.tree_reductions_off()
  assert 'dot_general' in _primitives(matmul.sum_leading, _normal((2, 5, 8), 3))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert 'dot_general' not in _primitives(matmul.sum_leading, _normal((2, 5, 8), 3))
