"""pmap and mesh strategies on 8 fake CPU devices: the same losses as one device, the state
created sharded, checkpoints that restore on other meshes, and errors that name the fix."""

import functools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm import checkpoint
from lm import config as lm_config
from lm import metrics
from lm import parallel
from lm import train
from tests import train_fakes

needs_8 = pytest.mark.skipif(jax.local_device_count() < 8, reason='needs 8 (fake) devices')


def mesh_config(data=-1, fsdp=1, tensor=1, expert=1, context=1, **overrides):
  return train_fakes.tiny_config(
      parallel__strategy='mesh', parallel__mesh_data=data, parallel__mesh_fsdp=fsdp,
      parallel__mesh_tensor=tensor, parallel__mesh_expert=expert,
      parallel__mesh_context=context, **overrides)


def run_steps(config, devices, steps):
  """Losses and final params (host) of `steps` optimizer steps on FakeData batches."""
  strategy = parallel.make(config, devices)
  state = strategy.init(functools.partial(train.create_state, config,
                                          axis_name=strategy.axis_name))
  step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
  data = train_fakes.FakeData()
  losses = []
  for step in range(steps):
    batch = train._stack([data.train_batch(step, config.train.batch_size)])
    state, metrics_ = step_fn(state, strategy.shard(batch, batch_axis=1))
    losses.extend(strategy.first(metrics_)['loss'])
  return np.array(losses), strategy.unreplicate(state.params)


@functools.lru_cache(maxsize=None)
def one_device(steps, **overrides):
  return run_steps(train_fakes.tiny_config(**overrides), jax.local_devices()[:1], steps)


def assert_params_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)  # Adam: tiny grads flip


def test_buckets_group_by_dtype_in_order_up_to_the_size():
  f32, bf16 = lambda n: jnp.zeros((n,), jnp.float32), lambda n: jnp.zeros((n,), jnp.bfloat16)
  leaves = [f32(100), bf16(10), f32(100), f32(300), bf16(10), f32(1)]  # 400, 20, 400, 1200 ... B
  assert parallel.buckets(leaves, 1000) == [[0, 2], [3], [5], [1, 4]]
  assert parallel.buckets(leaves, 1 << 20) == [[0, 2, 3, 5], [1, 4]]
  assert parallel.buckets([], 1000) == []


@pytest.mark.parametrize('bucket_bytes', [32 << 20, 1000])
def test_psum_tree_equals_psum_leaf_by_leaf_with_one_psum_a_bucket(monkeypatch, bucket_bytes):
  monkeypatch.setattr(parallel, 'CPU_BUCKET_BYTES', bucket_bytes)
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  tree = {'a': rng.normal(size=(n, 3, 50)).astype(np.float32),
          'b': [rng.normal(size=(n, 200)).astype(np.float32),
                rng.normal(size=(n, 7)).astype(jnp.bfloat16)],
          'c': rng.normal(size=(n,)).astype(np.float32)}
  ours = jax.pmap(lambda t: parallel.psum_tree(t, 'i'), axis_name='i')(tree)
  plain = jax.pmap(lambda t: jax.lax.psum(t, 'i'), axis_name='i')(tree)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  one_device = jax.tree.map(lambda x: x[0], tree)
  jaxpr = jax.make_jaxpr(lambda t: parallel.psum_tree(t, 'i'), axis_env=[('i', n)])(one_device)
  psums = [e for e in jaxpr.eqns if e.primitive.name == 'psum']
  assert len(psums) == len(parallel.buckets(jax.tree.leaves(one_device), bucket_bytes))


@needs_8
@pytest.mark.parametrize('name, config', [
    ('pmap', train_fakes.tiny_config()),
    ('data', mesh_config(data=8)),
    ('fsdp', mesh_config(data=1, fsdp=8)),
    ('tensor', mesh_config(data=4, tensor=2)),
    ('mixed', mesh_config(data=2, fsdp=2, tensor=2)),
    ('context', mesh_config(data=2, context=4)),  # ring attention over chunks of 4 tokens
    ('context=8', mesh_config(data=1, context=8)),
])
def test_every_strategy_on_8_devices_equals_one_device(name, config):
  losses, params = run_steps(config, jax.local_devices()[:8], steps=10)
  losses_1, params_1 = one_device(10)
  assert losses_1[-1] < losses_1[0] - 0.1  # it learns
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5, err_msg=name)
  assert_params_close(params, params_1)


@needs_8
@pytest.mark.parametrize('overrides, mesh', [
    # MoE with its experts along a mesh axis of their own (batch over data x expert).
    (dict(model__ffn='moe', model__num_experts=4, model__top_k=2),
     dict(data=2, expert=2, tensor=2)),
    # Unrolled layers, T5 relative positions (the 'relative_buckets' axis), GQA, SwiGLU, an
    # untied head, and micro-batches.
    (dict(model__scan_layers=False, model__pos_emb='relative', model__num_heads=4,
          model__num_kv_heads=2, model__ffn='swiglu', model__tie_embeddings=False,
          model__use_bias=False, train__grad_accum=2),
     dict(data=2, fsdp=2, tensor=2)),
    # Ring attention with what rides along the ring: T5 bias, GQA, a window, soft cap, blocks
    # of 3 within each chunk of 8, FSDP and tensor parallelism beside it.
    (dict(model__pos_emb='relative', model__num_heads=4, model__num_kv_heads=2,
          model__attention_window=5, model__attn_logit_softcap=10.0,
          model__attention_impl='blockwise', model__attention_block=3),
     dict(data=1, fsdp=2, context=2, tensor=2)),
])
def test_model_variants_on_a_mesh_equal_one_device(overrides, mesh):
  losses, params = run_steps(mesh_config(**mesh, **overrides), jax.local_devices()[:8], steps=3)
  losses_1, params_1 = one_device(3, **overrides)
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  assert_params_close(params, params_1)


@needs_8
@pytest.mark.parametrize('name, config', [
    ('pmap', train_fakes.tiny_config(model__matmul_precision='bfloat16')),
    ('mixed', mesh_config(data=2, fsdp=2, tensor=2, model__matmul_precision='bfloat16')),
    ('context', mesh_config(data=2, context=2, tensor=2, model__matmul_precision='bfloat16')),
])
def test_bf16_matmuls_on_8_devices_equal_one_device(name, config):
  """Under pmap each device runs the native kernel (where there is one), as one device does;
  on a mesh XLA's partitioned path sums the same rounded operands."""
  losses, params = run_steps(config, jax.local_devices()[:8], steps=5)
  losses_1, params_1 = one_device(5, model__matmul_precision='bfloat16')
  np.testing.assert_allclose(losses, losses_1, rtol=1e-4, err_msg=name)
  assert_params_close(params, params_1)
  f32_losses, _ = one_device(5)
  assert not np.array_equal(losses_1, f32_losses)  # the precision took effect


@needs_8
def test_fsdp_gathers_weights_and_keeps_activations_batch_sharded():
  """The model's residual-stream constraint: without it XLA follows FSDP's d_model-sharded
  weights and all-reduces whole-batch activations ([16, 16, 128] here) instead."""
  config = mesh_config(fsdp=8)
  strategy = parallel.make(config, jax.devices())
  state = strategy.init(functools.partial(train.create_state, config, axis_name=None))
  step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
  batch = train._stack([train_fakes.FakeData().train_batch(0, config.train.batch_size)])
  hlo = step_fn.lower(state, strategy.shard(batch, batch_axis=1)).compile().as_text()
  reduced = re.findall(r'= \w+\[([\d,]*)\]\S* all-reduce(?:-start)?\(', hlo)
  assert reduced and all(len(dims.split(',')) < 3 for dims in reduced), reduced
  assert ' all-gather' in hlo


def test_state_is_created_sharded_by_the_logical_rules():
  config = mesh_config(data=2, expert=2, tensor=2, model__ffn='moe', model__num_experts=4)
  strategy = parallel.make(config, jax.local_devices()[:8])
  state = strategy.init(functools.partial(train.create_state, config))
  spec = lambda x: tuple(x.sharding.spec)
  experts = state.params['layers']['ffn']['experts']
  assert spec(experts['gate']['kernel']) == (None, 'expert', 'fsdp', 'tensor')
  assert spec(state.params['embed']['embedding']) == ('tensor', 'fsdp')
  # Adam's moments follow their parameters; counts and the step are replicated.
  adam = state.opt_state[1][0]
  assert adam.mu['layers']['ffn']['experts']['gate']['kernel'].sharding == (
      experts['gate']['kernel'].sharding)
  assert spec(adam.count) == () and spec(state.step) == ()
  # Each device holds a quarter of an expert kernel: 2 experts x 2 tensor shards.
  kernel = experts['gate']['kernel']
  assert kernel.addressable_shards[0].data.size * 4 == kernel.size


@needs_8
def test_shard_places_each_batch_row_block_on_its_devices():
  strategy = parallel.make(mesh_config(data=2, fsdp=2, tensor=2), jax.local_devices()[:8])
  assert strategy.host_share(16) == (0, 1)  # one process loads the whole batch
  x = np.arange(2 * 16 * 3).reshape(2, 16, 3)  # [K, B, T]
  sharded = strategy.shard({'x': x}, batch_axis=1)['x']
  assert sharded.shape == (2, 16, 3)
  assert tuple(sharded.sharding.spec) == (None, ('data', 'fsdp', 'expert'), 'context')
  np.testing.assert_array_equal(strategy.unreplicate(sharded), x)
  pairs = strategy.shard({'x': np.zeros((2, 16, 2, 3))}, batch_axis=1)['x']  # DPO [K, B, 2, T]
  assert tuple(pairs.sharding.spec) == (None, ('data', 'fsdp', 'expert'), None, 'context')


def save_on_8_devices(workdir, config, step):
  """A fresh state created sharded over 8 devices, checkpointed at `step`; returns the state."""
  strategy = parallel.make(config, jax.local_devices()[:8])
  state = strategy.init(functools.partial(train.create_state, config))
  checkpointer = checkpoint.Checkpointer(str(workdir), config.checkpoint)
  train._save(checkpointer, strategy, state, step, config, eval_loss=None)
  checkpointer.close()
  return state


@needs_8
def test_a_checkpoint_saved_on_8_devices_restores_on_other_meshes(tmp_path):
  saved_with = mesh_config(data=1, fsdp=8)
  state = save_on_8_devices(tmp_path, saved_with, 5)
  expected = jax.device_get((state.params, state.opt_state))
  for devices, mesh in [(4, dict(data=2, tensor=2)), (1, dict(data=1))]:
    config = mesh_config(**mesh)
    target = parallel.make(config, jax.local_devices()[:devices])
    checkpointer = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
    restored, resumed = train._initial_state(config, checkpointer, target)
    checkpointer.close()
    assert resumed and int(target.first(restored.step)) == 5
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(
        target.shardings(restored))):
      assert leaf.sharding == sharding
    for x, y in zip(jax.tree.leaves(jax.device_get((restored.params, restored.opt_state))),
                    jax.tree.leaves(expected)):
      np.testing.assert_array_equal(x, y)


@needs_8
def test_a_mesh_run_is_evaluated_on_its_mesh_with_the_losses_of_one_device(tmp_path):
  from lm import evaluate  # pylint: disable=g-import-not-at-top
  config = mesh_config(data=2, fsdp=4)
  save_on_8_devices(tmp_path, config, 3)
  checkpoint.save_config(str(tmp_path), config)
  assert isinstance(evaluate.eval_strategy(config), parallel.MeshParallel)
  (on_mesh,) = evaluate.evaluate(str(tmp_path), data=train_fakes.FakeData(), write=False)
  (on_one,) = evaluate.evaluate(str(tmp_path), config=train_fakes.tiny_config(),
                                data=train_fakes.FakeData(), devices=jax.local_devices()[:1],
                                write=False)
  assert on_mesh['tokens'] == on_one['tokens'] > 0
  np.testing.assert_allclose(on_mesh['loss'], on_one['loss'], rtol=1e-5)


@needs_8
def test_training_resumed_on_4_devices_continues_a_run_from_8(tmp_path):
  """Trains 4 steps on an FSDP mesh of 8; a copy cut back to its step-2 checkpoint resumes on a
  data x tensor mesh of 4 and logs the same numbers (eval under the mesh included)."""
  overrides = dict(train__steps=4, train__log_every=1, checkpoint__every=2,
                   checkpoint__async_save=True, eval__every=2)
  reference = tmp_path / 'reference'
  train.train(mesh_config(data=1, fsdp=8, **overrides), str(reference),
              devices=jax.local_devices()[:8], data=train_fakes.FakeData(), progress=False)
  assert checkpoint.available_steps(str(reference)) == [2, 4]
  resumed = tmp_path / 'resumed'
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  train.train(mesh_config(data=2, tensor=2, **overrides), str(resumed),
              devices=jax.local_devices()[:4], data=train_fakes.FakeData(), progress=False)
  expected, records = metrics.read(str(reference)), metrics.read(str(resumed))
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for want, got in zip(expected[2:], records[2:]):
    for key in ('train/loss', 'train/grad_norm', 'eval/loss'):
      if key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_mesh_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r'parallel\.mesh_tensor.*only one mesh axis'):
    mesh_config(data=-1, tensor=-1)
  with pytest.raises(ValueError, match=r"parallel\.rules\.embed: 'fdsp' is not a mesh axis.*"
                                       r"Did you mean 'fsdp'"):
    train_fakes.tiny_config(parallel__strategy='mesh', parallel__rules={
        **base.get_config().parallel.rules.to_dict(), 'embed': 'fdsp'})
  raw = base.get_config().to_dict()
  raw['parallel']['rules']['embd'] = 'fsdp'
  with pytest.raises(ValueError, match=r'Unknown config key parallel\.rules\.embd.*Did you mean '
                                       r'parallel\.rules\.embed'):
    lm_config.Config.from_config_dict(raw)
  with pytest.raises(ValueError, match=r'parallel\.distributed.*parallel\.strategy=mesh'):
    train_fakes.tiny_config(parallel__distributed=True)


@needs_8
def test_mesh_startup_errors_name_sizes_and_the_fix():
  devices = jax.local_devices()[:8]
  with pytest.raises(ValueError, match=r'mesh_data=2 x mesh_fsdp=2 x mesh_expert=1 x '
                                       r'mesh_context=1 x mesh_tensor=1 has 4 devices, but '
                                       r'there are 8'):
    parallel.make(mesh_config(data=2, fsdp=2), devices)
  with pytest.raises(ValueError, match=r'3 does not divide 8'):
    parallel.make(mesh_config(fsdp=3), devices)
  mqa = mesh_config(data=4, tensor=2, model__num_kv_heads=1)
  with pytest.raises(ValueError, match=r"parameter layers/attn/key/bias \(2, 1, 16\) has axis 1 "
                                       r"\('kv_heads', size 1\) sharded over mesh axes tensor=2 "
                                       r"\(2 shards\).*rules\.kv_heads=''"):
    parallel.make(mqa, devices)
  with pytest.raises(ValueError, match=r'train\.batch_size=12 must be divisible by batch shards '
                                       r'\(mesh_data x mesh_fsdp x mesh_expert'):
    parallel.make(mesh_config(data=8, train__batch_size=12), devices)
  with pytest.raises(ValueError, match=r'data\.seq_len=16 does not split over mesh_context=6 '
                                       r'\(6 chunks, parallel\.rules\.length\)'):
    parallel.make(mesh_config(data=1, context=-1), devices[:6])


@needs_8
def test_batch_not_divisible_by_devices_names_the_fix():
  config = train_fakes.tiny_config(train__batch_size=12)
  with pytest.raises(ValueError, match='train.batch_size=12 must be divisible by devices'):
    parallel.make(config, jax.local_devices()[:8])


def test_one_device_pmap_uses_jit_without_collectives():
  strategy = parallel.make(train_fakes.tiny_config(), jax.local_devices()[:1])
  assert strategy.axis_name is None
  assert strategy.shard({'x': np.zeros((2, 16, 3))}, batch_axis=1)['x'].shape == (2, 16, 3)


@needs_8
def test_pmap_shard_splits_the_batch_axis_over_devices():
  strategy = parallel.make(train_fakes.tiny_config(), jax.local_devices()[:4])
  x = np.arange(2 * 16 * 3).reshape(2, 16, 3)  # [K, B, T]
  sharded = strategy.shard({'x': x}, batch_axis=1)['x']
  assert sharded.shape == (4, 2, 4, 3)
  np.testing.assert_array_equal(np.asarray(sharded)[1, 0], x[0, 4:8])
  replicated = strategy.replicate({'w': np.ones((2, 3))})
  assert replicated['w'].shape == (4, 2, 3)
  assert strategy.unreplicate(replicated)['w'].shape == (2, 3)
