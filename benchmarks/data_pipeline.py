"""Is the data path ever the bottleneck? Times `prepare` and the batch iterators.

  python benchmarks/data_pipeline.py [--config=configs/default.py] [--config.data.x=...]
      [--train_tokens_per_sec=100000] [--batches=300]

Cold `prepare` runs on an empty temporary cache (tokenizer training + tokenization), warm
`prepare` on the filled one with a new workdir (what a second `make run` does). The iterators
must deliver at least 10x the tokens per second of a training step; a small model trains at
very roughly 50-100k tokens/s on 2 CPU cores, hence the default reference.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not an installed package

from lm import config as lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import data as lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'default.py'), 'Run config.', lock_config=True)
_TRAIN_RATE = flags.DEFINE_float(
    'train_tokens_per_sec', 100_000, 'Training throughput to compare against (tokens/s).')
_BATCHES = flags.DEFINE_integer('batches', 300, 'Batches timed per iterator.')
_REQUIRED_RATIO = 10.0


def _rate(iterator, batches: int) -> tuple[float, float]:
  """Tokens/s and ms per batch over `batches` batches, after one warm-up batch."""
  next(iterator)
  tokens, start = 0, time.perf_counter()
  for _ in range(batches):
    tokens += next(iterator)['inputs'].size
  seconds = time.perf_counter() - start
  return tokens / seconds, 1000 * seconds / batches


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the figures below say it all
  with tempfile.TemporaryDirectory() as tmp:
    cd = _CONFIG.value
    with cd.unlocked():
      cd.data.cache_dir = os.path.join(tmp, 'cache')
    config = lm_config.Config.from_config_dict(cd)
    d, batch_size = config.data, config.train.batch_size

    start = time.perf_counter()
    data = lm_data.prepare(config, os.path.join(tmp, 'cold'))
    cold = time.perf_counter() - start
    start = time.perf_counter()
    lm_data.prepare(config, os.path.join(tmp, 'warm'))
    warm = time.perf_counter() - start
    stats = data.stats
    print(f'corpus {d.corpus}: {stats.get("train_documents", "?")} + '
          f'{stats.get("val_documents", "?")} files, {stats.get("train_bytes", 0):,} + '
          f'{stats.get("val_bytes", 0):,} bytes (train + val), {stats["train_tokens"]:,} + '
          f'{stats["val_tokens"]:,} tokens, {data.bytes_per_token:.2f} bytes/token')
    print(f'prepare cold {cold:.1f} s (tokenizer {data.tokenizer.name}: '
          f'{stats.get("tokenizer_seconds", 0):.1f} s, tokenize '
          f'{stats.get("tokenize_seconds", 0):.1f} s); warm {warm:.2f} s')

    results = {'prepare_cold_s': cold, 'prepare_warm_s': warm,
               'tokenizer_s': stats.get('tokenizer_seconds'),
               'tokenize_s': stats.get('tokenize_seconds'), 'stats': stats}
    required = _REQUIRED_RATIO * _TRAIN_RATE.value
    print(f'\nbatch {batch_size} x seq_len {d.seq_len}; required >= {required:,.0f} tokens/s '
          f'({_REQUIRED_RATIO:.0f} x {_TRAIN_RATE.value:,.0f})')
    print(f'{"iterator":36s} {"tokens/s":>14s} {"ms/batch":>9s} {"x train":>8s}')
    ok = True
    for packing in (False, True):
      cd_mode = _CONFIG.value
      with cd_mode.unlocked():
        cd_mode.data.packing = packing
      mode_config = lm_config.Config.from_config_dict(cd_mode)
      mode_data = lm_data.prepare(mode_config, None)
      mode = 'packing' if packing else 'windows'
      calls = {
          f'train_batch ({mode}, no prefetch)': _steps(mode_data, batch_size),
          f'train_iterator ({mode}, prefetch {d.prefetch})':
              mode_data.train_iterator(0, batch_size),
          f'eval_batches ({mode})': _cycle(lambda m=mode_data: m.eval_batches(batch_size)),
      }
      for name, iterator in calls.items():
        rate, ms = _rate(iterator, _BATCHES.value)
        ok &= rate >= required
        results[name] = rate
        print(f'{name:36s} {rate:14,.0f} {ms:9.3f} {rate / _TRAIN_RATE.value:8.0f}')
        if hasattr(iterator, 'close'):
          iterator.close()
    print(f'\n{"OK" if ok else "TOO SLOW"}: every iterator '
          f'{"delivers" if ok else "must deliver"} >= {_REQUIRED_RATIO:.0f}x the training rate.')
    print(json.dumps(results, default=str))


def _steps(data, batch_size):
  step = 0
  while True:
    yield data.train_batch(step, batch_size)
    step += 1


def _cycle(make):
  while True:
    yield from make()


if __name__ == '__main__':
  app.run(main)
