"""pmap data parallelism: 8 fake CPU devices must train exactly like one device."""

import dataclasses

import jax
import numpy as np
import pytest

from lm import parallel
from lm import train
from tests import train_fakes


def run_steps(config, devices, steps):
  """Losses and final params of `steps` optimizer steps on FakeData batches."""
  strategy = parallel.make(config, devices)
  state = train.create_state(config)
  state = state.replace(options=dataclasses.replace(state.options,
                                                    axis_name=strategy.axis_name))
  state = strategy.replicate(state)
  step_fn = strategy.compile(train.train_steps, donate_argnums=(0,))
  data = train_fakes.FakeData()
  losses = []
  for step in range(steps):
    batch = train._stack([data.train_batch(step, config.train.batch_size)])
    state, metrics = step_fn(state, strategy.shard(batch, batch_axis=1))
    losses.extend(strategy.first(metrics)['loss'])
  return np.array(losses), strategy.unreplicate(state.params)


@pytest.mark.skipif(jax.local_device_count() < 8, reason='needs 8 (fake) devices')
def test_pmap_on_8_devices_equals_one_device():
  config = train_fakes.tiny_config(train__batch_size=16)
  losses_8, params_8 = run_steps(config, jax.local_devices()[:8], steps=20)
  losses_1, params_1 = run_steps(config, jax.local_devices()[:1], steps=20)
  assert losses_8[-1] < losses_8[0] - 0.1  # it learns
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # Adam: tiny grads flip


def test_shard_splits_the_batch_axis_over_devices():
  config = train_fakes.tiny_config()
  strategy = parallel.make(config, jax.local_devices()[:4])
  x = np.arange(2 * 16 * 3).reshape(2, 16, 3)  # [K, B, T]
  sharded = strategy.shard({'x': x}, batch_axis=1)['x']
  assert sharded.shape == (4, 2, 4, 3)
  np.testing.assert_array_equal(np.asarray(sharded)[1, 0], x[0, 4:8])
  replicated = strategy.replicate({'w': np.ones((2, 3))})
  assert replicated['w'].shape == (4, 2, 3)
  assert strategy.unreplicate(replicated)['w'].shape == (2, 3)


def test_one_device_uses_jit_without_collectives():
  strategy = parallel.make(train_fakes.tiny_config(), jax.local_devices()[:1])
  assert strategy.axis_name is None
  assert strategy.shard({'x': np.zeros((2, 16, 3))}, batch_axis=1)['x'].shape == (2, 16, 3)


def test_mesh_strategy_is_not_implemented_yet():
  with pytest.raises(NotImplementedError, match='parallel.strategy=mesh is not implemented'):
    parallel.make(train_fakes.tiny_config(parallel__strategy='mesh'))


@pytest.mark.skipif(jax.local_device_count() < 8, reason='needs 8 (fake) devices')
def test_batch_not_divisible_by_devices_names_the_fix():
  config = train_fakes.tiny_config(train__batch_size=12)
  with pytest.raises(ValueError, match='train.batch_size=12 must be divisible by devices'):
    parallel.make(config, jax.local_devices()[:8])
