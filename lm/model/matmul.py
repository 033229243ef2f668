"""nn.Dense's `x @ W`, with its weight gradient computed in the orientation XLA:CPU runs fastest.

For y[M, N] = x[M, K] @ W[K, N] over M tokens, the weight gradient dW[K, N] = x^T dy contracts
the token axis of both operands. XLA:CPU's matmul for that form is up to 1.4-2x faster when
its output is the wider of the two orientations: dW^T[N, K] = dy^T x transposed is faster when
N < K (fc_out, down, the LM head) and dW itself when N >= K (fc_in, up, gate).
benchmarks/BENCHMARKS.md (session 6) has the figures. Left to itself XLA picks one orientation
for every weight and the narrow one costs shakespeare_char about 2 ms of its 30 ms step. On
other backends the matmul libraries take transposed operands as they are, so there this is
plain `lax.dot_general`.
"""

import functools

import jax
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxK: jax.Array, w_KxN: jax.Array, precision) -> jax.Array:
  return lax.dot_general(x_MxK, w_KxN, (((x_MxK.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


def _matmul_fwd(x, w, precision):
  return _matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, dy):
  x, w = residuals
  contract = lambda a, b, dims: lax.dot_general(a, b, (dims, ((), ())), precision=precision)
  dx = contract(dy, w, ((dy.ndim - 1,), (1,)))
  x_MxK, dy_MxN = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if dy_MxN.shape[1] < x_MxK.shape[1]:
    # The barrier keeps XLA from folding the transpose back into the matmul.
    dw = lax.optimization_barrier(contract(dy_MxN, x_MxK, ((0,), (0,)))).T
  else:
    dw = contract(x_MxK, dy_MxN, ((0,), (0,)))
  return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
  """lax.dot_general; on CPU, `x[..., K] @ W[K, N]` (nn.Dense's call) takes the VJP above."""
  is_dense = (rhs.ndim == 2 and preferred_element_type is None
              and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())))
  if is_dense and jax.default_backend() == 'cpu':
    return _matmul(lhs, rhs, precision)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
