"""Checkpoint evaluation: exact scores over the whole split, json layout, steps, bad input, CLI."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm import data as lm_data
from lm import evaluate
from lm import metrics
from lm import model as lm_model
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(directory, workdir) of the tiny run, trained through lm.train (checkpoints 10 and 20)."""
  directory = str(tmp_path_factory.mktemp('eval'))
  return directory, trained_run.train_run(directory)


@pytest.fixture(scope='module')
def all_results(run):
  return evaluate.evaluate(run[1], 'all')


def test_all_steps_oldest_first_match_training_and_write_json(run, all_results):
  directory, workdir = run
  assert [r['step'] for r in all_results] == [10, 20]
  logged = {r['step']: r['eval/loss'] for r in metrics.read(workdir) if 'eval/loss' in r}
  data = lm_data.prepare(trained_run.config(directory), workdir)
  for result in all_results:
    # The trainer's validation pass scores the same split: the losses agree.
    np.testing.assert_allclose(result['loss'], logged[result['step']], rtol=1e-5)
    saved = json.loads(open(os.path.join(workdir, 'eval', f'{result["step"]}.json')).read())
    assert saved == pytest.approx(result)
    assert result['tokens'] == data.num_eval_tokens() == len(data.val_tokens) - 1
    assert result['perplexity'] == pytest.approx(math.exp(result['loss']))
    assert result['bits_per_byte'] == pytest.approx(
        result['loss'] / math.log(2) / data.bytes_per_token)
    assert 0 < result['loss_stderr'] < 0.1 and result['windows'] > 1
    assert result['corpus'].endswith('corpus.txt') and result['seq_len'] == trained_run.SEQ_LEN
  assert all_results[1]['loss'] < all_results[0]['loss']


def test_one_device_gives_the_same_scores_as_eight(run, all_results):
  """The padded last batch is masked, never dropped, whatever the split over devices."""
  assert len(jax.local_devices()) == 8
  one = evaluate.evaluate(run[1], 20, devices=jax.local_devices()[:1], write=False)[0]
  np.testing.assert_allclose(one['loss'], all_results[1]['loss'], rtol=1e-6)
  assert one['tokens'] == all_results[1]['tokens']


def test_latest_best_and_missing_steps(run):
  workdir = run[1]
  best = checkpoint.best_step(workdir)
  assert evaluate.parse_steps(workdir, None) == [20]
  assert evaluate.parse_steps(workdir, 'best') == [best]
  assert evaluate.parse_steps(workdir, '10') == [10]
  with pytest.raises(ValueError, match='Step 7 is not saved.*Available steps: 10, 20'):
    evaluate.parse_steps(workdir, '7')


def test_empty_workdir_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints.*Train first'):
    evaluate.evaluate(str(tmp_path))


def test_config_that_does_not_match_names_the_key_and_the_parameter(run):
  directory, workdir = run
  wrong = trained_run.config(directory, model=dict(d_model=64))
  with pytest.raises(ValueError, match=r'model.d_model: the run was trained with 32 .* says 64'):
    evaluate.evaluate(workdir, config=wrong)
  # Should config.json and the checkpoint disagree, restore names the parameter and shapes.
  saved = checkpoint.load_config(workdir).model
  with pytest.raises(ValueError, match=r'embed/embedding has shape \(320, 32\) in the '
                     r'checkpoint but \(320, 64\)'):
    checkpoint.restore_params(workdir, 20, dataclasses.replace(saved, d_model=64))


def test_inference_keys_may_differ_and_learned_positions_do_not_stretch(run):
  directory, workdir = run
  bf16 = trained_run.config(directory, model=dict(dtype='bfloat16'))
  assert evaluate.run_config(workdir, bf16).model.dtype == 'bfloat16'
  longer = trained_run.config(directory, model=dict(max_seq_len=128))
  with pytest.raises(ValueError, match='learned positions for 64 tokens'):
    evaluate.run_config(workdir, longer)
  too_long = trained_run.config(directory, eval=dict(seq_lens=(128,)))
  with pytest.raises(ValueError, match='eval.seq_lens: cannot evaluate at seq_len=128.*'
                     'learned positions for 64.*cannot extrapolate'):
    evaluate.evaluate(workdir, config=too_long)


def test_context_lengths_score_the_same_tokens(run, all_results):
  directory, workdir = run
  config = trained_run.config(directory, eval=dict(seq_lens=(16, 64)))
  result = evaluate.evaluate(workdir, 20, config=config, write=False)[0]
  assert sorted(result['seq_lens'], key=int) == ['16', '32', '64']
  tokens = {r['tokens'] for r in result['seq_lens'].values()}
  assert tokens == {all_results[1]['tokens']}
  assert result['seq_lens']['32']['loss'] == pytest.approx(all_results[1]['loss'])
  assert result['seq_lens']['16']['windows'] > result['seq_lens']['64']['windows']


def test_other_corpus(run, tmp_path):
  directory, workdir = run
  other = tmp_path / 'other.txt'
  other.write_text('zeta alpha beta. ' * 400)
  config = trained_run.config(directory, data=dict(corpus=str(other)))
  result = evaluate.evaluate(workdir, config=config, write=False)[0]
  assert result['corpus'] == str(other) and result['tokens'] > 0


def test_summarize_stderr_and_padding():
  loss_sum_W = np.array([2.0, 4.0, 6.0, 0.0])
  weight_W = np.array([2.0, 2.0, 2.0, 0.0])  # the last window is padding
  r = evaluate.summarize(loss_sum_W, weight_W, bytes_per_token=2.0)
  assert r['loss'] == pytest.approx(2.0) and r['tokens'] == 6 and r['windows'] == 3
  assert r['loss_stderr'] == pytest.approx(np.std([1.0, 2.0, 3.0], ddof=1) / math.sqrt(3))
  assert r['bits_per_byte'] == pytest.approx(2.0 / math.log(2) / 2.0)


def test_cli(run, tmp_path):
  directory, workdir = run
  config_file = trained_run.write_config_file(directory, tmp_path)
  env = trained_run.cli_env()
  command = [sys.executable, 'run.py', f'--config={config_file}', f'--workdir={workdir}',
             '--mode=eval']
  done = subprocess.run(command + ['--step=all'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  lines = [l for l in done.stdout.splitlines() if l.startswith('step ')]
  assert len(lines) == 2 and lines[0].startswith('step 10: loss ') and 'bits/byte' in lines[0]
  bad = subprocess.run(command + ['--step=7'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and 'Available steps: 10, 20' in bad.stderr


# ---------------------------------------------------------------------------------------------
# Task evaluation.


def test_task_exact_match_greedy_with_the_kv_cache(run, tmp_path):
  directory, workdir = run
  params, _ = checkpoint.restore_params(workdir, 20)
  model = lm_model.Transformer(checkpoint.load_config(workdir).model)
  tokenizer = lm_data.load_tokenizer(workdir)

  # One compiled shape: causal attention makes the padding after a sequence irrelevant.
  forward = jax.jit(lambda ids_1xT: model.apply({'params': params}, ids_1xT))

  def greedy(prompt, new_tokens=6, length=32):
    """The fixed model's answer by full forward passes, without a cache."""
    ids, new = [tokenizer.eos_id] + tokenizer.encode(prompt), []
    for _ in range(new_tokens):
      padded_1xT = np.zeros((1, length), np.int32)
      padded_1xT[0, :len(ids + new)] = ids + new
      token = int(np.argmax(forward(padded_1xT)[0, len(ids + new) - 1]))
      if token == tokenizer.eos_id:
        break
      new.append(token)
    return tokenizer.decode(new)

  prompts = ['alpha beta', 'gamma', 'zeta alpha beta gamma', 'delta.']
  answers = [greedy(p) for p in prompts]
  expected = [f' {answers[0]}\n', answers[1], 'not this', answers[3] + 'x']  # 2 of 4 right
  task = tmp_path / 'task.jsonl'
  task.write_text(''.join(json.dumps({'prompt': p, 'answer': a}) + '\n'
                          for p, a in zip(prompts, expected)))
  copy = shutil.copytree(workdir, tmp_path / 'run')  # the shared run's eval/ stays as it is
  config = trained_run.config(directory, eval=dict(task=str(task), task_max_new_tokens=6),
                              data=dict(chat_template='none'))  # the prompt as it is, after EOS
  result = evaluate.evaluate(str(copy), 20, config=config)[0]
  assert (result['exact_match'], result['correct'], result['examples']) == (0.5, 2, 4)
  assert [o['output'] for o in result['outputs']] == answers
  assert [o['correct'] for o in result['outputs']] == [True, True, False, False]
  assert result['outputs'][0] == dict(prompt=prompts[0], answer=expected[0], output=answers[0],
                                       correct=True)
  saved = json.loads((copy / 'eval' / '20.json').read_text())
  assert saved['exact_match'] == 0.5 and saved['outputs'] == result['outputs']
  assert evaluate.summary_line(result) == f'step 20: exact match 0.5000 (2/4) on {task}'


def test_task_mistakes_name_the_line(run, tmp_path):
  directory, workdir = run
  task = tmp_path / 'task.jsonl'
  task.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
  config = trained_run.config(directory, eval=dict(task=str(task)))
  with pytest.raises(ValueError, match=r'task.jsonl:2: an eval.task example needs .*"answer" is '
                     'missing'):
    evaluate.evaluate(workdir, 20, config=config, write=False)
  preference = trained_run.config(directory, data=dict(format='preference', corpus='p.jsonl'))
  with pytest.raises(ValueError, match='data.format=preference: --mode=eval scores text or SFT'):
    evaluate.evaluate(workdir, 20, config=preference, write=False)
