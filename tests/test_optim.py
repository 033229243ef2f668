"""Schedules, weight-decay and trainable masks, and every optimizer's wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib as optax_contrib
import pytest

from lm import optim
from lm import train
from tests import train_fakes


def lr_at(schedule, steps):
  return [float(schedule(s)) for s in steps]


@pytest.mark.parametrize('name, expected', [
    # steps=100, warmup=10, lr=1, min_lr_ratio=0.1
    ('cosine', {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1}),
    ('linear', {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1}),
    ('constant', {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    # wsd: decay over the last 20 steps
    ('wsd', {0: 0.0, 10: 1.0, 80: 1.0, 90: 0.55, 100: 0.1}),
])
def test_schedule_values(name, expected):
  config = train_fakes.tiny_config(optim__schedule=name, optim__lr=1.0, optim__warmup_steps=10,
                                   optim__min_lr_ratio=0.1, optim__decay_fraction=0.2,
                                   train__steps=100)
  schedule = optim.schedule(config)
  np.testing.assert_allclose(lr_at(schedule, expected), list(expected.values()), atol=1e-6)


def boxed_params(**overrides):
  return train.abstract_params(train_fakes.tiny_config(**overrides).model)


def test_weight_decay_mask_decays_kernels_only():
  params = jax.tree.map(lambda x: x, boxed_params(model__tie_embeddings=False))
  unboxed = optim.nn.meta.unbox(params)
  mask = optim.describe(unboxed, lambda p: optim.decays(p, decay_embeddings=False))
  assert mask['layers/attn/query/kernel'] and mask['layers/ffn/fc_in/kernel']
  assert mask['lm_head/kernel']
  assert not mask['embed/embedding'] and not mask['pos_embed/embedding']
  assert not mask['layers/attn_norm/scale'] and not mask['layers/attn_norm/bias']
  assert not mask['layers/ffn/fc_in/bias'] and not mask['final_norm/scale']
  assert optim.decays('embed/embedding', decay_embeddings=True)
  assert not optim.decays('layers/attn/query/bias', decay_embeddings=True)


def test_adamw_mask_reaches_the_update():
  """No decay on a zero-gradient norm scale; decay on a zero-gradient kernel."""
  config = train_fakes.tiny_config(optim__weight_decay=0.5, optim__grad_clip=0.0,
                                   optim__warmup_steps=0)
  boxed = boxed_params()
  params = jax.tree.map(jnp.ones_like, optim.nn.meta.unbox(boxed))
  tx = optim.make_optimizer(config, boxed)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates['layers']['attn_norm']['scale']).max()) == 0.0
  assert float(updates['layers']['attn']['query']['kernel'].max()) < 0.0


def test_trainable_freezes_the_rest_without_optimizer_state():
  config = train_fakes.tiny_config(train__trainable=('attn/query', 'final_norm'),
                                   optim__grad_clip=0.0)
  state = train.create_state(config)
  before = jax.device_get(state.params)
  step = jax.jit(train.train_step)
  data = train_fakes.FakeData()
  for i in range(2):
    state, _ = step(state, data.train_batch(i, 16))
  after = jax.device_get(state.params)
  changed = optim.describe(after, lambda p: None)
  flat_before = dict(zip(changed, jax.tree.leaves(before)))
  flat_after = dict(zip(changed, jax.tree.leaves(after)))
  for path in changed:
    same = np.array_equal(flat_before[path], flat_after[path])
    assert same == (not ('attn/query' in path or 'final_norm' in path)), path
  # Optimizer moments exist only for the trainable leaves.
  state_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  trainable = [v for p, v in flat_after.items() if 'attn/query' in p or 'final_norm' in p]
  assert sum(x.size for x in state_arrays) == 2 * sum(x.size for x in trainable)


def test_trainable_pattern_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="train.trainable: 'atn' matches no parameter"):
    train.create_state(train_fakes.tiny_config(train__trainable=('atn',)))


def test_muon_orthogonalises_hidden_matrices_only():
  boxed = boxed_params(model__tie_embeddings=False)
  names = optim.logical_names(boxed)
  dims = {p: optim._muon_dims(names[p], p) for p in names}
  assert dims['layers/attn/query/kernel'] == optax_contrib.MuonDimensionNumbers((1,), (2, 3))
  assert dims['layers/attn/out/kernel'] == optax_contrib.MuonDimensionNumbers((1, 2), (3,))
  assert dims['layers/ffn/fc_in/kernel'] == optax_contrib.MuonDimensionNumbers((1,), (2,))
  assert dims['layers/ffn/fc_out/kernel'] == optax_contrib.MuonDimensionNumbers((1,), (2,))
  for path in ('embed/embedding', 'lm_head/kernel', 'layers/attn_norm/scale',
               'layers/ffn/fc_in/bias'):
    assert dims[path] is None, path


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'lion', 'muon'])
def test_every_optimizer_lowers_a_quadratic_loss(name):
  config = train_fakes.tiny_config(optim__name=name, optim__lr=1e-2, optim__warmup_steps=0,
                                   optim__schedule='constant')
  boxed = boxed_params()
  shapes = optim.nn.meta.unbox(boxed)
  keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes)))
  params = jax.tree.unflatten(jax.tree.structure(shapes), [
      0.5 * jax.random.normal(k, s.shape) for k, s in zip(keys, jax.tree.leaves(shapes))])
  tx = optim.make_optimizer(config, boxed)
  loss = lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  opt_state = tx.init(params)
  start = float(loss(params))
  for _ in range(5):
    params, opt_state = step(params, opt_state)
  assert float(loss(params)) < 0.95 * start


def random_tree(shapes, seed, scale=1.0):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(shapes)))
  return jax.tree.unflatten(jax.tree.structure(shapes), [
      scale * jax.random.normal(k, s.shape) for k, s in zip(keys, jax.tree.leaves(shapes))])


def test_adamw_equals_optax_adamw():
  """lm's AdamW (the skip inside it) takes optax.adamw's steps and keeps its state layout."""
  config = train_fakes.tiny_config(optim__weight_decay=0.3, optim__warmup_steps=2,
                                   train__steps=6)
  o = config.optim
  shapes = optim.nn.meta.unbox(boxed_params())
  params = random_tree(shapes, 0)
  mask = lambda tree: optim.decay_mask(tree, o.decay_embeddings)
  ours = optim.adamw(optim.schedule(config), o.b1, o.b2, o.eps, o.weight_decay, mask)
  reference = optax.adamw(optim.schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                          weight_decay=o.weight_decay, mask=mask)
  state, reference_state = ours.init(params), reference.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(reference_state)
  for step in range(4):
    grads = random_tree(shapes, step + 1, scale=0.1)
    updates, state = jax.jit(ours.update)(grads, state, params)
    expected, reference_state = jax.jit(reference.update)(grads, reference_state, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
                 (updates, state), (expected, reference_state))
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'lion', 'muon'])
def test_apply_false_skips_the_step(name):
  """Every optimizer's update takes `apply`: false gives zero updates and keeps the state."""
  config = train_fakes.tiny_config(optim__name=name, optim__warmup_steps=0)
  boxed = boxed_params()
  shapes = optim.nn.meta.unbox(boxed)
  params = random_tree(shapes, 0)
  tx = optim.make_optimizer(config, boxed)
  update = jax.jit(lambda g, s, p, apply: tx.update(g, s, p, apply=apply))
  _, state = update(random_tree(shapes, 1), tx.init(params), params, True)
  updates, kept = update(random_tree(shapes, 2), state, params, False)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, kept, state)
  updates, moved = update(random_tree(shapes, 2), state, params, True)
  assert any(np.any(u) for u in jax.tree.leaves(updates))
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(moved),
                                                       jax.tree.leaves(state)))


@pytest.mark.parametrize('scale', [0.01, 10.0])
def test_clip_by_global_norm_equals_optax(scale):
  shapes = optim.nn.meta.unbox(boxed_params())
  grads = random_tree(shapes, 3, scale=scale)
  clipped, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  expected, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), clipped, expected)
  assert float(optax.tree.norm(clipped)) == pytest.approx(min(1.0, float(optax.tree.norm(grads))),
                                                          rel=1e-5)
