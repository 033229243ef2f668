"""Checkpoints: round trip, retention, the restore API, init_from, and resuming through run.py
after SIGKILL (bitwise) and SIGTERM (a clean save)."""

import signal

import jax
import pytest

from lm import checkpoint
from lm import metrics
from lm import train
from tests import cli_runs
from tests import train_fakes

saved_state = train_fakes.saved_state
assert_trees_equal = train_fakes.assert_trees_equal
launch = cli_runs.launch
wait_for_checkpoint = cli_runs.wait_for_checkpoint
finish = cli_runs.finish


def test_round_trip_restores_params_optimizer_state_and_meta(tmp_path):
  config, state = saved_state(tmp_path, [7], checkpoint__async_save=True)
  abstract = jax.eval_shape(lambda: train.create_state(config))
  checkpointer = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
  assert checkpointer.latest_step() == 7
  params, opt_state, meta = checkpointer.restore(7, abstract.params, abstract.opt_state)
  checkpointer.close()
  assert_trees_equal(params, state.params)
  assert_trees_equal(opt_state, state.opt_state)
  assert meta['step'] == 7 and meta['data_step'] == 7 and meta['rng'] == [1, 2]
  restored, step = checkpoint.restore_params(str(tmp_path), 7, config.model)
  assert step == 7
  assert_trees_equal(restored, state.params)


def test_retention_keeps_the_newest_and_the_best(tmp_path):
  losses = [3.0, 1.0, 2.0, 0.5, None, 5.0]
  saved_state(tmp_path, [1, 2, 3, 4, 5, 6], losses, checkpoint__keep=1, checkpoint__keep_best=2)
  assert checkpoint.available_steps(str(tmp_path)) == [2, 4, 6]  # best two, and the newest
  assert checkpoint.best_step(str(tmp_path)) == 4
  assert checkpoint.resolve_step(str(tmp_path), 'best') == 4
  assert checkpoint.resolve_step(str(tmp_path), 'latest') == 6


def test_restore_errors_name_what_exists(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints in'):
    checkpoint.restore_params(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    checkpoint.load_config(str(tmp_path))
  saved_state(tmp_path, [10, 20])
  with pytest.raises(ValueError, match=r'Step 15 is not saved .* Available steps: 10, 20'):
    checkpoint.restore_params(str(tmp_path), 15)
  with pytest.raises(ValueError, match=r'has a validation loss.*Available steps: 10, 20'):
    checkpoint.restore_params(str(tmp_path), 'best')
  wider = train_fakes.tiny_config(model__d_model=48).model
  with pytest.raises(ValueError, match=r'parameter embed/embedding has shape \(64, 32\) in the '
                     r'checkpoint but \(64, 48\) in the model'):
    checkpoint.restore_params(str(tmp_path), 20, wider)
  untied = train_fakes.tiny_config(model__tie_embeddings=False).model
  with pytest.raises(ValueError, match=r'parameter lm_head/kernel \(32, 64\) is missing'):
    checkpoint.restore_params(str(tmp_path), 'latest', untied)


def test_init_from_starts_from_another_runs_weights(tmp_path):
  source = tmp_path / 'source'
  _, saved = saved_state(source, [10], seed=1)
  config = train_fakes.tiny_config(train__init_from=f'{source}:10')
  run = checkpoint.Checkpointer(str(tmp_path / 'run'), config.checkpoint)
  state, resumed = train._initial_state(config, run)
  run.close()
  assert not resumed and int(state.step) == 0
  assert_trees_equal(jax.device_get(state.params), saved.params)
  mismatch = train_fakes.tiny_config(model__num_layers=3, train__init_from=str(source))
  run = checkpoint.Checkpointer(str(tmp_path / 'other'), mismatch.checkpoint)
  with pytest.raises(ValueError, match=r'parameter layers/\S+ has shape \(2, [^)]*\) in the '
                     r'checkpoint but \(3, [^)]*\) in the model'):
    train._initial_state(mismatch, run)
  run.close()


# ---------------------------------------------------------------------------------------------
# End to end, through run.py.


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """Corpus, token cache and XLA compilation cache shared by the run.py tests."""
  path = tmp_path_factory.mktemp('e2e')
  cli_runs.write_corpus(path / 'corpus.txt')
  return path


def test_resume_after_sigkill_logs_bitwise_the_same_losses(shared, tmp_path):
  reference = launch(shared, tmp_path / 'reference', steps=120)
  killed = launch(shared, tmp_path / 'killed', steps=120)
  wait_for_checkpoint(killed, tmp_path / 'killed', 30)
  killed.kill()  # SIGKILL: no cleanup at all
  killed.wait()
  logged_before = max(r['step'] for r in metrics.read(str(tmp_path / 'killed')))
  finish(reference)
  resumed = finish(launch(shared, tmp_path / 'killed', steps=120))
  assert 'Resuming at step' in resumed
  expected = {r['step']: r for r in metrics.read(str(tmp_path / 'reference'))}
  records = metrics.read(str(tmp_path / 'killed'))
  assert [r['step'] for r in records] == sorted(expected)
  assert logged_before < 120
  for r in records:
    for key in ('train/loss', 'train/grad_norm', 'train/param_norm', 'eval/loss'):
      if key in expected[r['step']]:
        assert r[key] == expected[r['step']][key], (r['step'], key)


def test_sigterm_saves_the_current_step_and_exits_cleanly(shared, tmp_path):
  process = launch(shared, tmp_path / 'run', steps=100_000)
  wait_for_checkpoint(process, tmp_path / 'run', 30)
  process.send_signal(signal.SIGTERM)
  output = finish(process)
  assert 'SIGTERM: saved a checkpoint at step' in output
  steps = checkpoint.available_steps(str(tmp_path / 'run'))
  assert 30 < steps[-1] < 100_000
  logged = max(r['step'] for r in metrics.read(str(tmp_path / 'run')))
  assert logged <= steps[-1]
