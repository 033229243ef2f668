"""Tests for lm/model/transformer.py (and embed.py): the whole model on tiny configs."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.config import Config, ModelConfig
from lm.model import Transformer, unroll_layers

B, T = 2, 12
TOKENS = jax.random.randint(jax.random.key(7), (B, T), 0, 64)


def make_config(overrides: dict, seq_len: int = 16) -> ModelConfig:
  c = base.get_config()
  c.model.update(overrides)
  c.data.seq_len = seq_len
  return Config.from_config_dict(c).model


def tiny(**overrides) -> ModelConfig:
  return make_config(dict(dict(
      vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=4, d_ff=64,
      max_seq_len=32, num_experts=4, top_k=2, relative_max_distance=16), **overrides))


def count_params(config: ModelConfig) -> int:
  """Parameter count from shapes only: no weights are allocated."""
  shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


def random_params(config: ModelConfig, seed: int = 0):
  """Random weights from the parameter shapes alone.

  Compiling model.init costs seconds per config on CPU; tests that do not test the init itself
  fill the shapes instead. Scales near 1 and kernels of std 0.1 keep every path active and the
  logits O(1), so the comparisons below are sensitive.
  """
  shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), TOKENS)['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    center = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(center + rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


def empty_cache(model: nn.Module, params, tokens_BxS):
  """The KV cache for [B, S]: a decode call with a mutable, missing cache creates it."""
  positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
  _, variables = model.apply({'params': params}, tokens_BxS, positions_BxS, decode=True,
                             mutable=['cache'])
  return variables['cache']


# ---------------------------------------------------------------------------------------------
# Published sizes.

GPT2 = dict(vocab_size=50257, max_seq_len=1024, pos_emb='learned', norm='layernorm',
            use_bias=True, ffn='mlp', d_ff=0, tie_embeddings=True)
LLAMA = dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
             max_seq_len=4096, pos_emb='rope', norm='rmsnorm', ffn='swiglu', d_ff=11008,
             use_bias=False, tie_embeddings=False)
PRESETS = {
    'gpt2-small': (dict(GPT2, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12),
                   124_439_808),
    'gpt2-medium': (dict(GPT2, d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16),
                    354_823_168),
    'gpt2-large': (dict(GPT2, d_model=1280, num_layers=36, num_heads=20, num_kv_heads=20),
                   774_030_080),
    'gpt2-xl': (dict(GPT2, d_model=1600, num_layers=48, num_heads=25, num_kv_heads=25),
                1_557_611_200),
    'llama2-7b': (LLAMA, 6_738_415_616),
    'llama3-8b': (dict(LLAMA, vocab_size=128256, num_kv_heads=8, d_ff=14336,
                       rope_theta=500000.0), 8_030_261_248),
    'mixtral-8x7b': (dict(LLAMA, num_kv_heads=8, ffn='moe', num_experts=8, top_k=2,
                          expert_ffn='swiglu', d_ff=14336), 46_702_792_704),
}


@pytest.mark.parametrize('name', list(PRESETS))
def test_preset_param_counts(name):
  overrides, expected = PRESETS[name]
  assert count_params(make_config(overrides)) == expected


def test_tied_and_untied_differ_by_vocab_times_d_model():
  tied = count_params(tiny(tie_embeddings=True))
  assert count_params(tiny(tie_embeddings=False)) - tied == 64 * 32


def test_vocab_size_zero_is_a_clear_error():
  config = dataclasses.replace(tiny(), vocab_size=0)
  with pytest.raises(ValueError, match='model.vocab_size is 0.*with_vocab_size'):
    Transformer(config).init(jax.random.key(0), TOKENS)


def test_out_of_range_ids_give_nan_not_a_valid_row():
  config = tiny(scan_layers=False)
  model = Transformer(config)
  params = random_params(config)
  assert np.all(np.isfinite(model.apply({'params': params}, TOKENS)))
  logits = model.apply({'params': params}, TOKENS.at[0, 3].set(-1).at[1, 5].set(64))
  assert np.all(np.isnan(logits[0, 3])) and np.all(np.isnan(logits[1, 5]))


def test_param_tree_and_logical_axes():
  config = tiny(pos_emb='learned', ffn='moe', tie_embeddings=False, num_layers=2)
  params = jax.eval_shape(Transformer(config).init, jax.random.key(0), TOKENS)['params']
  assert set(params) == {'embed', 'pos_embed', 'layers', 'final_norm', 'lm_head'}
  assert set(params['layers']) == {'attn_norm', 'attn', 'ffn_norm', 'ffn'}
  known = {'vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'expert', 'layers', None}
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f'{where} has no logical axis names'
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known, where
    assert (leaf.names[0] == 'layers') == where.startswith("['layers']"), where
  assert params['layers']['ffn']['experts']['up']['kernel'].names == (
      'layers', 'expert', 'embed', 'mlp')
  assert params['lm_head']['kernel'].names == ('embed', 'vocab')


def test_unrolled_param_names():
  config = tiny(num_layers=3, scan_layers=False, norm_position='post', norm='rmsnorm')
  params = jax.eval_shape(Transformer(config).init, jax.random.key(0), TOKENS)['params']
  assert set(params) == {'embed', 'pos_embed', 'layer_0', 'layer_1', 'layer_2'}


# ---------------------------------------------------------------------------------------------
# Every position scheme x attention variant, with the FFN kinds spread so that every pair of
# (pos_emb, attention, ffn) values appears at least once: 18 cases instead of 54. These run
# eagerly (one layer, unrolled: XLA compiles each small op once for all cases) except where jit
# is what is tested.

POS_EMBS = ['sinusoidal', 'learned', 'rope', 'alibi', 'relative', 'none']
KV_HEADS = {'mha': 4, 'gqa': 2, 'mqa': 1}
FFNS = ['mlp', 'swiglu', 'moe']
CASES = [(pos, attn, FFNS[(i + j) % 3])
         for i, pos in enumerate(POS_EMBS) for j, attn in enumerate(KV_HEADS)]


@functools.lru_cache(maxsize=None)
def _built(pos: str, attn: str, ffn: str):
  """Model, params, an empty KV cache for [B, T] and the eager logits of TOKENS."""
  # MoE alternates dropless and capacity = T (the dispatch path, no drops): both exact.
  config = tiny(pos_emb=pos, num_kv_heads=KV_HEADS[attn], ffn=ffn, scan_layers=False,
                capacity_factor=0.0 if POS_EMBS.index(pos) % 2 else 2.0)
  model = Transformer(config)
  params = random_params(config)
  return model, params, empty_cache(model, params, TOKENS), model.apply({'params': params},
                                                                        TOKENS)


@pytest.mark.parametrize('case', CASES, ids='-'.join)
def test_causal(case):
  model, params, _, logits = _built(*case)
  changed = model.apply({'params': params}, TOKENS.at[:, 7].set((TOKENS[:, 7] + 1) % 64))
  np.testing.assert_allclose(logits[:, :7], changed[:, :7], atol=1e-6, rtol=0)
  assert not np.allclose(logits[:, 7:], changed[:, 7:], atol=1e-6)


# Jit costs a compile per model: these six still cover every value of every factor.
JIT_CASES = [(pos, list(KV_HEADS)[i % 3], FFNS[i % 3]) for i, pos in enumerate(POS_EMBS)]


@pytest.mark.parametrize('case', JIT_CASES, ids='-'.join)
def test_jit_matches_eager(case):
  model, params, _, eager = _built(*case)
  assert eager.dtype == jnp.float32 and eager.shape == (B, T, 64)
  jitted = jax.jit(model.apply)({'params': params}, TOKENS)
  np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=1e-5)


def _decode(model, params, cache, tokens, prefill, step_fn=None):
  """Logits from prefilling `prefill` tokens into the KV cache, then one token at a time."""

  def step(cache, tokens_BxT, positions_BxT):
    logits, variables = model.apply({'params': params, 'cache': cache}, tokens_BxT,
                                    positions_BxT, decode=True, mutable=['cache'])
    return logits, variables['cache']

  step = step_fn(step) if step_fn else step
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, cache = step(cache, tokens[:, :prefill], positions[:, :prefill])
  out = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = step(cache, tokens[:, t:t + 1], positions[:, t:t + 1])
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize('case', CASES, ids='-'.join)
def test_kv_cache_decode_matches_full_forward(case):
  model, params, cache, logits = _built(*case)
  np.testing.assert_allclose(_decode(model, params, cache, TOKENS, prefill=5), logits,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_kv_cache_decode_deep(scan_layers):
  config = tiny(num_layers=2, scan_layers=scan_layers, pos_emb='rope', num_kv_heads=2,
                ffn='swiglu')
  model = Transformer(config)
  params = random_params(config)
  decoded = _decode(model, params, empty_cache(model, params, TOKENS), TOKENS, prefill=3,
                    step_fn=jax.jit)
  np.testing.assert_allclose(decoded, model.apply({'params': params}, TOKENS),
                             atol=1e-5, rtol=1e-5)


def test_cache_from_init_is_empty():
  """Callers build the cache with init(decode=True); it must equal the one decoding creates."""
  config = tiny(pos_emb='rope', num_kv_heads=2)
  model = Transformer(config)
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), TOKENS)
  cache = empty_cache(model, random_params(config), TOKENS)
  assert jax.tree_util.tree_structure(shapes['cache']) == jax.tree_util.tree_structure(cache)
  assert all(a.shape == b.shape and not np.any(b) for a, b in zip(
      jax.tree_util.tree_leaves(shapes['cache']), jax.tree_util.tree_leaves(cache)))


def test_decode_without_positions_is_an_error():
  model = Transformer(tiny())
  params = jax.eval_shape(model.init, jax.random.key(0), TOKENS)['params']
  with pytest.raises(ValueError, match='positions'):
    jax.eval_shape(functools.partial(model.apply, decode=True, mutable=['cache']),
                   {'params': params, 'cache': {}}, TOKENS[:, :1])


# ---------------------------------------------------------------------------------------------
# Layer stacking, remat, norms, dtypes, heads.


@pytest.mark.parametrize('ffn', ['mlp', 'moe'])
def test_scan_matches_unrolled(ffn):
  config = tiny(num_layers=2, ffn=ffn, pos_emb='relative', capacity_factor=1.0)
  params = random_params(config)
  assert params['layers']['attn_norm']['scale'].shape == (2, 32)
  scanned = Transformer(config).apply({'params': params}, TOKENS)
  unrolled_config, unrolled_params = unroll_layers(config, params)
  unrolled = Transformer(unrolled_config).apply({'params': unrolled_params}, TOKENS)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)


def test_scanned_init_differs_per_layer():
  config = tiny(num_layers=2, ffn='moe')
  params = nn.unbox(jax.jit(Transformer(config).init)(jax.random.key(0), TOKENS)['params'])
  for kernel in (params['layers']['attn']['query']['kernel'],
                 params['layers']['ffn']['experts']['up']['kernel']):
    assert not np.allclose(kernel[0], kernel[1])
  assert not np.allclose(params['layers']['ffn']['experts']['up']['kernel'][0, 0],
                         params['layers']['ffn']['experts']['up']['kernel'][0, 1])


@functools.lru_cache(maxsize=None)
def _logits_and_grads(config: ModelConfig):
  """Jitted under scan; eager when unrolled (remat applies either way, and eager ops are cached
  across policies where each scanned variant would need its own compile)."""
  model = Transformer(config)
  weights_BxTxV = jax.random.normal(jax.random.key(3), (B, T, 64))

  def loss(p):
    logits = model.apply({'params': p}, TOKENS)
    return jnp.sum(logits * weights_BxTxV), logits

  params = random_params(dataclasses.replace(config, remat='none'))  # the same for all
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (_, logits), grads = (jax.jit(grad_fn) if config.scan_layers else grad_fn)(params)
  return logits, grads


@pytest.mark.parametrize('scan_layers,remat', [
    (True, 'full'), (True, 'dots'), (True, 'dots_no_batch'),
    (False, 'full'), (False, 'dots'), (False, 'dots_no_batch')])
def test_remat_policies_give_identical_logits_and_grads(scan_layers, remat):
  config = tiny(num_layers=2, scan_layers=scan_layers, ffn='swiglu', pos_emb='rope')
  logits, grads = _logits_and_grads(config)
  logits_r, grads_r = _logits_and_grads(dataclasses.replace(config, remat=remat))
  np.testing.assert_allclose(logits_r, logits, atol=1e-6, rtol=1e-6)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), grads_r, grads)


@pytest.mark.parametrize('position', ['pre', 'post'])
def test_norm_position(position):
  """Post-norm blocks end normalised (so no final norm); pre-norm leaves the stream raw."""
  config = tiny(num_layers=2, scan_layers=False, norm_position=position)
  model = Transformer(config)
  params = random_params(config)
  assert ('final_norm' in params) == (position == 'pre')
  params['layer_1']['ffn_norm'] = {'scale': jnp.ones(32), 'bias': jnp.zeros(32)}
  logits, state = model.apply({'params': params}, TOKENS, capture_intermediates=True)
  assert np.all(np.isfinite(logits))
  h_BxTxD = state['intermediates']['layer_1']['__call__'][0]
  normalised = np.allclose(h_BxTxD.std(-1), 1.0, atol=1e-2) and np.allclose(
      h_BxTxD.mean(-1), 0.0, atol=1e-4)
  assert normalised == (position == 'post')


def test_bf16_compute_returns_float32_logits():
  config = tiny(dtype='bfloat16', ffn='moe', scan_layers=False)
  model = Transformer(config)
  variables = {'params': random_params(config)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype('float32')}
  logits = model.apply(variables, TOKENS)
  assert logits.dtype == jnp.float32
  full = Transformer(dataclasses.replace(config, dtype='float32')).apply(variables, TOKENS)
  np.testing.assert_allclose(logits, full, atol=0.05)
  assert not np.array_equal(logits, full)  # the bf16 path really ran in bf16


def test_bf16_params():
  config = tiny(dtype='bfloat16', param_dtype='bfloat16', ffn='moe', pos_emb='relative')
  shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), TOKENS)
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('bfloat16')}
  logits = jax.eval_shape(Transformer(config).apply, shapes, TOKENS)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('tie', [True, False])
def test_head(tie):
  config = tiny(tie_embeddings=tie, final_logit_softcap=0.0, scan_layers=False)
  model = Transformer(config)
  params = random_params(config)
  logits, state = model.apply({'params': params}, TOKENS, capture_intermediates=True)
  h_BxTxD = state['intermediates']['final_norm']['__call__'][0]
  head_DxV = params['embed']['embedding'].T if tie else params['lm_head']['kernel']
  np.testing.assert_allclose(logits, h_BxTxD @ head_DxV, atol=1e-5, rtol=1e-5)
  capped = Transformer(dataclasses.replace(config, final_logit_softcap=0.05)).apply(
      {'params': params}, TOKENS)
  np.testing.assert_allclose(capped, 0.05 * np.tanh(logits / 0.05), atol=1e-6, rtol=1e-5)


def test_dropout_only_when_not_deterministic():
  config = tiny(embed_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1, scan_layers=False)
  model = Transformer(config)
  variables = {'params': random_params(config)}
  clean = model.apply(variables, TOKENS)
  np.testing.assert_array_equal(model.apply(variables, TOKENS, deterministic=True), clean)
  noisy = [model.apply(variables, TOKENS, deterministic=False,
                       rngs={'dropout': jax.random.key(s)}) for s in (1, 1, 2)]
  np.testing.assert_array_equal(noisy[0], noisy[1])
  assert not np.allclose(noisy[0], clean) and not np.allclose(noisy[0], noisy[2])


@pytest.mark.parametrize('pos,ffn', [('learned', 'moe'), ('sinusoidal', 'mlp'),
                                     ('rope', 'swiglu'), ('alibi', 'mlp'),
                                     ('relative', 'swiglu'), ('none', 'mlp')])
def test_packed_documents_match_separate_runs(pos, ffn):
  config = tiny(pos_emb=pos, ffn=ffn, num_layers=2, capacity_factor=0.0, scan_layers=False)
  model = Transformer(config)
  params = random_params(config)
  forward = lambda t, p, s: model.apply({'params': params}, t, p, s)
  n1 = 5
  positions = jnp.concatenate([jnp.arange(n1), jnp.arange(T - n1)])[None].repeat(B, 0)
  segments = jnp.concatenate([jnp.ones(n1, jnp.int32), jnp.full(T - n1, 2)])[None].repeat(B, 0)
  packed = forward(TOKENS, positions, segments)
  doc2 = TOKENS[:, n1:]
  alone = forward(doc2, positions[:, n1:], None)
  np.testing.assert_allclose(packed[:, n1:], alone, atol=1e-5, rtol=1e-5)
  doc1 = forward(TOKENS[:, :n1], None, None)
  np.testing.assert_allclose(packed[:, :n1], doc1, atol=1e-5, rtol=1e-5)
