"""Times the compiled train step alone (no data pipeline, logging, evaluation or checkpoints).

  .venv/bin/python benchmarks/train_step.py [--config=configs/shakespeare_char.py]
      [--devices=N] [--calls=30] [--config.train.steps_per_call=K ...]

The config's parallel.xla_flags apply (as under run.py); the step runs data-parallel over the
first --devices local devices (default all) on random tokens, train.steps_per_call steps per
call. It prints the median and the fastest call per step: on a shared machine the median says
what a run gets and the minimum what the code can do, so compare two commits by running this
at each, alternately.
"""

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm import config as lm_config  # pylint: disable=g-import-not-at-top
from lm import parallel
from lm import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'shakespeare_char.py'),
    'Config file (default: configs/shakespeare_char.py).', lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', 0, 'Local devices to use; 0: all.')
_CALLS = flags.DEFINE_integer('calls', 30, 'Timed calls (after one that compiles).')
_VOCAB = 65  # shakespeare_char's characters; no tokenizer is loaded, the tokens are random


def main(argv):
  del argv
  config = lm_config.Config.from_config_dict(_CONFIG.value)
  parallel.use_xla_flags(config.parallel.xla_flags)
  if config.model.vocab_size <= 0:
    config = dataclasses.replace(config, model=lm_config.with_vocab_size(config.model, _VOCAB))
  devices = jax.local_devices()[:_DEVICES.value or None]
  strategy = parallel.make(config, devices)
  state = strategy.init(lambda params: train.create_state(
      config, params, axis_name=strategy.axis_name))
  step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
  k, b, t = config.train.steps_per_call, config.train.batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (k, b, t + 1))
  batch = strategy.shard({'inputs': tokens[..., :-1].astype(np.int32),
                          'targets': tokens[..., 1:].astype(np.int32),
                          'weights': np.ones((k, b, t), np.float32)}, batch_axis=1)
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  ms = []
  for _ in range(_CALLS.value):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    ms.append((time.perf_counter() - start) / k * 1e3)
  print(json.dumps({'ms_per_step_median': float(np.median(ms)), 'ms_per_step_min': min(ms),
                    'devices': len(devices), 'steps_per_call': k, 'batch_size': b,
                    'seq_len': t}, indent=2))


if __name__ == '__main__':
  app.run(main)
