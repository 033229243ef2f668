"""A tiny run trained through lm.train, shared by the eval and sample tests (and their CLI tests).

Training a 2-layer, 32-wide byte-level model for 20 steps on a generated text takes a few
seconds; checkpoints at steps 10 and 20 both carry a validation loss (so 'best' and 'all' have
something to choose from).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from configs import base
from lm import config as lm_config
from lm import train

SEQ_LEN = 32
OVERRIDES = dict(
    model=dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=64),
    data=dict(tokenizer='byte', seq_len=SEQ_LEN, val_fraction=0.2, prefetch=0),
    train=dict(steps=20, batch_size=8, log_every=10),
    optim=dict(warmup_steps=2, lr=3e-3),
    checkpoint=dict(every=10, keep=3, keep_best=1, async_save=False),
    eval=dict(every=10, batch_size=8),
    sample=dict(max_new_tokens=16, temperature=0.0),
)


def corpus_text(lines: int = 300) -> str:
  """A small, learnable text (repetitive words) with varied line lengths."""
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta']
  return ''.join(' '.join(words[(i + j) % len(words)] for j in range(i % 5 + 2)) + '.\n'
                 for i in range(lines))


def config_dict(directory: str, **sections: dict[str, Any]):
  """The tiny run's ConfigDict (corpus and token cache under `directory`)."""
  c = base.get_config()
  for section, values in OVERRIDES.items():
    c[section].update(values)
  corpus = os.path.join(directory, 'corpus.txt')
  if not os.path.exists(corpus):
    os.makedirs(directory, exist_ok=True)
    with open(corpus, 'w') as f:
      f.write(corpus_text())
  c.data.update(corpus=corpus, cache_dir=os.path.join(directory, 'cache'))
  for section, values in sections.items():
    c[section].update(values)
  return c


def config(directory: str, **sections: dict[str, Any]) -> lm_config.Config:
  return lm_config.Config.from_config_dict(config_dict(directory, **sections))


def train_run(directory: str, devices: Any = None, **sections: dict[str, Any]) -> str:
  """Trains the tiny run into directory/run and returns that workdir."""
  workdir = os.path.join(directory, 'run')
  train.train(config(directory, **sections), workdir, devices=devices, progress=False)
  return workdir


def write_config_file(directory: str, folder: pathlib.Path) -> pathlib.Path:
  """folder/tiny.py: a config file for run.py that builds this tiny run (data under directory)."""
  config_file = folder / 'tiny.py'
  config_file.write_text('from tests import trained_run\n\n\ndef get_config(arg=None):\n'
                         f'  return trained_run.config_dict({directory!r})\n')
  return config_file


def cli_env() -> dict[str, str]:
  """The environment run.py subprocesses get in tests: 8 fake CPU devices."""
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
              JAX_PLATFORMS='cpu')
