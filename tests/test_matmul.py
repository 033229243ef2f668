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


def _rounded(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize('lhs_shape, rhs_shape, c', [
    ((2, 5, 16), (16, 24), 1),  # nn.Dense
    ((2, 5, 16), (16, 4, 6), 1),  # DenseGeneral: the query/key/value projections
    ((2, 5, 4, 6), (4, 6, 16), 2),  # DenseGeneral: the output projection
])
@pytest.mark.parametrize('native', [True, False])
def test_bf16_projection_and_its_gradients_sum_rounded_operands(monkeypatch, lhs_shape,
                                                               rhs_shape, c, native):
  """y = r(x) r(w); dx = r(dy) r(w)^T; dw = r(x)^T r(dy), r rounding to bfloat16, on the
  native kernel where there is one and on XLA's path."""
  if not native:
    monkeypatch.setattr(matmul.bf16_matmul, 'native', lambda: False)
  elif not matmul.bf16_matmul.native():
    pytest.skip('no native bfloat16 kernel here')
  x, w = _normal(lhs_shape, 1), _normal(rhs_shape, 2)
  dims = ((tuple(range(len(lhs_shape) - c, len(lhs_shape))), tuple(range(c))), ((), ()))
  f = lambda x, w: jnp.sum(jnp.sin(matmul.bf16_dot_general(x, w, dims)))
  y = jax.jit(lambda x, w: matmul.bf16_dot_general(x, w, dims))(x, w)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  k = int(np.prod(rhs_shape[:c]))
  x2, w2 = _rounded(x).reshape(-1, k), _rounded(w).reshape(k, -1)
  y_want = x2 @ w2
  np.testing.assert_allclose(np.asarray(y).reshape(y_want.shape), y_want, rtol=1e-5, atol=1e-5)
  dy2 = _rounded(np.cos(np.asarray(y, np.float32)).reshape(y_want.shape))
  np.testing.assert_allclose(np.asarray(dx).reshape(-1, k), dy2 @ w2.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw).reshape(k, -1), x2.T @ dy2, rtol=1e-5, atol=1e-5)
  assert dx.dtype == dw.dtype == y.dtype == jnp.float32
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
  assert hlo.count('lm_bf16_matmul') == (3 if native else 0)


def test_bf16_other_contractions_round_through_xla():
  a_BxIxK, b_BxKxJ = _normal((3, 4, 6), 1), _normal((3, 6, 5), 2)
  dims = (((2,), (1,)), ((0,), (0,)))
  got = matmul.bf16_dot_general(a_BxIxK, b_BxKxJ, dims)
  np.testing.assert_allclose(got, np.einsum('bik,bkj->bij', _rounded(a_BxIxK), _rounded(b_BxKxJ)),
                             rtol=1e-5, atol=1e-6)
  assert 'lm_bf16_matmul' not in jax.jit(
      lambda a, b: matmul.bf16_dot_general(a, b, dims)).lower(a_BxIxK, b_BxKxJ).as_text()
  # The result takes the operands' dtype, as lax.dot_general's does.
  half = matmul.bf16_dot_general(a_BxIxK.astype(jnp.bfloat16), _normal((6, 2), 3).astype(
      jnp.bfloat16), DENSE_DIMS)
  assert half.dtype == jnp.bfloat16 and half.shape == (3, 4, 2)


@pytest.mark.parametrize('tie', [True, False])
def test_bf16_precision_takes_every_projection_but_the_head_and_router(tie):
  """Per layer q, k, v, out, fc_in, fc_out go through the kernel; the LM head stays float32.
  The logits move by bfloat16 rounding only."""
  if not matmul.bf16_matmul.native():
    pytest.skip('no native bfloat16 kernel here')
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  logits = {}
  for precision in ('float32', 'bfloat16'):
    model = Transformer(tiny(matmul_precision=precision, scan_layers=False, tie_embeddings=tie))
    params = nn.unbox(model.init(jax.random.key(0), tokens_BxT)['params'])
    apply = jax.jit(lambda p: model.apply({'params': p}, tokens_BxT))
    logits[precision] = apply(params)
    calls = apply.lower(params).as_text().count('lm_bf16_matmul')
    assert calls == (12 if precision == 'bfloat16' else 0), (precision, calls)
  diff = np.abs(np.asarray(logits['bfloat16'] - logits['float32']))
  assert 0 < diff.max() < 0.05 * np.abs(np.asarray(logits['float32'])).max()


def test_bf16_precision_leaves_the_moe_router_and_untied_head_in_float32(monkeypatch):
  shapes = []
  bf16_dot_general = matmul.bf16_dot_general
  def recording(lhs, rhs, *args, **kwargs):
    shapes.append(rhs.shape)
    return bf16_dot_general(lhs, rhs, *args, **kwargs)
  monkeypatch.setattr(matmul, 'bf16_dot_general', recording)
  tokens_BxT = jnp.zeros((2, 8), jnp.int32)
  model = Transformer(tiny(matmul_precision='bfloat16', scan_layers=False, ffn='moe',
                           num_experts=4, top_k=2, tie_embeddings=False))
  model.init(jax.random.key(0), tokens_BxT)
  assert (32, 48) in shapes and (32, 4, 8) in shapes  # an expert's gate/up, the query
  assert (32, 4) not in shapes and (32, 64) not in shapes  # the router, the LM head


def test_bf16_precision_runs_the_moe_experts_under_vmap():
  if not matmul.bf16_matmul.native():
    pytest.skip('no native bfloat16 kernel here')
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  grads = {}
  for precision in ('float32', 'bfloat16'):
    model = Transformer(tiny(matmul_precision=precision, scan_layers=False, ffn='moe',
                             num_experts=4, top_k=2))
    params = nn.unbox(model.init(jax.random.key(0), tokens_BxT)['params'])
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens_BxT) ** 2)
    grads[precision] = jax.jit(jax.grad(loss))(params)
    assert ('lm_bf16_matmul' in jax.jit(jax.grad(loss)).lower(params).as_text()) == (
        precision == 'bfloat16')
  for got, want in zip(jax.tree.leaves(grads['bfloat16']), jax.tree.leaves(grads['float32'])):
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.02 * np.abs(want).max() + 1e-6)
