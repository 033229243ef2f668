"""Tests for lm/model/moe.py against a loop-by-loop NumPy reference of top-k routing."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm.model
from configs import base
from lm.config import Config, ModelConfig
from lm.model import ffn as ffn_lib
from lm.model import moe as moe_lib


def tiny(**overrides) -> ModelConfig:
  c = base.get_config()
  c.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      d_ff=48, ffn='moe', num_experts=4, top_k=2, expert_ffn='swiglu',
                      use_bias=False))
  c.model.update(overrides)
  c.data.seq_len = 16
  return Config.from_config_dict(c).model


def _x(shape=(2, 16, 32), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _params(config, x, router_std=1.0):
  """Initialised MoE params with a sharp router, so routing is decisive and varied."""
  params = jax.tree_util.tree_map(
      np.asarray, nn.unbox(moe_lib.MoE(config).init(jax.random.key(0), x)['params']))
  rng = np.random.default_rng(0)
  params['router']['kernel'] = rng.normal(0, router_std, params['router']['kernel'].shape
                                          ).astype(np.float32)
  return params


def _apply(config, params, x, valid=None):
  y, state = moe_lib.MoE(config).apply({'params': params}, x, valid,
                                       mutable=['losses', 'intermediates'])
  return y, state


def _reference(config, params, x, valid=None):
  """Top-k with renormalised gates, per-sequence capacity filled in (token, choice) order;
  invalid (padding) tokens are skipped."""
  E, A = config.num_experts, config.top_k
  B, T, _ = x.shape
  expert_cls = ffn_lib.ffn_class(config.expert_ffn)
  out_EBTD = np.stack([
      np.asarray(expert_cls(config).apply(
          {'params': jax.tree_util.tree_map(lambda w, e=e: w[e], params['experts'])}, x))
      for e in range(E)])
  logits = np.asarray(x, np.float64) @ params['router']['kernel']
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  C = moe_lib.capacity(config, T)
  y = np.zeros(x.shape, np.float64)
  dropped = 0
  chosen = np.zeros(E)
  for b in range(B):
    count = np.zeros(E, int)
    for t in range(T):
      if valid is not None and not valid[b, t]:
        continue
      top = np.argsort(-probs[b, t], kind='stable')[:A]
      gates = probs[b, t, top] / probs[b, t, top].sum()
      for e, g in zip(top, gates):
        chosen[e] += 1
        if C and count[e] >= C:
          dropped += 1
          continue
        count[e] += 1
        y[b, t] += g * out_EBTD[e, b, t]
  return y, dropped, chosen / chosen.sum()


@pytest.mark.parametrize('expert_ffn', ['swiglu', 'mlp'])
@pytest.mark.parametrize('capacity_factor', [0.0, 0.5, 1.0, 100.0])
def test_matches_reference(capacity_factor, expert_ffn):
  config = tiny(capacity_factor=capacity_factor, expert_ffn=expert_ffn)
  x = _x()
  params = _params(config, x)
  y, state = _apply(config, params, x)
  y_ref, dropped, load = _reference(config, params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  sown = state['intermediates']
  assert int(sown['dropped_tokens'][0]) == dropped
  np.testing.assert_allclose(sown['expert_load'][0], load, rtol=1e-6)
  if capacity_factor == 0.5:  # C = ceil(0.5 * 16 * 2 / 4) = 4 slots: drops must happen
    assert moe_lib.capacity(config, 16) == 4 and dropped > 0
  if capacity_factor in (0.0, 100.0):
    assert dropped == 0


def test_padding_is_not_routed():
  """Invalid tokens take no capacity, get zero output and leave the statistics alone."""
  config = tiny(capacity_factor=0.5)
  x = _x()
  params = _params(config, x)
  valid = np.ones((2, 16), bool)
  valid[0, :6] = False  # left padding, as the sampler makes
  valid[1, 10:] = False  # right padding, as packing makes
  y, state = _apply(config, params, x, jnp.asarray(valid))
  y_ref, dropped, load = _reference(config, params, x, valid)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(y[~valid], 0.0)
  assert int(state['intermediates']['dropped_tokens'][0]) == dropped
  np.testing.assert_allclose(state['intermediates']['expert_load'][0], load, rtol=1e-6)
  # The statistics equal those of the valid tokens alone.
  _, alone = _apply(config, params, x[1:, :10])
  for name in ('router_aux_loss', 'router_z_loss'):
    _, masked = _apply(config, params, x[1:], jnp.asarray(valid[1:]))
    assert float(masked['losses'][name][0]) == pytest.approx(
        float(alone['losses'][name][0]), rel=1e-5)


def test_dropped_count_by_hand():
  """Top-1 over 2 experts, capacity 2: tokens 0,1,2 pick expert 0, token 3 expert 1."""
  config = tiny(num_experts=2, top_k=1, capacity_factor=1.0)  # C = ceil(4 * 1 / 2) = 2
  x = jnp.asarray([[[1.0] * 32, [2.0] * 32, [3.0] * 32, [-1.0] * 32]])
  params = _params(config, x)
  params['router']['kernel'] = np.tile([[1.0, -1.0]], (32, 1)).astype(np.float32)
  y, state = _apply(config, params, x)
  assert int(state['intermediates']['dropped_tokens'][0]) == 1
  np.testing.assert_allclose(state['intermediates']['expert_load'][0], [0.75, 0.25])
  np.testing.assert_array_equal(y[0, 2], 0.0)  # the third token for expert 0 is dropped
  assert np.all(np.abs(y[0, [0, 1, 3]]).sum(-1) > 0)


@pytest.mark.parametrize('expert_ffn', ['swiglu', 'mlp'])
@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_single_expert_equals_dense_ffn(expert_ffn, capacity_factor):
  config = tiny(num_experts=1, top_k=1, expert_ffn=expert_ffn, capacity_factor=capacity_factor,
                use_bias=True)
  x = _x()
  params = _params(config, x)
  assert params['experts'][{'swiglu': 'gate', 'mlp': 'fc_in'}[expert_ffn]]['kernel'].shape == (
      1, 32, 48)
  y, _ = _apply(config, params, x)
  dense_params = jax.tree_util.tree_map(lambda w: w[0], params['experts'])
  y_dense = ffn_lib.ffn_class(expert_ffn)(config).apply({'params': dense_params}, x)
  np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-6)


def test_capacity_dropping_is_causal():
  """Earlier tokens claim slots first, so a later token never changes an earlier output."""
  config = tiny(capacity_factor=0.5)
  x = _x()
  params = _params(config, x)
  y, state = _apply(config, params, x)
  assert int(state['intermediates']['dropped_tokens'][0]) > 0
  x2 = x.at[:, 9:].set(_x((2, 7, 32), seed=5))
  y2, _ = _apply(config, params, x2)
  np.testing.assert_array_equal(y[:, :9], y2[:, :9])
  assert not np.allclose(y[:, 9:], y2[:, 9:])


def test_aux_loss_is_one_for_uniform_routing_and_e_for_collapse():
  config = tiny(num_experts=4, top_k=1, capacity_factor=0.0)
  x = jnp.abs(_x())
  params = _params(config, x)
  params['router']['kernel'] = np.zeros_like(params['router']['kernel'])
  _, state = _apply(config, params, x)
  assert float(state['losses']['router_aux_loss'][0]) == pytest.approx(1.0, abs=1e-6)
  # Zero logits: logsumexp = log E for every token.
  assert float(state['losses']['router_z_loss'][0]) == pytest.approx(np.log(4)**2, rel=1e-5)

  params['router']['kernel'][:, 0] = 10.0  # every token sends everything to expert 0
  _, state = _apply(config, params, x)
  assert float(state['losses']['router_aux_loss'][0]) == pytest.approx(4.0, rel=1e-4)
  np.testing.assert_allclose(state['intermediates']['expert_load'][0], [1, 0, 0, 0])
  logits = np.asarray(x, np.float64) @ params['router']['kernel']
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  assert float(state['losses']['router_z_loss'][0]) == pytest.approx(np.mean(lse**2), rel=1e-5)


def test_router_and_expert_params():
  config = tiny(param_dtype='float32', dtype='bfloat16')
  boxed = moe_lib.MoE(config).init(jax.random.key(0), _x())['params']
  assert boxed['router']['kernel'].names == ('embed', None)
  assert 'bias' not in boxed['router']
  assert boxed['experts']['gate']['kernel'].names == ('expert', 'embed', 'mlp')
  assert boxed['experts']['down']['kernel'].names == ('expert', 'mlp', 'embed')
  gate = np.asarray(boxed['experts']['gate']['kernel'].value)
  assert not np.allclose(gate[0], gate[1]), 'experts must be initialised independently'
  y = moe_lib.MoE(config).apply(nn.unbox({'params': boxed}), _x())
  assert y.dtype == jnp.bfloat16


def _random(shapes):
  """Random weights for boxed parameter shapes (compiling model.init would cost seconds)."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    center = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(center + rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_sown_collections_survive_scan_and_remat(remat):
  config = tiny(num_layers=2, scan_layers=True, remat=remat, capacity_factor=0.5)
  model = lm.model.Transformer(config)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert set(variables) == {'params'}, 'init must not store sown values'
  variables = {'params': _random(variables['params'])}
  _, state = jax.jit(lambda v, t: model.apply(v, t, mutable=['losses', 'intermediates']))(
      variables, tokens)
  losses = lm.model.moe_losses(state)
  load_LxE = lm.model.expert_load(state)
  assert load_LxE.shape == (2, 4)
  np.testing.assert_allclose(load_LxE.sum(-1), 1.0, rtol=1e-6)
  assert state['losses']['layers']['ffn']['router_aux_loss'][0].shape == (2,)

  unrolled, params = lm.model.unroll_layers(config, variables['params'])
  unrolled = dataclasses.replace(unrolled, remat='none')
  _, state_u = lm.model.Transformer(unrolled).apply(
      {'params': params}, tokens, mutable=['losses', 'intermediates'])
  losses_u = lm.model.moe_losses(state_u)
  for name in ('router_aux_loss', 'router_z_loss'):
    assert float(losses[name]) == pytest.approx(float(losses_u[name]), rel=1e-5)
    per_layer = [float(state_u['losses'][f'layer_{i}']['ffn'][name][0]) for i in range(2)]
    assert float(losses[name]) == pytest.approx(sum(per_layer), rel=1e-5)
  np.testing.assert_allclose(lm.model.expert_load(state_u), load_LxE, rtol=1e-6)
  assert int(lm.model.dropped_tokens(state)) == int(lm.model.dropped_tokens(state_u)) > 0


def test_helpers_on_a_dense_model():
  config = tiny(ffn='swiglu')
  model = lm.model.Transformer(config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = {'params': _random(jax.eval_shape(model.init, jax.random.key(0), tokens)['params'])}
  _, state = model.apply(variables, tokens, mutable=['losses', 'intermediates'])
  assert {k: float(v) for k, v in lm.model.moe_losses(state).items()} == {
      'router_aux_loss': 0.0, 'router_z_loss': 0.0}
  assert lm.model.expert_load(state) is None
  assert int(lm.model.dropped_tokens(state)) == 0



def test_transformer_passes_padding_to_the_router():
  """Segment id 0 (padding) reaches the MoE: left padding changes no statistic or logit."""
  config = tiny(num_layers=1, scan_layers=False, capacity_factor=0.0, pos_emb='rope')
  model = lm.model.Transformer(config)
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, 64)
  params = _random(jax.eval_shape(model.init, jax.random.key(0), tokens)['params'])
  apply = jax.jit(functools.partial(model.apply, {'params': params},
                                    mutable=['losses', 'intermediates']))
  logits, state = apply(tokens)
  padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens], axis=1)
  positions = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.arange(8)[None]], axis=1)
  segments = (jnp.arange(12) >= 4).astype(jnp.int32)[None]
  logits_p, state_p = apply(padded, positions, segments)
  np.testing.assert_allclose(logits_p[:, 4:], logits, atol=1e-5, rtol=1e-5)
  for name, value in lm.model.moe_losses(state).items():
    assert float(lm.model.moe_losses(state_p)[name]) == pytest.approx(float(value), rel=1e-5)
  np.testing.assert_allclose(lm.model.expert_load(state_p), lm.model.expert_load(state),
                             rtol=1e-6)
