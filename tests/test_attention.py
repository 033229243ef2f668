"""Attention: causality, masks, GQA/MQA equivalences, KV-cache decoding, implementations."""

import math

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.config import Config
from lm.model import positions
from lm.model import attention
from lm.model.attention import Attention

POS_EMBS = ('sinusoidal', 'learned', 'rope', 'alibi', 'relative', 'none')
# Every test keeps to these shapes (and to DECODE_CHUNKS): eager ops compile once per shape.
B, T, D = 2, 8, 32
DECODE_CHUNKS = (3, 1, 1, 1, 1, 1)


def model_config(**overrides):
  cd = base.get_config()
  cd.model.update(d_model=D, num_heads=4, num_kv_heads=4, num_layers=2, pos_emb='rope')
  cd.model.update(overrides)
  return Config.from_config_dict(cd).model


def inputs(seed=0, length=T):
  x = jax.random.normal(jax.random.key(seed), (B, length, D))
  return x, jnp.broadcast_to(jnp.arange(length), (B, length))


def init(config, x, pos, **kwargs):
  return Attention(config).init(jax.random.key(1), x, pos, **kwargs)


def randomize_biases(params, seed=3):
  """Biases start at zero; make them matter so that tests see them."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  for i, (path, value) in enumerate(sorted(flat.items())):
    if path[-1] in ('bias', 'scale'):
      flat[path] = value + 0.1 * jax.random.normal(jax.random.key(seed + i), value.shape)
  return traverse_util.unflatten_dict(flat)


def test_param_names_shapes_and_axes():
  config = model_config(num_kv_heads=2, pos_emb='relative', qk_norm=True)
  x, pos = inputs()
  variables = init(config, x, pos)
  assert set(variables) == {'params'}
  params = variables['params']
  shapes_and_names = jax.tree.map(lambda p: (p.value.shape, p.names), params,
                                  is_leaf=lambda p: isinstance(p, nn.Partitioned))
  assert shapes_and_names == {
      'query': {'kernel': ((32, 4, 8), ('embed', 'heads', 'head_dim')),
                'bias': ((4, 8), ('heads', 'head_dim'))},
      'key': {'kernel': ((32, 2, 8), ('embed', 'kv_heads', 'head_dim')),
              'bias': ((2, 8), ('kv_heads', 'head_dim'))},
      'value': {'kernel': ((32, 2, 8), ('embed', 'kv_heads', 'head_dim')),
                'bias': ((2, 8), ('kv_heads', 'head_dim'))},
      'out': {'kernel': ((4, 8, 32), ('heads', 'head_dim', 'embed')),
              'bias': ((32,), ('embed',))},
      'query_norm': {'scale': ((8,), ('head_dim',))},
      'key_norm': {'scale': ((8,), ('head_dim',))},
      'relative_bias': ((32, 4), ('relative_buckets', 'heads')),
  }
  # GPT-2 init: the output projection is scaled down by sqrt(2 * num_layers) = 2.
  std_q = float(jnp.std(params['query']['kernel'].value))
  std_out = float(jnp.std(params['out']['kernel'].value))
  assert 0.015 < std_q < 0.025 and 0.0075 < std_out < 0.0125


def test_no_bias_and_param_dtype():
  config = model_config(use_bias=False, param_dtype='bfloat16', dtype='bfloat16')
  x, pos = inputs()
  variables = init(config, x, pos)
  params = nn.unbox(variables['params'])
  assert all('bias' not in p for p in params.values())
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  y = Attention(config).apply(variables, x, pos)
  assert y.dtype == jnp.bfloat16 and y.shape == (B, T, D)


def reference_attention(config, params, x, pos, seg):
  """Independent float64 loop over heads: scores, position bias, mask, softmax."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
  x = np.asarray(x, np.float64)
  q = np.einsum('btd,dnh->btnh', x, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('btd,dnh->btnh', x, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('btd,dnh->btnh', x, p['value']['kernel']) + p['value']['bias']
  if config.pos_emb == 'rope':
    inv_freq = positions.rope_frequencies(config)
    q = np.asarray(positions.apply_rope(jnp.asarray(q, jnp.float32), pos, inv_freq), np.float64)
    k = np.asarray(positions.apply_rope(jnp.asarray(k, jnp.float32), pos, inv_freq), np.float64)
  pos, seg = np.asarray(pos), np.asarray(seg)
  slopes = positions.alibi_slopes(config.num_heads)
  buckets = np.asarray(positions.relative_bucket(
      jnp.asarray(pos[:, None, :] - pos[:, :, None]), config.relative_num_buckets,
      config.relative_max_distance))
  group = config.num_heads // config.num_kv_heads
  y = np.zeros(q.shape)
  for b in range(x.shape[0]):
    for n in range(config.num_heads):
      kv = n // group
      for t in range(x.shape[1]):
        logits = np.full(x.shape[1], -np.inf)
        for s in range(t + 1):
          if pos[b, s] > pos[b, t] or seg[b, s] != seg[b, t]:
            continue
          if config.attention_window and pos[b, t] - pos[b, s] >= config.attention_window:
            continue
          stride = config.attention_stride
          if config.attention_pattern == 'fixed' and pos[b, t] // stride != pos[b, s] // stride \
              and pos[b, s] % stride < stride - config.attention_summary:
            continue
          logits[s] = q[b, t, n] @ k[b, s, kv] / math.sqrt(config.head_dim)
          if config.pos_emb == 'alibi':
            logits[s] -= slopes[n] * (pos[b, t] - pos[b, s])
          elif config.pos_emb == 'relative':
            logits[s] += p['relative_bias'][buckets[b, t, s], n]
        weights = np.exp(logits - logits.max())
        y[b, t, n] = (weights / weights.sum()) @ v[b, :, kv]
  return np.einsum('btnh,nhd->btd', y, p['out']['kernel']) + p['out']['bias']


FIXED = dict(attention_pattern='fixed', attention_stride=3, attention_summary=1)


@pytest.mark.parametrize('pos_emb,kv_heads,window,pattern', [
    ('rope', 2, 0, {}), ('alibi', 1, 0, {}), ('relative', 2, 3, {}), ('none', 4, 0, {}),
    ('rope', 2, 0, FIXED), ('alibi', 4, 0, dict(FIXED, attention_stride=4, attention_summary=2)),
    ('sinusoidal', 2, 3, dict(attention_pattern='local'))])
def test_matches_reference(pos_emb, kv_heads, window, pattern):
  config = model_config(pos_emb=pos_emb, num_kv_heads=kv_heads, attention_window=window,
                        relative_num_buckets=8, relative_max_distance=6, **pattern)
  x, pos = inputs()
  # Row 1 packs two documents with restarted positions.
  pos = pos.at[1].set(jnp.array([0, 1, 2, 0, 1, 2, 3, 4]))
  seg = jnp.array([[0] * T, [1, 1, 1, 2, 2, 2, 2, 2]])
  params = randomize_biases(init(config, x, pos)['params'])
  y = Attention(config).apply({'params': params}, x, pos, seg)
  np.testing.assert_allclose(y, reference_attention(config, params, x, pos, seg), atol=1e-5)


CAUSAL_CASES = [(p, k) for p in POS_EMBS for k in (4, 2, 1)]


@pytest.mark.parametrize('pos_emb,kv_heads', CAUSAL_CASES)
def test_causal(pos_emb, kv_heads):
  config = model_config(pos_emb=pos_emb, num_kv_heads=kv_heads)
  check_causal(config)


@pytest.mark.parametrize('overrides', [
    dict(attn_logit_softcap=0.5), dict(qk_norm=True), dict(qk_norm=True, pos_emb='alibi'),
    dict(attn_logit_softcap=0.5, attention_impl='dot_product_attention', num_kv_heads=2)])
def test_softcap_and_qk_norm_stay_causal(overrides):
  check_causal(model_config(**overrides))


def check_causal(config, t=5):
  x, pos = inputs()
  variables = init(config, x, pos)
  before = Attention(config).apply(variables, x, pos)
  after = Attention(config).apply(variables, x.at[:, t].add(1.0), pos)
  np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-6)
  assert np.all(np.abs(after[:, t:] - before[:, t:]).max(axis=-1) > 1e-4)


def test_softcap_and_qk_norm_change_the_output():
  x, pos = inputs()
  config = model_config()
  params = randomize_biases(init(config, x, pos)['params'])
  y = Attention(config).apply({'params': params}, 10 * x, pos)
  capped = Attention(model_config(attn_logit_softcap=0.1)).apply({'params': params}, 10 * x, pos)
  assert not np.allclose(y, capped, atol=1e-4)
  config = model_config(qk_norm=True)
  variables = init(config, x, pos)
  normed = Attention(config).apply(variables, 10 * x, pos)
  unnormed = Attention(model_config()).apply(
      {'params': {k: v for k, v in variables['params'].items() if 'norm' not in k}}, 10 * x, pos)
  assert not np.allclose(normed, unnormed, atol=1e-4)


def repeat_kv(params, group):
  """MHA weights equal to GQA ones: query head n reads KV head n // group."""
  params = nn.unbox(params)
  mha = dict(params)
  for name in ('key', 'value'):
    mha[name] = {'kernel': jnp.repeat(params[name]['kernel'], group, axis=1),
                 'bias': jnp.repeat(params[name]['bias'], group, axis=0)}
  return mha


@pytest.mark.parametrize('pos_emb,kv_heads', [('rope', 2), ('alibi', 1), ('relative', 2)])
def test_gqa_equals_mha_with_repeated_kv(pos_emb, kv_heads):
  gqa = model_config(pos_emb=pos_emb, num_kv_heads=kv_heads)
  mha = model_config(pos_emb=pos_emb, num_kv_heads=4)
  x, pos = inputs()
  params = randomize_biases(init(gqa, x, pos)['params'])
  y_gqa = Attention(gqa).apply({'params': params}, x, pos)
  y_mha = Attention(mha).apply({'params': repeat_kv(params, 4 // kv_heads)}, x, pos)
  np.testing.assert_allclose(y_gqa, y_mha, atol=1e-6)


@pytest.mark.parametrize('pos_emb', ['rope', 'alibi', 'relative', 'none'])
def test_document_mask(pos_emb):
  config = model_config(pos_emb=pos_emb, num_kv_heads=2)
  x, _ = inputs()
  pos = jnp.broadcast_to(jnp.array([0, 1, 2, 0, 1, 2, 3, 4]), (B, T))
  seg = jnp.broadcast_to(jnp.array([1, 1, 1, 2, 2, 2, 2, 2]), (B, T))
  variables = init(config, x, pos)
  packed = Attention(config).apply(variables, x, pos, seg)
  # Each document alone, followed by unrelated tokens (which causality keeps out).
  alone_pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  junk = jax.random.normal(jax.random.key(9), (B, T, D))
  doc1 = Attention(config).apply(variables, junk.at[:, :3].set(x[:, :3]), alone_pos)
  doc2 = Attention(config).apply(variables, junk.at[:, :5].set(x[:, 3:]), alone_pos)
  np.testing.assert_allclose(packed[:, :3], doc1[:, :3], atol=1e-6)
  np.testing.assert_allclose(packed[:, 3:], doc2[:, :5], atol=1e-6)


def test_restarted_positions_without_segments_stay_causal():
  """Index order guards causality even when a later token has a smaller position."""
  config = model_config()
  x, _ = inputs()
  pos = jnp.broadcast_to(jnp.array([0, 1, 2, 3, 0, 1, 2, 3]), (B, T))
  variables = init(config, x, pos)
  y = Attention(config).apply(variables, x, pos)
  y2 = Attention(config).apply(variables, x.at[:, 6].add(1.0), pos)
  np.testing.assert_allclose(y[:, :6], y2[:, :6], atol=1e-6)


@pytest.mark.parametrize('pos_emb', ['rope', 'alibi', 'relative'])
def test_sliding_window(pos_emb):
  window, t = 3, 2
  config = model_config(pos_emb=pos_emb, attention_window=window, num_kv_heads=2)
  x, pos = inputs()
  variables = init(config, x, pos)
  y = Attention(config).apply(variables, x, pos)
  y2 = Attention(config).apply(variables, x.at[:, t].add(1.0), pos)
  np.testing.assert_allclose(y2[:, :t], y[:, :t], atol=1e-6)
  assert np.all(np.abs(y2[:, t:t + window] - y[:, t:t + window]).max(axis=-1) > 1e-4)
  np.testing.assert_allclose(y2[:, t + window:], y[:, t + window:], atol=1e-6)


def decode_all(config, variables, x, pos, seg=None, chunks=DECODE_CHUNKS, jit=False):
  """Prefill and step through the cache in `chunks` (token counts), concatenating outputs."""
  cache = init(config, x, pos, decode=True)['cache']
  model = Attention(config)

  def step(cache, x, pos, seg):
    y, mutated = model.apply({'params': variables['params'], 'cache': cache}, x, pos, seg,
                             decode=True, mutable=['cache'])
    return y, mutated['cache']

  step = jax.jit(step) if jit else step
  ys, start = [], 0
  for n in chunks:
    part = lambda a: None if a is None else a[:, start:start + n]
    y, cache = step(cache, part(x), part(pos), part(seg))
    ys.append(y)
    start += n
  assert int(cache['cache_index']) == start
  return jnp.concatenate(ys, axis=1)


DECODE_CASES = [(p, 2, 0) for p in POS_EMBS] + [
    ('rope', 1, 0), ('alibi', 1, 0), ('rope', 2, 3), ('relative', 1, 3), ('alibi', 2, 2)]


@pytest.mark.parametrize('pos_emb,kv_heads,window', DECODE_CASES)
def test_decode_matches_full_forward(pos_emb, kv_heads, window):
  config = model_config(pos_emb=pos_emb, num_kv_heads=kv_heads, attention_window=window)
  x, pos = inputs()
  variables = init(config, x, pos)
  full = Attention(config).apply(variables, x, pos)
  decoded = decode_all(config, variables, x, pos)
  np.testing.assert_allclose(decoded, full, atol=1e-5)


def test_decode_with_offset_positions_and_padding():
  """Left-padded rows (segment 0) with positions starting after the pads."""
  config = model_config(pos_emb='alibi', num_kv_heads=2, attention_impl='dot_product_attention')
  x, _ = inputs()
  pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 2, 3, 4, 5]])
  seg = jnp.array([[1] * T, [0, 0] + [1] * 6])
  variables = init(config, x, pos)
  full = Attention(config).apply(variables, x, pos, seg)
  decoded = decode_all(config, variables, x, pos, seg)
  np.testing.assert_allclose(decoded, full, atol=1e-5)


def test_jit_matches_eager():
  config = model_config(pos_emb='relative', num_kv_heads=2, attention_window=4)
  x, pos = inputs()
  variables = init(config, x, pos)
  apply = lambda v, x, pos: Attention(config).apply(v, x, pos)
  eager = apply(variables, x, pos)
  np.testing.assert_allclose(jax.jit(apply)(variables, x, pos), eager, atol=1e-6)
  decoded = decode_all(config, variables, x, pos, chunks=(2, 3, 1, 2), jit=True)
  np.testing.assert_allclose(decoded, eager, atol=1e-5)


@pytest.mark.parametrize('pos_emb,kv_heads,window', [
    ('rope', 4, 5), ('alibi', 2, 0), ('relative', 1, 3)])
def test_xla_matches_dot_product_attention(pos_emb, kv_heads, window):
  x, pos = inputs()
  pos = pos.at[1].set(jnp.array([0, 1, 2, 3, 0, 1, 2, 3]))
  seg = jnp.array([[0] * T, [1] * 4 + [2] * 4])
  overrides = dict(pos_emb=pos_emb, num_kv_heads=kv_heads, attention_window=window)
  xla = model_config(attention_impl='xla', **overrides)
  dpa = model_config(attention_impl='dot_product_attention', **overrides)
  params = randomize_biases(init(xla, x, pos)['params'])
  np.testing.assert_allclose(Attention(dpa).apply({'params': params}, x, pos, seg),
                             Attention(xla).apply({'params': params}, x, pos, seg), atol=1e-5)


def test_cudnn_is_refused_off_gpu_and_outside_16_bits():
  with pytest.raises(ValueError, match='computes in 16 bits only'):
    model_config(attention_impl='cudnn')
  with pytest.raises(ValueError, match='no logit soft cap'):
    model_config(attention_impl='cudnn', dtype='bfloat16', attn_logit_softcap=30.0)
  config = model_config(attention_impl='cudnn', dtype='bfloat16')
  x, pos = inputs()
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
      init(config, x, pos)


def test_dropout():
  config = model_config(attn_dropout=0.5)
  x, pos = inputs()
  variables = init(config, x, pos)
  model = Attention(config)
  plain = Attention(model_config()).apply(variables, x, pos)
  np.testing.assert_allclose(model.apply(variables, x, pos), plain, atol=1e-6)
  drop = lambda seed: model.apply(variables, x, pos, deterministic=False,
                                  rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(drop(0), plain, atol=1e-4)
  assert not np.allclose(drop(0), drop(1), atol=1e-4)
  np.testing.assert_allclose(drop(0), drop(0))


def test_attention_weights_hook():
  config = model_config(num_kv_heads=2)
  x, pos = inputs()
  variables = init(config, x, pos)
  _, state = Attention(config).apply(variables, x, pos, mutable=['attention_weights'])
  (probs,) = state['attention_weights']['probs']
  assert probs.shape == (B, 4, T, T)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0


class Layer(nn.Module):
  config: object
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT):
    return x_BxTxD + Attention(self.config, name='attention')(
        x_BxTxD, positions_BxT, decode=self.decode), None


def scanned(config, decode=False):
  return nn.scan(Layer, variable_axes={'params': 0, 'cache': 0},
                 split_rngs={'params': True}, in_axes=nn.broadcast, length=2,
                 metadata_params={nn.PARTITION_NAME: 'layers'})(config, decode)


def test_under_scan_with_cache():
  config = model_config(pos_emb='rope', num_kv_heads=2)
  x, pos = inputs()
  # Shapes and axis names of the scanned parameters (eval_shape: nothing is compiled).
  kernel = jax.eval_shape(scanned(config).init, jax.random.key(0), x, pos)['params'][
      'attention']['query']['kernel']
  assert kernel.value.shape == (2, D, 4, 8)
  assert kernel.names == ('layers', 'embed', 'heads', 'head_dim')
  # Two layers' parameters, stacked; the reference runs them one after the other.
  layers = [nn.unbox(Attention(config).init(jax.random.key(i), x, pos)['params'])
            for i in range(2)]
  variables = {'params': {'attention': jax.tree.map(lambda *p: jnp.stack(p), *layers)}}
  full = x
  for layer_params in layers:
    full = full + Attention(config).apply({'params': layer_params}, full, pos)
  # Decoding init only needs the cache's shapes (zeros, index 0): no compile.
  cache_shapes = jax.eval_shape(scanned(config, decode=True).init, jax.random.key(0), x, pos)
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache_shapes['cache'])
  assert cache['attention']['cached_key'].shape == (2, B, T, 2, 8)

  @jax.jit
  def step(cache, x, pos):
    (y, _), mutated = scanned(config, decode=True).apply(
        {'params': variables['params'], 'cache': cache}, x, pos, mutable=['cache'])
    return y, mutated['cache']

  y1, cache = step(cache, x[:, :5], pos[:, :5])
  ys = [y1]
  for t in range(5, T):
    y, cache = step(cache, x[:, t:t + 1], pos[:, t:t + 1])
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, atol=1e-5)


def test_fixed_pattern_mask_equals_brute_force():
  """Child et al. (2019): own block, plus the last `summary` positions of earlier blocks."""
  pos = jnp.arange(12)[None]
  seg = jnp.zeros((1, 12), jnp.int32)
  mask = np.asarray(attention.attention_mask(pos, pos, seg, seg, pos[0], pos[0], stride=4,
                                             summary=2))[0]
  expected = np.array([[s <= t and (s // 4 == t // 4 or s % 4 >= 2) for s in range(12)]
                       for t in range(12)])
  np.testing.assert_array_equal(mask, expected)
  assert mask[9].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize('overrides', [
    dict(pattern='local', window=0), dict(pattern='fixed', stride=0),
    dict(pattern='fixed', stride=4, summary=5), dict(pattern='fixed', stride=4, window=8)])
def test_pattern_errors_name_the_key(overrides):
  keys = dict(pattern='attention_pattern', window='attention_window',
              stride='attention_stride', summary='attention_summary')
  with pytest.raises(ValueError, match='model.attention_'):
    model_config(**{keys[k]: v for k, v in overrides.items()})


BLOCKWISE_CASES = [
    ('rope', 2, dict(), 3), ('alibi', 1, dict(attention_window=3), 4),
    ('relative', 4, dict(attn_logit_softcap=2.0), 8), ('none', 2, FIXED, 5),
    ('sinusoidal', 1, dict(qk_norm=True), 16)]


@pytest.mark.parametrize('pos_emb,kv_heads,overrides,block', BLOCKWISE_CASES)
def test_blockwise_equals_xla_forward_and_gradients(pos_emb, kv_heads, overrides, block):
  """Blocks that do not divide T, packed documents and every bias: values and gradients."""
  x, pos = inputs()
  pos = pos.at[1].set(jnp.array([0, 1, 2, 0, 1, 2, 3, 4]))
  seg = jnp.array([[0] * T, [1, 1, 1, 2, 2, 2, 2, 2]])
  common = dict(pos_emb=pos_emb, num_kv_heads=kv_heads, relative_num_buckets=8,
                relative_max_distance=6, **overrides)
  xla = model_config(attention_impl='xla', **common)
  blocks = model_config(attention_impl='blockwise', attention_block=block, **common)
  params = randomize_biases(init(xla, x, pos)['params'])

  def loss(config, params, x):
    y = Attention(config).apply({'params': params}, x, pos, seg)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  np.testing.assert_allclose(Attention(blocks).apply({'params': params}, x, pos, seg),
                             Attention(xla).apply({'params': params}, x, pos, seg), atol=1e-5)
  grads = [jax.grad(loss, argnums=(1, 2))(c, params, x) for c in (blocks, xla)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)


def test_blockwise_decodes_from_the_cache():
  config = model_config(pos_emb='alibi', num_kv_heads=2, attention_impl='blockwise',
                        attention_block=3)
  x, pos = inputs()
  variables = init(config, x, pos)
  full = Attention(model_config(pos_emb='alibi', num_kv_heads=2)).apply(variables, x, pos)
  np.testing.assert_allclose(decode_all(config, variables, x, pos), full, atol=1e-5)


def test_fixed_pattern_decodes_from_the_cache():
  config = model_config(pos_emb='rope', num_kv_heads=2, **FIXED)
  x, pos = inputs()
  variables = init(config, x, pos)
  np.testing.assert_allclose(decode_all(config, variables, x, pos),
                             Attention(config).apply(variables, x, pos), atol=1e-5)
