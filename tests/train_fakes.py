"""Shared by the train, parallel, checkpoint and fault tests: tiny configs, an in-memory Data,
and saved states.

FakeData honours lm.data.Data's contract (train_batch a pure function of (seed, step),
train_iterator from any step, eval_batches with a zero-weight padded tail) without a corpus
or tokenizer, so step-level tests compile only the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Iterator

import jax
import numpy as np

from configs import base
from lm import checkpoint
from lm import config as lm_config
from lm import train

SEQ_LEN = 16
VOCAB = 64


def tiny_config(**overrides: Any) -> lm_config.Config:
  """A 2-layer, 32-wide model on 16-token windows; overrides as section__key=value (or seed=...)."""
  c = base.get_config()
  c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=SEQ_LEN,
                 vocab_size=VOCAB)
  c.data.update(seq_len=SEQ_LEN, tokenizer='byte', corpus='unused', prefetch=0)
  c.train.update(steps=20, batch_size=16, log_every=1)
  c.optim.update(warmup_steps=2, lr=3e-3)
  c.checkpoint.update(every=10, async_save=False)
  c.eval.update(every=10, batch_size=16, max_batches=2)
  for name, value in overrides.items():
    if '__' in name:
      section, key = name.split('__')
      c[section][key] = value
    else:
      c[name] = value
  return lm_config.Config.from_config_dict(c)


@dataclasses.dataclass
class Tokenizer:
  vocab_size: int = VOCAB
  eos_id: int = 0


class FakeData:
  """Batches of a learnable synthetic language: every odd token is its predecessor + 1."""

  def __init__(self, seed: int = 0, val_batches: int = 3, poison_from: int | None = None,
               poison_steps: Collection[int] = ()):
    self.tokenizer = Tokenizer()
    self.bytes_per_token = 1.0
    self.seed, self.val_batches, self.poison_from = seed, val_batches, poison_from
    self.poison_steps = frozenset(poison_steps)

  def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step])
    tokens = rng.integers(1, VOCAB, (batch_size, SEQ_LEN + 1)).astype(np.int32)
    tokens[:, 1::2] = tokens[:, 0:-1:2] % (VOCAB - 1) + 1
    weights = np.ones((batch_size, SEQ_LEN), np.float32)
    weights[:, :2] = 0.5  # uneven token weights: token-weighted means must stay exact
    if self.poison_from is not None and step >= self.poison_from:
      weights[0, 0] = np.inf  # an Inf loss from this step on
    if step in self.poison_steps:
      weights[0, 0] = np.nan  # a NaN loss at just these steps
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights}

  def train_iterator(self, start_step: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every batch from start_step on (lm.data's contract)."""
    step = start_step
    while True:
      yield _rows(self.train_batch(step, batch_size), process_index, process_count)
      step += 1

  def eval_batches(self, batch_size: int, seq_len: int | None = None, process_index: int = 0,
                   process_count: int = 1):
    del seq_len
    for i in range(self.val_batches):
      batch = self.train_batch(10**6 + i, batch_size)
      if i == self.val_batches - 1:
        batch['weights'][batch_size // 2:] = 0.0
      yield _rows(batch, process_index, process_count)


def _rows(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
  """The index-th of count equal row blocks, as lm.data hands each host its share."""
  size = len(batch['inputs']) // count
  return {k: v[index * size:(index + 1) * size] for k, v in batch.items()}


def saved_state(workdir: Any, steps: Collection[int], losses: list[float | None] | None = None,
                **overrides: Any) -> tuple[lm_config.Config, train.TrainState]:
  """Saves a fresh state of tiny_config(**overrides) at each step (with its eval loss)."""
  config = tiny_config(**overrides)
  state = jax.device_get(train.create_state(config))
  checkpointer = checkpoint.Checkpointer(str(workdir), config.checkpoint)
  for i, step in enumerate(steps):
    checkpointer.save(step, state.params, state.opt_state, {'rng': [1, 2], 'data_step': step},
                      eval_loss=None if losses is None else losses[i])
  checkpointer.close()
  return config, state


def assert_trees_equal(a: Any, b: Any) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
