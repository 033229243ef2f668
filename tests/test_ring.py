"""Ring attention on 8 fake CPU devices: equal to full attention, forward and gradients, for
every mask and position bias; chunks after the queries are skipped; errors name the fix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import model as lm_model
from lm import parallel
from lm import train
from lm.model import attention
from lm.model import positions
from lm.model import ring
from tests import train_fakes

needs_8 = pytest.mark.skipif(jax.local_device_count() < 8, reason='needs 8 (fake) devices')
B, T, N, H = 2, 32, 4, 8  # T: 8 chunks of 4 on a ring of 8, or 4 chunks of 8 on a ring of 4
BUCKETS, MAX_DISTANCE = 8, 16


def context_mesh(data: int, context: int) -> jax.sharding.Mesh:
  return jax.make_mesh((data, context), ('data', lm_config.CONTEXT_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.local_devices()[:data * context])


def packed(starts_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(segment ids, positions) of rows whose documents start where `starts_BxT` is True."""
  index_T = np.arange(starts_BxT.shape[1])
  last_start_BxT = np.maximum.accumulate(np.where(starts_BxT, index_T, 0), axis=1)
  return (np.cumsum(starts_BxT, axis=1).astype(np.int32),
          (index_T - last_start_BxT).astype(np.int32))


def inputs(num_kv_heads: int, documents: bool):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k = jax.random.normal(keys[1], (B, T, num_kv_heads, H))
  v = jax.random.normal(keys[2], (B, T, num_kv_heads, H))
  table = 0.5 * jax.random.normal(keys[3], (BUCKETS, N))
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  segment_ids_BxT = jnp.ones((B, T), jnp.int32)
  if documents:  # packed rows: documents that cross chunk boundaries, positions restarting
    starts = np.zeros((B, T), bool)
    starts[0, [0, 7, 19]] = starts[1, [0, 3, 4, 30]] = True
    segment_ids_BxT, positions_BxT = packed(starts)
  return (q, k, v, table), positions_BxT, segment_ids_BxT


def position_bias(pos_emb, table):
  """(bias_fn, bias_arrays) as Attention hands them to the ring."""
  if pos_emb == 'alibi':
    return positions.alibi_bias, (positions.alibi_slopes(N),)
  if pos_emb == 'relative':
    return functools.partial(attention.relative_bias, num_buckets=BUCKETS,
                             max_distance=MAX_DISTANCE), (table,)
  return None, ()


def full_attention(q, k, v, table, positions_BxT, segment_ids_BxT, *, pos_emb, mask, softcap,
                   block):
  """The reference: one [B, T, S] mask and attention_probs' softmax."""
  del block
  order_T = jnp.arange(T)
  mask = attention.attention_mask(positions_BxT, positions_BxT, segment_ids_BxT,
                                  segment_ids_BxT, order_T, order_T, **mask)
  bias_fn, bias_arrays = position_bias(pos_emb, table)
  probs = attention.attention_probs(q, k, mask, None if bias_fn is None else bias_fn(
      positions_BxT, positions_BxT, *bias_arrays), softcap)
  return jnp.einsum('BKGTS,BSKH->BTKGH', probs, v).reshape(q.shape)


def ring_attention(q, k, v, table, positions_BxT, segment_ids_BxT, *, pos_emb, mask, softcap,
                   block):
  mask_fn = functools.partial(attention.attention_mask, **mask)
  return ring.attention(q, k, v, positions_BxT, segment_ids_BxT, mask_fn,
                        *position_bias(pos_emb, table), block, softcap)


def value_and_grads(fn, args, positions_BxT, segment_ids_BxT, **options):
  """fn's output and the gradients of a weighted sum of it w.r.t. q, k, v and the bias table."""
  weights = jax.random.normal(jax.random.key(7), (B, T, N, H))

  def loss(*a):
    out = fn(*a, positions_BxT, segment_ids_BxT, **options)
    return jnp.sum(weights * out), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  return out, grads


@needs_8
@pytest.mark.parametrize('mesh, num_kv_heads, documents, options', [
    ((1, 8), N, False, dict()),  # causal MHA over a ring of 8
    ((2, 4), 2, True, dict()),  # GQA, packed documents; batch over data, ring of 4
    ((1, 8), 1, True, dict(mask=dict(window=6), softcap=5.0)),  # MQA, window across chunks
    ((2, 4), 2, False, dict(mask=dict(stride=6, summary=2))),  # Sparse Transformer's fixed
    ((2, 4), 2, True, dict(pos_emb='alibi', block=3)),  # ALiBi; chunks of 8 in blocks of 3
    ((1, 8), 2, True, dict(pos_emb='relative')),  # T5 buckets: the table's gradient too
], ids=['causal', 'gqa-documents', 'mqa-window-softcap', 'fixed-pattern', 'alibi-blocks',
        'relative'])
def test_ring_equals_full_attention_forward_and_gradients(mesh, num_kv_heads, documents,
                                                          options):
  options = dict(dict(pos_emb='none', mask={}, softcap=0.0, block=0), **options)
  args, positions_BxT, segment_ids_BxT = inputs(num_kv_heads, documents)
  want, want_grads = value_and_grads(full_attention, args, positions_BxT, segment_ids_BxT,
                                     **options)
  with jax.set_mesh(context_mesh(*mesh)):
    got, got_grads = value_and_grads(ring_attention, args, positions_BxT, segment_ids_BxT,
                                     **options)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for name, g, w in zip(('q', 'k', 'v', 'table'), got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
  if options['pos_emb'] == 'relative':
    assert float(jnp.abs(got_grads[3]).sum()) > 0


@needs_8
def test_chunks_after_the_queries_are_skipped():
  """Device i folds in chunks 0..i only: 1 + 2 + ... + 8 = 36 of the 64 chunk pairs."""
  folds = []

  def counting_mask(*args):
    jax.debug.callback(lambda i: folds.append(int(i)), jax.lax.axis_index('context'))
    return attention.attention_mask(*args)

  (q, k, v, _), positions_BxT, segment_ids_BxT = inputs(N, documents=False)
  with jax.set_mesh(context_mesh(1, 8)):
    jax.block_until_ready(jax.jit(lambda q, k, v: ring.attention(
        q, k, v, positions_BxT, segment_ids_BxT, counting_mask, None))(q, k, v))
  jax.effects_barrier()
  assert sorted(folds) == sorted(i for i in range(8) for _ in range(i + 1))


def packed_batch(batch_size: int) -> dict[str, np.ndarray]:
  """FakeData rows cut into documents (segment ids, restarting positions) across chunks."""
  batch = train_fakes.FakeData().train_batch(0, batch_size)
  seq_len = batch['inputs'].shape[1]
  starts = np.zeros((batch_size, seq_len), bool)
  starts[:, 0] = starts[::2, 5] = starts[1::2, 11] = True
  batch['segment_ids'], batch['positions'] = packed(starts)
  return batch


def loss_and_grads(config):
  """The model's token-weighted loss and its gradients for one packed batch."""
  model = lm_model.Transformer(config.model)

  def fn(params, batch):
    def loss(params):
      logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                           batch['segment_ids'])
      return train.weighted_cross_entropy(logits, batch['targets'], batch['weights'])
    return jax.value_and_grad(loss)(params)
  return fn


@needs_8
@pytest.mark.parametrize('mesh, overrides', [
    (dict(data=2, context=4), dict(pos_emb='rope', num_heads=4, num_kv_heads=2)),
    (dict(data=1, context=8), dict(pos_emb='relative', attention_impl='blockwise',
                                   attention_block=1, ffn='swiglu')),
], ids=['data2-context4-rope-gqa', 'context8-relative-blockwise'])
def test_model_loss_and_gradients_equal_one_device(mesh, overrides):
  """The Transformer under MeshParallel (ring attention, [B, T] inputs split over data x
  context) gives one device's loss and gradients on packed documents."""
  model = {f'model__{k}': v for k, v in overrides.items()}
  one = train_fakes.tiny_config(**model)
  config = train_fakes.tiny_config(
      parallel__strategy='mesh', parallel__mesh_data=mesh['data'],
      parallel__mesh_context=mesh['context'], **model)
  params = train.init_params(one.model, seed=0)
  batch = packed_batch(one.train.batch_size)
  want_loss, want_grads = jax.jit(loss_and_grads(one))(params, batch)

  strategy = parallel.make(config, jax.local_devices()[:8])
  sharded = strategy.shard(batch)
  assert tuple(sharded['inputs'].sharding.spec) == (('data', 'fsdp', 'expert'), 'context')
  step = strategy.compile(loss_and_grads(config))
  params = strategy.put(params)
  assert 'collective_permute' in step.lower(params, sharded).as_text()  # the ring, in use
  loss, grads = step(params, sharded)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_outside_a_mesh_there_is_one_context_shard():
  assert ring.context_shards() == 1


@needs_8
def test_a_sequence_that_does_not_split_over_the_ring_names_the_fix():
  q = jnp.zeros((1, 12, 1, 4))
  pos = jnp.zeros((1, 12), jnp.int32)
  with jax.set_mesh(context_mesh(1, 8)), pytest.raises(
      ValueError, match=r'parallel\.mesh_context=8 devices, but it has 12 positions'):
    ring.attention(q, q, q, pos, pos, attention.attention_mask, None)


@pytest.mark.parametrize('overrides, match', [
    (dict(parallel__mesh_context=2), r'parallel\.mesh_context: is 2.*parallel\.strategy=mesh'),
    (dict(parallel__strategy='mesh', parallel__mesh_context=3),
     r'data\.seq_len: 16 does not split into parallel\.mesh_context=3.*seq_len=18'),
    (dict(parallel__strategy='mesh', parallel__mesh_context=2, model__attn_dropout=0.1),
     r'model\.attn_dropout.*ring attention'),
    (dict(parallel__strategy='mesh', parallel__mesh_context=2,
          model__attention_impl='dot_product_attention'),
     r"model\.attention_impl.*Use 'xla'.*or 'blockwise'"),
])
def test_context_parallel_config_errors_name_the_key_and_fix(overrides, match):
  with pytest.raises(ValueError, match=match):
    train_fakes.tiny_config(**overrides)
