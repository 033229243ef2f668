"""LoRA: adapters beside the base weights, exact at zero, only they train and are saved (with
their base), resume, merge, info, config errors, and the CLI from base run to merged samples."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm import checkpoint
from lm import config as lm_config
from lm import evaluate
from lm import hf
from lm import info
from lm import lora
from lm import model as lm_model
from lm import optim
from lm import train
from lm.model import lora as lora_lib
from tests import train_fakes
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_TARGET = dict(rank=4, targets=('q', 'k', 'v', 'o', 'ffn'))
ONE_DEVICE = jax.local_devices()[:1]  # the runs' numbers do not depend on it; their time does
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, train_fakes.VOCAB)


def with_lora(config: lm_config.Config, **lora_values) -> lm_config.Config:
  """`config` with model.lora's values replaced, validated."""
  model = dataclasses.replace(config.model,
                              lora=dataclasses.replace(config.model.lora, **lora_values))
  config = dataclasses.replace(config, model=model)
  lm_config.validate(config)
  return config


def flat(params):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')


def eager_logits(model_config, params, rng=None, deterministic=True):
  """Op by op, as the base model's own ops plus an exact + 0: under one jit XLA may fuse the
  two graphs differently, which moves logits by an ulp."""
  return lm_model.Transformer(model_config).apply(
      {'params': params}, TOKENS, deterministic=deterministic,
      rngs=None if rng is None else {'dropout': rng})


logits = jax.jit(eager_logits, static_argnums=(0, 3))


def random_adapters(params, scale=0.05):
  """Every lora_b (zeros at init) made random, so that the update is not 0."""
  def fill(path, x):
    if optim.path_str(path).endswith('lora_b'):
      return scale * jax.random.normal(jax.random.key(len(optim.path_str(path))), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(fill, params)


# ---------------------------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize('model', [
    dict(), dict(scan_layers=False, ffn='swiglu'), dict(ffn='moe', capacity_factor=0.0)])
def test_zero_adapters_are_the_base_model_exactly_and_merge_folds_them(model):
  base_config = train_fakes.tiny_config(**{f'model__{k}': v for k, v in model.items()})
  adapted = with_lora(base_config, **EVERY_TARGET).model
  base_params = train.init_params(base_config.model, 0)
  params = checkpoint.overlay(train.init_adapters(adapted, 1), base_params)
  extra = set(flat(params)) - set(flat(base_params))
  assert set(flat(base_params)) <= set(flat(params))  # the base at the very same paths
  assert extra and all(lora_lib.is_adapter(path) for path in extra)
  expected = eager_logits(base_config.model, base_params)
  np.testing.assert_array_equal(eager_logits(adapted, params), expected)
  # DPO's reference: any adapters with every lora_b zeroed are the base model, bit for bit.
  trained = random_adapters(params)
  off = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if optim.path_str(path).endswith('lora_b') else x,
      trained)
  np.testing.assert_array_equal(eager_logits(adapted, off), expected)
  adapted_logits = logits(adapted, trained)
  assert np.abs(adapted_logits - expected).max() > 1e-2
  merged = lora_lib.merge(adapted, trained)
  assert set(flat(merged)) == set(flat(base_params))
  np.testing.assert_allclose(logits(base_config.model, merged), adapted_logits, atol=1e-5)


def test_adapters_carry_logical_axes_and_stack_like_their_kernels():
  scanned = with_lora(train_fakes.tiny_config(model__ffn='moe'), **EVERY_TARGET).model
  names = optim.logical_names(train.abstract_params(scanned))
  shapes = {path: leaf.shape for path, leaf in flat(info.param_shapes(scanned)).items()}
  assert names['layers/attn/query/lora_a'] == ('layers', 'embed', None)
  assert names['layers/attn/query/lora_b'] == ('layers', None, 'heads', 'head_dim')
  assert names['layers/attn/out/lora_a'] == ('layers', 'heads', 'head_dim', None)
  assert names['layers/attn/out/lora_b'] == ('layers', None, 'embed')
  assert names['layers/ffn/experts/gate/lora_a'] == ('layers', 'expert', 'embed', None)
  assert shapes['layers/ffn/experts/down/lora_b'] == (2, scanned.num_experts, 4, 32)
  assert not any('router/lora' in path for path in shapes)  # the router is never adapted
  only_q = with_lora(train_fakes.tiny_config(), rank=2, targets=('q',)).model
  assert sorted(p for p in flat(info.param_shapes(only_q)) if lora_lib.is_adapter(p)) == [
      'layers/attn/query/lora_a', 'layers/attn/query/lora_b']


def test_adapter_dropout_acts_only_in_training():
  config = with_lora(train_fakes.tiny_config(), dropout=0.5, **EVERY_TARGET)
  assert train.step_options(config, None).dropout
  params = random_adapters(train.init_params(config.model, 0))
  without = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora,
                                                                       dropout=0.0))
  np.testing.assert_array_equal(logits(config.model, params), logits(without, params))
  dropped = logits(config.model, params, jax.random.key(2), False)
  assert np.abs(dropped - logits(without, params)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Training state, parameter counts.


def test_only_adapters_train_and_only_they_have_optimizer_state():
  config = with_lora(train_fakes.tiny_config(), **EVERY_TARGET)
  base_params = train.init_params(lora_lib.without_lora(config.model), 0)
  state = train.create_state(config, base_params)
  adapters = {p: x.shape for p, x in flat(state.params).items() if lora_lib.is_adapter(p)}
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  assert sorted(moments) == sorted(list(adapters.values()) * 2)  # Adam's mu and nu, no more
  before = flat(jax.device_get(state.params))
  data, step_fn = train_fakes.FakeData(), jax.jit(train.train_steps)
  for step in range(3):
    state, _ = step_fn(state, train._stack([data.train_batch(step, 16)]))
  after = flat(jax.device_get(state.params))
  for path, value in after.items():
    if lora_lib.is_adapter(path):
      assert not np.array_equal(value, before[path]), path
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=path)
  assert set(flat(train.saved_params(config, state.params))) == set(adapters)
  also_head = with_lora(dataclasses.replace(config, train=dataclasses.replace(
      config.train, trainable=('final_norm',))), **EVERY_TARGET)
  assert set(flat(train.saved_params(also_head, state.params))) == set(adapters) | {
      'final_norm/scale', 'final_norm/bias'}


def test_info_counts_the_trainable_parameters():
  config = train_fakes.tiny_config()
  plain = info.model_info(config)
  assert plain['params_trainable'] == plain['params_total']
  adapted = info.model_info(with_lora(config, rank=4, targets=('q',)))
  d, layers = config.model.d_model, config.model.num_layers
  assert adapted['params_trainable'] == layers * (d * 4 + 4 * d)  # A [D, 4], B [4, N x H]
  assert adapted['params_total'] == plain['params_total'] + adapted['params_trainable']
  heads_too = dataclasses.replace(config, train=dataclasses.replace(
      config.train, trainable=('final_norm',)))
  assert info.model_info(with_lora(heads_too, rank=4, targets=('q',)))['params_trainable'] == (
      adapted['params_trainable'] + 2 * d)


# ---------------------------------------------------------------------------------------------
# Config.


def build(**lora_values):
  cd = base.get_config()
  cd.model.lora.update(lora_values)
  return lm_config.Config.from_config_dict(cd)


@pytest.mark.parametrize('values, message', [
    (dict(rank=-1), r'model\.lora\.rank: must be >= 0'),
    (dict(rank=4, targets=('q', 'x')), r"model\.lora\.targets: 'x' is not one of q, k, v, o, ffn"),
    (dict(rank=4, targets=('q', 'q')), r'model\.lora\.targets: .* names a projection twice'),
    (dict(rank=4, targets=()), r'model\.lora\.targets: is empty, so rank=4 adapts nothing'),
    (dict(rank=4, dropout=1.0), r'model\.lora\.dropout: must be in \[0, 1\)'),
    (dict(rank=4, alpha=0.0), r'model\.lora\.alpha: must be > 0'),
])
def test_invalid_lora_settings_name_the_key(values, message):
  with pytest.raises(ValueError, match=message):
    build(**values)


def test_lora_section_keys_and_types_are_checked():
  raw = lm_config.Config.from_config_dict(base.get_config()).to_dict()
  raw['model']['lora']['rnak'] = raw['model']['lora'].pop('rank')
  with pytest.raises(ValueError, match=r'Unknown config key model\.lora\.rnak\. Did you mean '
                     r'model\.lora\.rank\?'):
    lm_config.Config.from_config_dict(raw)
  raw['model']['lora'] = dict(raw['model']['lora'], rank='four')
  del raw['model']['lora']['rnak']
  with pytest.raises(ValueError, match=r'model\.lora\.rank must be a int'):
    lm_config.Config.from_config_dict(raw)
  raw['model']['lora'] = 4
  with pytest.raises(ValueError, match=r'config\.model\.lora must be a section'):
    lm_config.Config.from_config_dict(raw)
  config = build(rank=8, targets=['q', 'ffn'])
  assert config.model.lora.targets == ('q', 'ffn') and hash(config.model)
  again = lm_config.Config.from_config_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config


def test_inference_allows_other_dropout_but_not_other_adapters():
  saved = with_lora(train_fakes.tiny_config(), **EVERY_TARGET).model
  other_dropout = dataclasses.replace(saved, lora=dataclasses.replace(saved.lora, dropout=0.1))
  assert evaluate.merge_model(saved, other_dropout) == saved
  with pytest.raises(ValueError, match='model.lora: the run was trained with'):
    evaluate.merge_model(saved, lora_lib.without_lora(saved))
  off = lora_lib.without_lora(saved)  # LoRA off: its other settings do not matter
  assert evaluate.merge_model(off, train_fakes.tiny_config().model) == off
  with pytest.raises(ValueError, match='--mode=merge'):
    hf.export_family(saved)


def test_lora_without_a_base_is_an_error(tmp_path):
  config = with_lora(train_fakes.tiny_config(), **EVERY_TARGET)
  with pytest.raises(ValueError, match=r'train\.init_from is empty.*--config\.train\.init_from'):
    train.train(config, str(tmp_path), devices=jax.local_devices()[:1],
                data=train_fakes.FakeData(), progress=False)


# ---------------------------------------------------------------------------------------------
# Runs: checkpoints, resume, eval, merge.

LORA_RUN = dict(model=dict(lora=dict(rank=4, targets=['q', 'v', 'o', 'ffn'])),
                train=dict(steps=10), checkpoint=dict(every=5), eval=dict(every=5))


def lora_run(directory, workdir, base_workdir, steps=10):
  """A LoRA run on base_workdir's latest step, trained into `workdir` up to `steps`."""
  sections = {k: dict(v) for k, v in LORA_RUN.items()}
  sections['train'].update(init_from=base_workdir, steps=steps)
  cd = trained_run.config_dict(directory, **{k: v for k, v in sections.items() if k != 'model'})
  cd.model.lora.update(sections['model']['lora'])
  train.train(lm_config.Config.from_config_dict(cd), workdir, devices=ONE_DEVICE, progress=False)
  return workdir


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(directory, base run, LoRA run) trained through lm.train."""
  directory = str(tmp_path_factory.mktemp('lora'))
  base_run = trained_run.train_run(directory, devices=ONE_DEVICE)
  return directory, base_run, lora_run(directory, os.path.join(directory, 'lora'), base_run)


def saved_shapes(workdir, step):
  manager = checkpoint._manager(checkpoint.checkpoint_dir(workdir))  # pylint: disable=protected-access
  return checkpoint._saved_shapes(manager, step), checkpoint._read_meta(manager, step)  # pylint: disable=protected-access


def test_checkpoints_hold_adapters_and_their_base(runs):
  _, base_run, lora_workdir = runs
  saved, meta = saved_shapes(lora_workdir, 10)
  assert saved and all(lora_lib.is_adapter(path) for path in saved)
  assert meta[checkpoint.BASE_KEY] == f'{base_run}:20'  # 'latest' pinned, absolute
  config = checkpoint.load_config(lora_workdir)
  assert config.train.init_from == f'{base_run}:20' and config.model.lora.rank == 4
  params, _ = checkpoint.restore_params(lora_workdir, 10, config.model)
  base_params, _ = checkpoint.restore_params(base_run, 20)
  for path, value in flat(base_params).items():  # the base, untouched, under the adapters
    np.testing.assert_array_equal(flat(params)[path], value)
  merged, _ = checkpoint.restore_params(lora_workdir, 10, lora_lib.without_lora(config.model))
  expected = lora_lib.merge(config.model, params)
  for path, value in flat(expected).items():
    np.testing.assert_array_equal(flat(merged)[path], value)


def test_resume_continues_exactly_and_a_missing_base_is_named(runs, tmp_path):
  directory, base_run, lora_workdir = runs
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(lora_workdir, workdir)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), '10'))  # as if killed at 5
  lora_run(directory, workdir, base_run)
  assert checkpoint.available_steps(workdir) == [5, 10]
  resumed, _ = checkpoint.restore_params(workdir, 10)
  uninterrupted, _ = checkpoint.restore_params(lora_workdir, 10)
  for path, value in flat(uninterrupted).items():
    np.testing.assert_array_equal(flat(resumed)[path], value, err_msg=path)
  moved = base_run + '.moved'
  os.rename(base_run, moved)
  try:
    for use in (lambda: evaluate.evaluate(workdir, 10, write=False),
                lambda: lora_run(directory, workdir, base_run)):  # resuming, too
      with pytest.raises(FileNotFoundError, match=f'trained on the base model {base_run}:20, '
                         'which cannot be loaded.*Put that base checkpoint back'):
        use()
  finally:
    os.rename(moved, base_run)


def test_eval_and_merge(runs):
  _, _, lora_workdir = runs
  results = evaluate.evaluate(lora_workdir, 'all', write=False)
  assert [r['step'] for r in results] == [5, 10]
  target, written = lora.merge(lora_workdir, 'all')
  assert target == os.path.join(lora_workdir, 'merged') and written == [5, 10]
  assert lora.merge(lora_workdir, 10) == (target, [])  # merged before: nothing to do
  merged_config = checkpoint.load_config(target)
  assert merged_config.model.lora.rank == 0
  assert checkpoint.eval_losses(target) == checkpoint.eval_losses(lora_workdir)
  assert all(not lora_lib.is_adapter(path) for path in saved_shapes(target, 10)[0])
  for before, after in zip(results, evaluate.evaluate(target, 'all', write=False)):
    assert after['loss'] == pytest.approx(before['loss'], abs=1e-5)
  with pytest.raises(ValueError, match='holds weights only, no optimizer state'):
    train.train(merged_config, target, devices=ONE_DEVICE, progress=False)
  with pytest.raises(ValueError, match='not a LoRA run'):
    lora.merge(target)


def test_cli_train_eval_merge_sample(runs, tmp_path):
  """The LoRA run through run.py, then its merged copy samples the same greedy text."""
  directory, base_run, _ = runs
  config_file = trained_run.write_config_file(directory, tmp_path)
  workdir = str(tmp_path / 'lora')
  run = lambda *flags: subprocess.run(
      [sys.executable, 'run.py', f'--config={config_file}', *flags], cwd=ROOT,
      env=trained_run.cli_env(), capture_output=True, text=True, timeout=300)
  lora_flags = ['--config.model.lora.rank=4', '--config.model.lora.targets=("q","v")']
  trained = run(f'--workdir={workdir}', f'--config.train.init_from={base_run}',
                '--config.train.steps=4', '--config.checkpoint.every=4', *lora_flags)
  assert trained.returncode == 0, trained.stderr[-3000:]
  evaluated = run(f'--workdir={workdir}', '--mode=eval', *lora_flags)
  assert evaluated.returncode == 0 and 'step 4: loss ' in evaluated.stdout, evaluated.stderr
  merged = run(f'--workdir={workdir}', '--mode=merge')
  assert merged.returncode == 0 and os.path.join(workdir, 'merged') in merged.stdout, (
      merged.stderr)
  samples = [run(f'--workdir={w}', '--mode=sample', '--prompt=alpha', *flags)
             for w, flags in ((workdir, lora_flags), (os.path.join(workdir, 'merged'), []))]
  assert all(s.returncode == 0 for s in samples), samples[0].stderr + samples[1].stderr
  assert samples[0].stdout.strip() and samples[0].stdout == samples[1].stdout
  shown = run('--mode=info', *lora_flags)
  assert json.loads(shown.stdout)['params_trainable'] == 2 * 2 * (32 * 4 + 4 * 32)
