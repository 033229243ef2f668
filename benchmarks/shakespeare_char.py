"""Trains configs/shakespeare_char.py and prints speed and validation loss.

  .venv/bin/python benchmarks/shakespeare_char.py [--workdir=DIR] [--config.train.steps=N ...]

The reference is nanoGPT's CPU recipe for the same model (4 layers, 4 heads, 128 wide,
64-token context, batch 12, 2000 iterations): about 30 ms per iteration here and a validation
loss of about 1.88 (nanoGPT's estimate_loss on random batches; ours scores the whole split).
The config's parallel.xla_flags apply here as under run.py (they override $XLA_FLAGS), and the
run is data-parallel over the local devices they give.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm import config as lm_config  # pylint: disable=g-import-not-at-top
from lm import metrics
from lm import parallel
from lm import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'shakespeare_char.py'),
    'Config file (default: configs/shakespeare_char.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default a fresh temporary one.')


def summarize(workdir: str, wall_seconds: float, matmul_precision: str = 'float32') -> dict:
  """Speed over the log intervals after the first (which holds the compile): the mean, and the
  median, which a busy neighbour on a shared machine or a background checkpoint write moves
  less."""
  records = metrics.read(workdir)
  timed = [r for r in records if r.get('train/step_time_ms') is not None][1:] or records
  evals = [r for r in records if 'eval/loss' in r]
  values = lambda key: [r[key] for r in timed if r.get(key) is not None]
  mean = lambda key: float(np.mean(values(key)))
  return {
      'ms_per_step': mean('train/step_time_ms'),
      'ms_per_step_median': float(np.median(values('train/step_time_ms'))),
      'tokens_per_sec': mean('train/tokens_per_sec'),
      'mfu': mean('train/mfu'),
      'final_val_loss': evals[-1]['eval/loss'],
      'final_train_loss': records[-1]['train/loss'],
      'steps': records[-1]['step'],
      'wall_seconds': wall_seconds,
      'peak_flops_measured': metrics.measured_cpu_flops(
          matmul_precision=matmul_precision),
      'device': jax.local_devices()[0].device_kind,
      'devices': jax.local_device_count(),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = lm_config.Config.from_config_dict(_CONFIG.value)
  parallel.use_xla_flags(config.parallel.xla_flags)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='shakespeare_char_')
  start = time.perf_counter()
  train.train(config, workdir)
  print(json.dumps(summarize(workdir, time.perf_counter() - start,
                             config.model.matmul_precision), indent=2))


if __name__ == '__main__':
  app.run(main)
