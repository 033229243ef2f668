"""Post-training end to end through run.py: pretrain, SFT from it, DPO from the SFT run, and
the DPO run's exact match on a task."""

import json
import os
import subprocess
import sys

from lm import metrics
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_pretrain_sft_dpo_and_task_exact_match_through_the_cli(tmp_path):
  config_file = trained_run.write_config_file(str(tmp_path), tmp_path)

  def run(workdir, *flags, mode='train'):
    done = subprocess.run(
        [sys.executable, 'run.py', f'--config={config_file}', f'--workdir={workdir}',
         f'--mode={mode}', *flags], cwd=ROOT, env=trained_run.cli_env(), capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

  numbers = range(40)
  sft_data = write_jsonl(tmp_path / 'sft.jsonl',
                         [{'prompt': f'{i} then', 'response': f'{i + 1}.'} for i in numbers])
  pairs = write_jsonl(tmp_path / 'pairs.jsonl', [
      {'prompt': f'{i} then', 'chosen': f'{i + 1}.', 'rejected': f'{i}.'} for i in numbers])
  task = write_jsonl(tmp_path / 'task.jsonl',
                     [{'prompt': f'{i} then', 'answer': f'{i + 1}.'} for i in range(5)])
  short = ['--config.checkpoint.every=10', '--config.eval.every=10', '--config.data.seq_len=64']

  pretrain, sft, dpo = tmp_path / 'pretrain', tmp_path / 'sft', tmp_path / 'dpo'
  run(pretrain)
  run(sft, '--config.data.format=sft', f'--config.data.corpus={sft_data}',
      f'--config.train.init_from={pretrain}', '--config.train.steps=10', *short)
  assert (sft / 'tokenizer').is_dir() and (sft / 'checkpoints' / '10').is_dir()
  run(dpo, '--config.data.format=preference', f'--config.data.corpus={pairs}',
      f'--config.train.init_from={sft}', '--config.train.steps=4', *short)
  last = metrics.read(str(dpo))[-1]
  assert last['step'] == 4 and 0 <= last['train/reward_accuracy'] <= 1
  assert 'train/reward_margin' in last and 'eval/reward_accuracy' in last

  out = run(dpo, f'--config.eval.task={task}', '--config.eval.task_max_new_tokens=4',
            mode='eval').stdout
  assert out.startswith('step 4: exact match ') and '/5) on ' in out
  result = json.loads((dpo / 'eval' / '4.json').read_text())
  assert result['examples'] == len(result['outputs']) == 5 and 0 <= result['exact_match'] <= 1
  assert result['chat_template'] == 'builtin'

  sampled = run(sft, '--config.data.format=sft', f'--config.data.corpus={sft_data}',
                '--prompt=3 then', '--config.sample.max_new_tokens=4', mode='sample')
  assert "Prompts are user turns of chat template 'builtin'" in sampled.stderr
  assert sampled.stdout.startswith('3 then')
