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
Dense layer; nothing in lm takes them. Its output carries the checkpoint name CHECKPOINT_NAME,
which the transformer's 'dots' remat policies save as they save every other matmul.

sum_leading is the other CPU workaround here: a sum over the token axes (a bias or norm-scale
gradient) as a matrix-vector product, when XLA's tree-reduction rewriter is off.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

CHECKPOINT_NAME = 'dense_matmul'


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
