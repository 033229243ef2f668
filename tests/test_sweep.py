import csv
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm import config as lm_config
from lm import model as lm_model
from lm import sweep
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Expansion.


def test_grid_is_the_product_in_order_with_seeds_innermost():
  runs = sweep.expand(dict(grid={'model.pos_emb': ['rope', 'learned'],
                                 'model.num_kv_heads': [2, 1]}, seeds=[0, 1]))
  assert [r.name for r in runs[:3]] == ['pos_emb=rope,num_kv_heads=2,seed=0',
                                        'pos_emb=rope,num_kv_heads=2,seed=1',
                                        'pos_emb=rope,num_kv_heads=1,seed=0']
  assert len(runs) == 8 and len({r.variant for r in runs}) == 4
  assert runs[-1].overrides == {'model.pos_emb': 'learned', 'model.num_kv_heads': 1, 'seed': 1}
  assert runs[-1].seed == 1 and runs[-1].variant == 'pos_emb=learned,num_kv_heads=1'


def test_list_of_runs_with_names_and_without_seeds():
  runs = sweep.expand(dict(runs=[{'name': 'dense'}, {'model.ffn': 'moe', 'model.top_k': 1}]))
  assert [r.name for r in runs] == ['dense', 'ffn=moe,top_k=1']
  assert runs[0].overrides == {} and runs[0].seed is None


def test_names_use_the_whole_key_when_last_parts_clash_and_are_safe_folder_names():
  runs = sweep.expand(dict(grid={'model.top_k': [1], 'sample.top_k': [0],
                                 'data.corpus': ['/a/b.txt'], 'optim.lr': [3e-4]}))
  assert runs[0].name == 'model.top_k=1,sample.top_k=0,corpus=_a_b.txt,lr=0.0003'


@pytest.mark.parametrize('spec, message', [
    (dict(grid={'model.pos_emb': ['rope']}, runs=[{}]), 'exactly one of'),
    (dict(gird={'model.pos_emb': ['rope']}), "did you mean 'grid'"),
    (dict(grid={'model.pos_emb': 'rope'}), 'non-empty list'),
    (dict(runs=[]), 'non-empty list of dicts'),
    (dict(runs=[{}], seeds=[0, 0]), 'distinct integers'),
    (dict(runs=[{}], measure=['decoding']), "did you mean 'decode'"),
    (dict(runs=[{'name': 'a'}, {'name': 'a'}]), 'several runs are named a'),
    ([{'model.ffn': 'mlp'}], 'must return a dict'),
])
def test_bad_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(spec)


def test_overrides_apply_to_a_copy_and_bad_keys_or_types_fail():
  cd = base.get_config()
  cd.lock()
  changed = sweep.apply_overrides(cd, {'model.pos_emb': 'alibi', 'eval.seq_lens': [64, 128],
                                       'seed': 3})
  assert changed.model.pos_emb == 'alibi' and changed.eval.seq_lens == (64, 128)
  assert changed.seed == 3 and cd.model.pos_emb == base.get_config().model.pos_emb
  with pytest.raises(ValueError, match="model.num_kv_head=.*did you mean 'model.num_kv_heads'"):
    sweep.apply_overrides(cd, {'model.num_kv_head': 1})
  with pytest.raises(ValueError, match='no such config key'):
    sweep.apply_overrides(cd, {'model.pos_emb.x': 1})
  with pytest.raises(ValueError, match='model.num_layers'):
    sweep.apply_overrides(cd, {'model.num_layers': 'four'})


def test_plan_validates_every_run_before_any_trains():
  runs = sweep.expand(dict(grid={'model.num_kv_heads': [2, 3]}))
  with pytest.raises(ValueError, match='run num_kv_heads=3: model.num_kv_heads'):
    sweep.plan(base.get_config(), runs)


# ---------------------------------------------------------------------------------------------
# Budgets and aggregation.


def _config(warmup_steps=2, **train):
  cd = base.get_config()
  cd.train.update(train)
  cd.optim.warmup_steps = warmup_steps
  return lm_config.Config.from_config_dict(cd)


def test_a_run_stopped_by_sigterm_stops_the_sweep_and_resumes_later(tmp_path, monkeypatch):
  from lm import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, 'train', lambda *args, **kwargs: {'preempted': True})
  (run,) = sweep.expand({'runs': [{'name': 'a'}]})
  config = _config()
  with pytest.raises(SystemExit, match='Run the same command again'):
    sweep.run_all([run], [config], str(tmp_path))  # per-run errors would be caught here
  # Neither done nor failed: the next sweep resumes it from its checkpoint.
  assert sweep.run_status(str(tmp_path / 'a'), run, config) == 'resume'


def test_token_and_flop_budgets_become_steps_rounded_up():
  per_step = 32 * base.get_config().data.seq_len
  config = _config(tokens=10 * per_step + 1, batch_size=32)
  assert lm_config.with_budget(config, 1e6).train.steps == 11
  config = _config(flops=6e6 * 4 * per_step, batch_size=32)
  assert lm_config.with_budget(config, 6e6).train.steps == 4
  assert lm_config.with_budget(_config(steps=7), 6e6).train.steps == 7  # no budget: unchanged
  config = _config(warmup_steps=5, flops=6e6 * 4 * per_step, batch_size=32)
  with pytest.raises(ValueError, match='optim.warmup_steps: 5 exceeds the 4 steps'):
    lm_config.with_budget(config, 6e6)
  with pytest.raises(ValueError, match='train.flops.*not both'):
    _config(tokens=100, flops=1e9)


def test_costs_equalise_tokens_across_model_sizes():
  small, large = (lm_config.Config.from_config_dict(sweep.apply_overrides(
      base.get_config(), {'model.num_layers': n, 'train.flops': 1e15, 'model.vocab_size': 512,
                          'optim.warmup_steps': 1})) for n in (2, 4))
  c_small, c_large = sweep.costs(small), sweep.costs(large)
  assert c_small['steps'] > c_large['steps']  # the same compute buys the smaller model more
  for c in (c_small, c_large):
    assert c['train_flops'] == pytest.approx(1e15, rel=0.1)


def test_mean_and_standard_error_on_known_numbers():
  mean, sem = sweep.mean_sem([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5 and sem == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
  assert sweep.mean_sem([5.0]) == (5.0, None)
  assert sweep.mean_sem([2.0, None, float('nan'), 4.0]) == (3.0, 1.0)


def test_aggregate_groups_seeds_and_averages_curves_on_common_steps():
  def row(variant, seed, loss, curve):
    return {'run': f'{variant},seed={seed}', 'variant': variant, 'status': 'done',
            'overrides': {'model.ffn': variant, 'seed': seed}, 'final_val_loss': loss,
            'params_total': 10, 'curve': curve}
  rows = [row('mlp', 0, 2.0, [(10, 3.0), (20, 2.0)]), row('mlp', 1, 3.0, [(10, 4.0)]),
          row('moe', 0, 1.0, [(10, 1.0)]),
          {'run': 'moe,seed=1', 'variant': 'moe', 'status': 'failed', 'overrides': {}}]
  groups = {g['variant']: g for g in sweep.aggregate(rows)}
  assert groups['mlp']['n'] == 2 and groups['mlp']['final_val_loss'] == (2.5, 0.5)
  assert groups['mlp']['curve'] == [(10, 3.5, 0.5)]
  assert groups['moe']['n'] == 1 and groups['moe']['final_val_loss'] == (1.0, None)
  assert groups['mlp']['overrides'] == {'model.ffn': 'mlp'}


# ---------------------------------------------------------------------------------------------
# A real sweep, end to end.

SPEC = dict(grid={'model.pos_emb': ['rope', 'sinusoidal']}, seeds=[0, 1], measure=['decode'])


def _write_config(directory, spec=SPEC):
  path = os.path.join(directory, 'sweep_config.py')
  with open(path, 'w') as f:
    f.write('from tests import trained_run\n\n\n'
            'def get_config(arg=None):\n'
            f'  return trained_run.config_dict({directory!r}, train=dict(steps=10, log_every=5),'
            ' checkpoint=dict(every=5, keep=1, keep_best=0), eval=dict(every=5, seq_lens=(32, 64)))\n\n\n'
            f'def get_sweep(arg=None):\n  return {spec!r}\n')
  return path


def _sweep(config_file, workdir, *flags, mode='sweep'):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'run.py', f'--config={config_file}',
                         f'--workdir={workdir}', f'--mode={mode}', *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('sweep'))
  config_file = _write_config(directory)
  workdir = os.path.join(directory, 'out')
  done = _sweep(config_file, workdir)
  assert done.returncode == 0, done.stderr
  return config_file, workdir, done


def test_sweep_trains_every_run_and_writes_results(swept):
  _, workdir, _ = swept
  names = [r.name for r in sweep.expand(SPEC)]
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == names and {r['status'] for r in rows} == {'done'}
  for row in rows:
    run_dir = os.path.join(workdir, row['run'])
    with open(os.path.join(run_dir, 'eval', '10.json')) as f:
      final = json.load(f)
    assert float(row['final_val_loss']) == pytest.approx(final['loss'])
    assert float(row['loss@64']) == pytest.approx(final['seq_lens']['64']['loss'])
    assert int(row['steps']) == 10 and int(row['train_tokens']) == 10 * 8 * 32
    assert float(row['decode_tokens_per_sec']) > 0 and float(row['tokens_per_sec']) > 0
    assert float(row['best_val_loss']) <= float(row['final_val_loss']) + 1e-9
  assert rows[0]['seed'] == '0' and rows[0]['model.pos_emb'] == 'rope'
  seeds = [float(r['final_val_loss']) for r in rows[:2]]
  assert seeds[0] != seeds[1]  # different seeds train differently
  with open(os.path.join(workdir, 'results.md')) as f:
    md = f.read()
  mean, sem = np.mean(seeds), np.std(seeds, ddof=1) / math.sqrt(2)
  assert f'| pos_emb=rope | 2 | ' in md and f'{mean:.4f} ± {sem:.4f}' in md
  for name in ('loss_curves', 'loss_vs_params', 'loss_vs_flops', 'loss_vs_context'):
    assert os.path.getsize(os.path.join(workdir, 'plots', f'{name}.png')) > 1000
    assert f'(plots/{name}.png)' in md


def test_a_finished_sweep_skips_its_runs_and_a_half_done_one_resumes(swept):
  config_file, workdir, _ = swept
  run_dir = os.path.join(workdir, 'pos_emb=sinusoidal,seed=1')
  record_path = os.path.join(run_dir, sweep.RUN_FILE)
  with open(record_path) as f:
    record = json.load(f)
  with open(record_path, 'w') as f:  # as if killed after training, before its evaluation
    json.dump(dict(record, status='running'), f)
  os.remove(os.path.join(run_dir, 'eval', '10.json'))
  again = _sweep(config_file, workdir)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count('done already, skipped') == 3
  assert '[1/1] pos_emb=sinusoidal,seed=1 (resuming)' in again.stdout
  assert os.path.exists(os.path.join(run_dir, 'eval', '10.json'))
  with open(record_path) as f:
    assert json.load(f)['status'] == 'done'


def test_report_rebuilds_results(swept):
  config_file, workdir, _ = swept
  os.remove(os.path.join(workdir, 'results.md'))
  done = _sweep(config_file, workdir, mode='report')
  assert done.returncode == 0, done.stderr
  assert os.path.exists(os.path.join(workdir, 'results.md'))


def test_a_changed_sweep_never_reuses_a_run_folder(swept, tmp_path):
  _, workdir, _ = swept
  changed = _write_config(str(tmp_path))  # another corpus path: another config
  done = _sweep(changed, workdir)
  assert done.returncode != 0 and 'was started with another config (data.' in done.stderr


def test_dry_run_lists_runs_with_costs_and_trains_nothing(tmp_path):
  config_file = _write_config(str(tmp_path))
  workdir = os.path.join(str(tmp_path), 'out')
  done = _sweep(config_file, workdir, '--sweep_dry_run')
  assert done.returncode == 0, done.stderr
  assert '4 runs into' in done.stdout and 'pos_emb=sinusoidal,seed=1' in done.stdout
  assert 'FLOPs/token' in done.stdout and not os.path.exists(workdir)


def test_a_bad_override_fails_before_any_run(tmp_path):
  config_file = _write_config(str(tmp_path), dict(grid={'model.pos_embedding': ['rope']}))
  workdir = os.path.join(str(tmp_path), 'out')
  done = _sweep(config_file, workdir)
  assert done.returncode != 0 and "did you mean 'model.pos_emb'" in done.stderr
  assert not os.path.exists(workdir)


def test_a_config_without_get_sweep_says_how_to_add_one(tmp_path):
  done = _sweep(os.path.join(ROOT, 'configs', 'default.py'), str(tmp_path))
  assert done.returncode != 0 and 'defines no get_sweep' in done.stderr


def test_parallel_workers_run_a_sweep(tmp_path):
  config_file = _write_config(str(tmp_path), dict(runs=[{'name': 'a'}, {'name': 'b'}]))
  workdir = os.path.join(str(tmp_path), 'out')
  done = _sweep(config_file, workdir, '--sweep_workers=2')
  assert done.returncode == 0, done.stderr
  for name in ('a', 'b'):
    with open(os.path.join(workdir, name, sweep.RUN_FILE)) as f:
      assert json.load(f)['status'] == 'done'


def test_expert_load_measurement_on_a_moe_run(tmp_path):
  workdir = trained_run.train_run(str(tmp_path), model=dict(ffn='moe', num_experts=4, top_k=1),
                                  train=dict(steps=10), checkpoint=dict(every=10),
                                  eval=dict(every=10))
  measured = sweep.measure_expert_load(workdir, max_batches=2)
  load_LxE = np.asarray(measured['expert_load_per_layer'])
  assert load_LxE.shape == (2, 4) and np.allclose(load_LxE.sum(-1), 1.0, atol=1e-3)
  assert 1.0 <= measured['expert_load_max'] <= 4.0 and measured['expert_dropped'] >= 0


STUDIES = sorted(glob.glob('experiments/*/config.py', root_dir=ROOT))
# The config argument of studies whose sweep continues an earlier stage.
STUDY_ARGS = {'context_extension': 'base=/tmp/base', 'post_training': 'stage=sft'}


@pytest.mark.parametrize('path', STUDIES)
def test_every_study_sweep_validates_and_shape_checks(path):
  """Each run of each committed study builds; MoE and KV-head variants are sized as stated."""
  study = os.path.basename(os.path.dirname(path))
  arg = STUDY_ARGS.get(study)
  path = os.path.join(ROOT, path)
  runs = sweep.expand(sweep.load_sweep(path if arg is None else f'{path}:{arg}'))
  configs = sweep.plan(_load(path, arg), runs)
  assert len(runs) >= 2 and all(r.seed is not None for r in runs)
  for config in configs[::2]:
    model_config = lm_config.with_vocab_size(config.model, 257)
    tokens_BxT = jnp.zeros((1, config.data.seq_len), jnp.int32)
    variables = jax.eval_shape(lm_model.Transformer(model_config).init, jax.random.key(0),
                               tokens_BxT)
    assert variables['params']
  counts = {sweep.costs(c)['params_active'] for c in configs}
  if study == 'moe':
    assert max(counts) - min(counts) < 0.01 * min(counts)  # equal active parameters
  elif study != 'post_training':  # where LoRA's adapters add parameters
    assert len({sweep.costs(c)['params_non_embedding'] for c in configs}) == 1


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location('study', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
