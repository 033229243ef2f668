"""Times lm's bfloat16 matmul kernel against XLA's float32 and bfloat16 matmuls on CPU.

  taskset -c 1 .venv/bin/python benchmarks/bf16_matmul.py [--shapes=384x128x512,...] [--calls=100]

Each shape is M x K x N; each row gives GFLOP/s (from the fastest of --calls jitted calls) for
op(a) [M, K] @ op(b) [K, N] with a and b as stored: `nn` (both as is), `nt` (b stored [N, K]:
a projection's input gradient) and `tn` (a stored [K, M]: its weight gradient). XLA bf16 is
`lax.dot_general` on bfloat16 operands with float32 results. Pin to one core (taskset) to
compare with a device's share of shakespeare_char's data-parallel step.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.kernels import bf16_matmul  # pylint: disable=g-import-not-at-top

_SHAPES = flags.DEFINE_string(
    'shapes', '384x128x512,384x512x128,384x128x128,128x384x512,1024x1024x1024',
    'Comma-separated MxKxN; the defaults are shakespeare_char per device, and 1024^3.')
_CALLS = flags.DEFINE_integer('calls', 100, 'Timed calls per case.')


def _gflops(fn, a, b, flop: float) -> float:
  fn = jax.jit(fn)
  fn(a, b).block_until_ready()
  best = float('inf')
  for _ in range(_CALLS.value):
    start = time.perf_counter()
    fn(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return flop / best / 1e9


def main(argv):
  del argv
  print(f'native kernel: {bf16_matmul.native()}')
  print(f'{"M x K x N":>16} {"layout":>6} {"lm bf16":>8} {"XLA f32":>8} {"XLA bf16":>8}  GFLOP/s')
  for shape in _SHAPES.value.split(','):
    m, k, n = (int(d) for d in shape.split('x'))
    for layout in ('nn', 'nt', 'tn'):
      trans_a, trans_b = layout[0] == 't', layout[1] == 't'
      a = jnp.ones((k, m) if trans_a else (m, k), jnp.float32)
      b = jnp.ones((n, k) if trans_b else (k, n), jnp.float32)
      dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
      xla = lambda a, b, dims=dims: lax.dot_general(a, b, dims)
      xla_bf16 = lambda a, b, dims=dims: lax.dot_general(
          a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
          preferred_element_type=jnp.float32)
      ours = lambda a, b, ta=trans_a, tb=trans_b: bf16_matmul.matmul(a, b, ta, tb)
      flop = 2.0 * m * k * n
      rates = [_gflops(f, a, b, flop) for f in (ours, xla, xla_bf16)]
      print(f'{shape:>16} {layout:>6} ' + ' '.join(f'{r:8.0f}' for r in rates), flush=True)


if __name__ == '__main__':
  app.run(main)
