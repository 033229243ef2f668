"""Times a Dense layer's weight gradient in both orientations, the choice lm.model.matmul makes.

  .venv/bin/python benchmarks/weight_grad.py [--shapes=384x128x512,384x512x128,...]

For x [M, K] and dy [M, N] it times dW = x^T dy computed directly ([K, N]) and as the
transpose of dW^T = dy^T x ([N, K], then transposed), each jitted alone, fastest of 5 rounds.
lm.model.matmul takes the direct form when N >= K and the transposed one when N < K; run this
under a config's XLA_FLAGS (e.g. its parallel.xla_flags) to check that rule on another machine.
"""

import json
import time

from absl import app
from absl import flags
import jax
from jax import lax
import numpy as np

_SHAPES = flags.DEFINE_list(
    'shapes', ['384x128x512', '384x512x128', '2048x768x3072', '2048x3072x768', '384x128x65'],
    'MxKxN: tokens, input width, output width.')


def direct(x_MxK, dy_MxN):
  return lax.dot_general(x_MxK, dy_MxN, (((0,), (0,)), ((), ())))


def transposed(x_MxK, dy_MxN):
  return lax.optimization_barrier(lax.dot_general(dy_MxN, x_MxK, (((0,), (0,)), ((), ())))).T


def seconds(fn, *args) -> float:
  """Fastest of 5 rounds, each about 0.2 s of calls."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(3, int(0.2 / max(time.perf_counter() - start, 1e-6)))
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  for shape in _SHAPES.value:
    m, k, n = (int(d) for d in shape.split('x'))
    x_MxK = rng.standard_normal((m, k), np.float32)
    dy_MxN = rng.standard_normal((m, n), np.float32)
    times = {name: seconds(fn, x_MxK, dy_MxN) for name, fn in
             (('direct', direct), ('transposed', transposed))}
    print(json.dumps({
        'shape': shape,
        'direct_us': round(times['direct'] * 1e6, 1),
        'transposed_us': round(times['transposed'] * 1e6, 1),
        'faster': min(times, key=times.get),
        'lm_picks': 'direct' if n >= k else 'transposed',
    }))


if __name__ == '__main__':
  app.run(main)
