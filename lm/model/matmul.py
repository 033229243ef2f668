"""nn.Dense's `x @ W`, with its weight gradient computed in the orientation XLA:CPU runs fastest.

Here x is [..., I] and W [I, O] (I, O: the layer's input and output widths). The weight gradient
dW [I, O] = x^T dy contracts every leading (token) axis of both operands, and XLA:CPU ran that
matmul 1.1-1.9x faster when its output is the wider of the two orientations: dW^T [O, I] =
dy^T x, then transposed, when O < I (fc_out, down, the LM head); dW itself when O >= I (fc_in,
up, gate). Left to itself XLA picks one orientation for every weight; on shakespeare_char the
narrow one cost about 2 ms of a 30 ms step (benchmarks/BENCHMARKS.md, session 6;
benchmarks/weight_grad.py times both). Other backends' matmul libraries take transposed
operands as they are, so there this is plain `lax.dot_general`.

On CPU the custom VJP rules out forward-mode derivatives (jax.jvp, jacfwd, hessian) through a
Dense layer, as bf16_dot_general's does on every backend; nothing in lm takes them. Its output
carries the checkpoint name CHECKPOINT_NAME, which the transformer's 'dots' remat policies save
as they save every other matmul.

bf16_dot_general is the projections' matmul when model.matmul_precision is bfloat16: operands
rounded to bfloat16, products summed in float32, on every backend; on CPU through
lm.kernels.bf16_matmul, about twice XLA:CPU's float32 rate where the CPU has AVX512-BF16.

sum_leading is the other CPU workaround here: a sum over the token axes (a bias or norm-scale
gradient) as a matrix-vector product, when XLA's tree-reduction rewriter is off.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from lm.kernels import bf16_matmul

CHECKPOINT_NAME = 'dense_matmul'
_round = bf16_matmul.rounded


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_XxI: jax.Array, w_IxO: jax.Array, precision) -> jax.Array:
  """x [..., I] @ w [I, O] -> [..., O]; X stands for the leading (token) axes."""
  return lax.dot_general(x_XxI, w_IxO, (((x_XxI.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


def _matmul_fwd(x_XxI, w_IxO, precision):
  return _matmul(x_XxI, w_IxO, precision), (x_XxI, w_IxO)


def transposes(in_width: int, out_width: int) -> bool:
  """Whether the weight gradient is computed as dW^T and transposed: when dW is narrow (O < I)."""
  return out_width < in_width


def weight_gradient(x_XxI: jax.Array, dy_XxO: jax.Array, transposed: bool,
                    precision=None) -> jax.Array:
  """dW [I, O] = x^T dy over every leading axis: directly, or as (dy^T x)^T if `transposed`.

  The token axes are contracted where they are: reshaped to one axis, they would cost
  all-gathers under a mesh that splits them two ways (batch and context).
  """
  tokens = tuple(range(x_XxI.ndim - 1))
  contract = lambda a, b: lax.dot_general(a, b, ((tokens, tokens), ((), ())),
                                          precision=precision)
  if transposed:
    # The barrier keeps XLA from folding the transpose back into the matmul.
    return lax.optimization_barrier(contract(dy_XxO, x_XxI)).T
  return contract(x_XxI, dy_XxO)


def _matmul_bwd(precision, residuals, dy_XxO):
  """dx = dy w^T; dw = x^T dy in its wider orientation (module docstring)."""
  x_XxI, w_IxO = residuals
  dx_XxI = lax.dot_general(dy_XxO, w_IxO, (((dy_XxO.ndim - 1,), (1,)), ((), ())),
                           precision=precision)
  dw_IxO = weight_gradient(x_XxI, dy_XxO, transposes(*w_IxO.shape), precision)
  return dx_XxI.astype(x_XxI.dtype), dw_IxO.astype(w_IxO.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
  """lax.dot_general; on CPU, `x[..., I] @ W[I, O]` (nn.Dense's call) takes the VJP above."""
  is_dense = (rhs.ndim == 2 and preferred_element_type is None
              and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())))
  if is_dense and jax.default_backend() == 'cpu':
    return checkpoint_name(_matmul(lhs, rhs, precision), CHECKPOINT_NAME)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def _bf16_matmul_impl(x_XxK: jax.Array, w_KxO: jax.Array) -> jax.Array:
  if bf16_matmul.applies(x_XxK, w_KxO):
    y_MxO = bf16_matmul.matmul(x_XxK.reshape(-1, x_XxK.shape[-1]), w_KxO)
    return y_MxO.reshape(x_XxK.shape[:-1] + w_KxO.shape[1:])
  return lax.dot_general(_round(x_XxK), _round(w_KxO), (((x_XxK.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_matmul(x_XxK: jax.Array, w_KxO: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, O] -> [..., O] float32, operands rounded to bfloat16."""
  return _bf16_matmul_impl(x_XxK, w_KxO)


def _bf16_matmul_fwd(x_XxK, w_KxO):
  return _bf16_matmul_impl(x_XxK, w_KxO), (x_XxK, w_KxO)


def _bf16_matmul_bwd(residuals, dy_XxO):
  """dx = dy w^T and dw = x^T dy, at the same precision. The kernel reads the transposes as
  stored; XLA's path contracts the token axes where they are (see weight_gradient)."""
  x_XxK, w_KxO = residuals
  if bf16_matmul.applies(x_XxK, w_KxO, dy_XxO):
    x_MxK = x_XxK.reshape(-1, x_XxK.shape[-1])
    dy_MxO = dy_XxO.reshape(-1, dy_XxO.shape[-1])
    dx_XxK = bf16_matmul.matmul(dy_MxO, w_KxO, trans_b=True).reshape(x_XxK.shape)
    dw_KxO = bf16_matmul.matmul(x_MxK, dy_MxO, trans_a=True)
  else:
    tokens = tuple(range(x_XxK.ndim - 1))
    dx_XxK = lax.dot_general(_round(dy_XxO), _round(w_KxO),
                             (((dy_XxO.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dw_KxO = lax.dot_general(_round(x_XxK), _round(dy_XxO), ((tokens, tokens), ((), ())),
                             preferred_element_type=jnp.float32)
  return dx_XxK.astype(x_XxK.dtype), dw_KxO.astype(w_KxO.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> jax.Array:
  """lax.dot_general with both operands rounded to bfloat16 and the products summed in float32.

  A projection (Dense, DenseGeneral: lhs's trailing axes contracted with rhs's leading ones,
  no batch axes) is one matmul over its merged contracted and feature axes, with the token axes
  left as they are, and a custom VJP that sums its gradients in float32 too. Any other
  contraction is lax.dot_general on the rounded operands, whose gradients follow JAX's own
  transpose rules (bfloat16 results); lm has none. The result has the operands' dtype unless
  preferred_element_type says otherwise.
  """
  del precision  # the rounding is the precision
  (lhs_contract, rhs_contract), batch = dimension_numbers
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  c = len(lhs_contract)
  is_projection = (not any(batch) and tuple(rhs_contract) == tuple(range(c))
                   and tuple(lhs_contract) == tuple(range(lhs.ndim - c, lhs.ndim)))
  if not is_projection:
    return lax.dot_general(_round(lhs), _round(rhs), dimension_numbers,
                           preferred_element_type=jnp.float32).astype(out_dtype)
  tokens, features = lhs.shape[:-c], rhs.shape[c:]
  k = math.prod(rhs.shape[:c])
  y_XxO = _bf16_matmul(lhs.reshape(tokens + (k,)), rhs.reshape(k, -1))
  return checkpoint_name(y_XxO.reshape(tokens + features).astype(out_dtype), CHECKPOINT_NAME)


def projection_dot_general(matmul_precision: str):
  """The dot_general of a model's projections (Dense, DenseGeneral) at model.matmul_precision."""
  return bf16_dot_general if matmul_precision == 'bfloat16' else dot_general


def tree_reductions_off() -> bool:
  """Whether $XLA_FLAGS turns XLA's tree-reduction rewriter off (shakespeare_char's flags do).

  XLA reads the flags when the backend starts; the last --xla_disable_hlo_passes wins.
  """
  passes = ''
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_disable_hlo_passes='):
      passes = flag.split('=', 1)[1]
  return 'tree_reduction_rewriter' in passes.split(',')


def sums_by_matvec() -> bool:
  """Whether sum_leading multiplies instead of reducing: on CPU without tree reductions."""
  return jax.default_backend() == 'cpu' and tree_reductions_off()


def sum_leading(x_XxD: jax.Array) -> jax.Array:
  """x [..., D] summed over every leading (token) axis -> [D]: a bias or norm-scale gradient.

  Without the tree-reduction rewriter XLA:CPU sums over a tensor's major axes one row at a
  time: [384, 128] took 127 us, [8192, 768] 82 ms. There this is the product ones [X] @ x [X, D]
  (25 us and 4 ms); with the rewriter the sum is the faster (18 us and 2.4 ms), so it stays
  (benchmarks/BENCHMARKS.md, session 7). The axes are contracted where they are, as in
  weight_gradient.
  """
  tokens = tuple(range(x_XxD.ndim - 1))
  if not sums_by_matvec():
    return jnp.sum(x_XxD, axis=tokens)
  ones_X = jnp.ones(x_XxD.shape[:-1], x_XxD.dtype)
  return lax.dot_general(ones_X, x_XxD, ((tokens, tokens), ((), ())))
