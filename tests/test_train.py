"""The train step (accumulation, scan, NaN skipping, dtypes) and the loop's logs and stops."""

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np
import optax
import pytest

from lm import checkpoint
from lm import config as lm_config
from lm import metrics
from lm import parallel
from lm import train
from tests import cli_runs
from tests import train_fakes


STEPS = jax.jit(train.train_steps, donate_argnums=(0,))  # one device; reused across tests
# The loop tests share one config, so they share its compiled steps.
LOOP_CONFIG = dict(train__steps=20, train__log_every=5, train__steps_per_call=5,
                   train__max_nan_steps=3, eval__every=10, checkpoint__every=10)


def run_steps(config, steps, start=0):
  """Losses and final params on one device, steps_per_call steps per compiled call."""
  state = train.create_state(config)
  step_fn = STEPS
  data, k = train_fakes.FakeData(), config.train.steps_per_call
  losses = []
  for step in range(start, start + steps, k):
    batch = train._stack([data.train_batch(s, config.train.batch_size)
                          for s in range(step, step + k)])
    state, m = step_fn(state, batch)
    losses.extend(np.asarray(m['loss']))
  return np.array(losses), jax.device_get(state.params)


def assert_trees_close(a, b, **tolerances):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **tolerances)


def test_grad_accumulation_and_steps_per_call_equal_plain_steps():
  """4 micro-batches equal the large batch; 5 steps per compiled call equal 5 calls."""
  losses_1, params_1 = run_steps(train_fakes.tiny_config(), steps=10)
  assert losses_1[-1] < losses_1[0]
  losses_4, params_4 = run_steps(train_fakes.tiny_config(train__grad_accum=4), steps=10)
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
  assert_trees_close(params_4, params_1, rtol=1e-3, atol=1e-4)  # Adam: tiny grads flip
  losses_5, params_5 = run_steps(
      train_fakes.tiny_config(train__steps_per_call=5, train__log_every=5), steps=10)
  np.testing.assert_allclose(losses_5, losses_1, rtol=1e-6)
  assert_trees_close(params_5, params_1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('optimizer', lm_config.OPTIMIZERS)
def test_non_finite_loss_skips_the_update(optimizer):
  state = train.create_state(train_fakes.tiny_config(optim__name=optimizer))
  good, poisoned = train_fakes.FakeData(), train_fakes.FakeData(poison_from=0)
  batch = lambda data, step: train._stack([data.train_batch(step, 16)])
  state, _ = STEPS(state, batch(good, 0))
  before = jax.device_get((state.params, state.opt_state))
  state, m = STEPS(state, batch(poisoned, 1))
  assert int(m['skipped'][0]) == 1 and not np.isfinite(float(m['loss'][0]))
  assert float(m['update_norm'][0]) == 0
  assert int(state.step) == 2  # the bad batch is passed, not retried
  after = jax.device_get((state.params, state.opt_state))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  state, m = STEPS(state, batch(good, 2))
  assert int(m['skipped'][0]) == 0 and np.isfinite(float(m['loss'][0]))
  assert float(m['update_norm'][0]) > 0


def test_a_call_measures_norms_at_its_last_step_only():
  """train_steps' last step reports the norms train_step measures; earlier steps report NaN."""
  config = train_fakes.tiny_config()
  data = train_fakes.FakeData()
  state = train.create_state(config)
  _, m = STEPS(state, train._stack([data.train_batch(s, 16) for s in range(3)]))
  state = train.create_state(config)
  for s in range(3):
    state, single = jax.jit(train.train_step)(state, data.train_batch(s, 16))
  for key in ('param_norm', 'update_norm'):
    assert np.isnan(m[key][:2]).all(), key
    np.testing.assert_allclose(m[key][2], single[key], rtol=1e-5)
    assert float(single[key]) > 0
  assert np.isfinite(m['grad_norm']).all()
  np.testing.assert_allclose(m['loss'][2], single['loss'], rtol=1e-5)


def _loop_carried_copies(hlo: str, min_carried: int) -> list[str]:
  """Shapes of the non-scalar loop-carried values that the steps' while body in `hlo` copies.

  The scan over steps must be the entry computation's only while loop, and carry at least
  `min_carried` values, so that a change in XLA's text format fails here rather than finds
  nothing.
  """
  bodies = re.findall(r'body=%([\w.-]+)', hlo.split('\nENTRY')[1])
  assert len(bodies) == 1, bodies
  text = hlo[hlo.index(f'\n%{bodies[0]} '):]
  text = text[:text.index('\n}')]
  arg = re.match(r'\n%\S+ \(([\w.-]+):', text).group(1)
  carried = set(re.findall(rf'%([\w.-]+) = \S+ get-tuple-element\(%{re.escape(arg)}\)', text))
  assert len(carried) >= min_carried, len(carried)
  copies = re.findall(r'= (\w+\[[\d,]*\])\S* copy\(%([\w.-]+)\)', text)
  assert len(copies) == text.count(' copy('), 'a copy this parser does not read'
  return [shape for shape, source in copies if source in carried and not shape.endswith('[]')]


@pytest.mark.parametrize('setup,optimizer', [
    ('scanned', 'adamw'), ('unrolled', 'adamw'), ('pmap', 'adamw'), ('scanned', 'lion'),
    ('pmap', 'lion'), ('scanned', 'adafactor')])
def test_the_steps_loop_overwrites_parameters_and_optimizer_state_in_place(setup, optimizer):
  """train_steps' loop body copies no parameter or optimizer state.

  Were anything to read one after XLA could have overwritten it in place, the scan would copy
  that buffer every step (it did: the 26 decayed matrices of shakespeare_char under AdamW, and
  Lion's and Adafactor's whole state, each step).
  """
  config = train_fakes.tiny_config(optim__name=optimizer, optim__weight_decay=0.1,
                                   **({'model__scan_layers': False} if setup == 'unrolled' else {}))
  batches = train._stack([train_fakes.FakeData().train_batch(s, 16) for s in range(2)])
  if setup == 'pmap':
    strategy = parallel.make(config, jax.local_devices()[:2])
    state = strategy.init(functools.partial(train.create_state, config,
                                            axis_name=strategy.axis_name))
    step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
    batches = strategy.shard(batches, batch_axis=1)
  else:
    state = train.create_state(config)
    step_fn = jax.jit(train.train_steps, donate_argnums=(0,))
  hlo = step_fn.lower(state, batches).compile().as_text()
  num_params = len(jax.tree.leaves(state.params))
  per_param = 3 if optimizer == 'adamw' else 2  # each parameter and its moment(s)
  assert _loop_carried_copies(hlo, min_carried=per_param * num_params) == []


@pytest.mark.parametrize('optimizer', ['adamw', 'lion', 'muon'])
def test_update_norm_is_the_parameters_change(optimizer):
  config = train_fakes.tiny_config(optim__name=optimizer, optim__weight_decay=0.1)
  data = train_fakes.FakeData()
  step = jax.jit(train.train_step)
  state, _ = step(train.create_state(config), data.train_batch(0, 16))  # warmup: lr 0 at step 0
  new_state, m = step(state, data.train_batch(1, 16))
  change = jax.tree.map(lambda new, old: new - old, new_state.params, state.params)
  assert float(m['update_norm']) > 0
  np.testing.assert_allclose(m['update_norm'], optax.tree.norm(change), rtol=1e-4)


def test_norms_of_bfloat16_parameters_are_float32():
  state = train.create_state(train_fakes.tiny_config(model__param_dtype='bfloat16'))
  batches = train._stack([train_fakes.FakeData().train_batch(s, 16) for s in range(2)])
  _, m = jax.jit(train.train_steps)(state, batches)
  assert m['param_norm'].dtype == np.float32 and np.isfinite(m['param_norm'][-1])


def test_train_writes_config_metrics_events_and_checkpoints(tmp_path):
  config = train_fakes.tiny_config(**LOOP_CONFIG)
  result = train.train(config, str(tmp_path), data=train_fakes.FakeData(), progress=False)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['vocab_size'] == train_fakes.VOCAB and saved['train']['steps'] == 20
  records = metrics.read(str(tmp_path))
  assert [r['step'] for r in records] == [5, 10, 15, 20]
  for r in records:
    for key in ('train/loss', 'train/step_time_ms', 'train/tokens_per_sec', 'train/mfu',
                'train/grad_norm', 'train/param_norm', 'train/update_norm', 'train/lr',
                'train/router_aux_loss'):
      assert key in r, key
    assert ('eval/loss' in r) == (r['step'] in (10, 20))
  assert records[-1]['train/loss'] < records[0]['train/loss']
  assert records[-1]['train/mfu'] > 0
  assert result['eval/loss'] == records[-1]['eval/loss']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  assert checkpoint.available_steps(str(tmp_path)) == [10, 20]


def test_a_run_of_non_finite_losses_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = train_fakes.tiny_config(**LOOP_CONFIG)
  data = train_fakes.FakeData(poison_from=12)  # steps 12, 13, 14 of the call 10..14
  with pytest.raises(train.NonFiniteLossError, match=r'3 consecutive steps had a NaN or Inf'):
    train.train(config, str(tmp_path), data=data, progress=False)
  assert checkpoint.available_steps(str(tmp_path)) == [10]
  params, step = checkpoint.restore_params(str(tmp_path), 'latest')
  assert step == 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert max(r['step'] for r in metrics.read(str(tmp_path))) < 15


def test_bfloat16_moe_keeps_float32_master_weights_and_adds_router_losses():
  config = train_fakes.tiny_config(model__dtype='bfloat16', model__ffn='moe', model__num_layers=1,
                                   model__num_experts=4, model__top_k=2,
                                   model__resid_dropout=0.1)
  state = train.create_state(config)
  state, m = jax.jit(train.train_step)(state, train_fakes.FakeData().train_batch(0, 16))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype('float32')}
  assert np.isfinite(float(m['loss'])) and int(m['skipped']) == 0
  assert float(m['router_aux_loss']) > 0 and float(m['router_z_loss']) > 0


def test_finetuning_takes_the_checkpoints_model_but_the_given_context_settings():
  saved = train_fakes.tiny_config(model__pos_emb='rope').model
  given = dataclasses.replace(saved, d_model=2 * saved.d_model, rope_scaling='ntk',
                              rope_scaling_factor=2.0, max_seq_len=4 * saved.max_seq_len)
  model = train.finetune_model(saved, given)
  # The architecture is the checkpoint's; how positions are read (context extension) is given.
  assert model.d_model == saved.d_model
  assert (model.rope_scaling, model.rope_scaling_factor, model.max_seq_len) == (
      'ntk', 2.0, given.max_seq_len)
  learned = dataclasses.replace(saved, pos_emb='learned')
  assert train.finetune_model(learned, given).max_seq_len == saved.max_seq_len  # a shape


def test_run_py_hands_the_configs_xla_flags_to_xla(tmp_path):
  """The config's device count overrides the 8 fake devices of the test environment."""
  cli_runs.write_corpus(tmp_path / 'corpus.txt')
  flags = '--xla_force_host_platform_device_count=4'
  process = cli_runs.launch(tmp_path, tmp_path / 'run', steps=2, overrides={
      'parallel.xla_flags': flags, 'checkpoint.every': 2, 'eval.every': 2,
      'optim.warmup_steps': 1})
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert 'on 4 device(s)' in output
  assert flags in parallel.missing_xla_flags(flags)  # this process never had them


def test_missing_xla_flags_lists_what_the_environment_lacks(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_a=1 --xla_b')
  assert parallel.missing_xla_flags('--xla_b --xla_a=2') == ['--xla_a=2']
  parallel.use_xla_flags('--xla_a=2')
  assert parallel.missing_xla_flags('--xla_b --xla_a=2') == []
