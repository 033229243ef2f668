"""Times a Dense layer's weight gradient in both orientations, the choice lm.model.matmul makes.

  .venv/bin/python benchmarks/weight_grad.py [--shapes=384x128x512,384x512x128,...]

For x [M, I] and dy [M, O] it times lm.model.matmul.weight_gradient both ways: dW = x^T dy
computed directly ([I, O]) and as the transpose of dW^T = dy^T x ([O, I]), each jitted alone,
fastest of 5 rounds, and names the one lm picks (`matmul.transposes`: transposed when O < I).
Run it under a config's XLA_FLAGS (e.g. its parallel.xla_flags) to check that rule on another
machine.
"""

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.model import matmul  # pylint: disable=g-import-not-at-top

_SHAPES = flags.DEFINE_list(
    'shapes', ['384x128x512', '384x512x128', '2048x768x3072', '2048x3072x768', '384x128x65'],
    'MxIxO: tokens, input width, output width.')


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
    m, i, o = (int(d) for d in shape.split('x'))
    x_MxI = rng.standard_normal((m, i), np.float32)
    dy_MxO = rng.standard_normal((m, o), np.float32)
    times = {name: seconds(functools.partial(matmul.weight_gradient, transposed=transposed),
                           x_MxI, dy_MxO)
             for name, transposed in (('direct', False), ('transposed', True))}
    print(json.dumps({
        'shape': shape,
        'direct_us': round(times['direct'] * 1e6, 1),
        'transposed_us': round(times['transposed'] * 1e6, 1),
        'faster': min(times, key=times.get),
        'lm_picks': 'transposed' if matmul.transposes(i, o) else 'direct',
    }))


if __name__ == '__main__':
  app.run(main)
