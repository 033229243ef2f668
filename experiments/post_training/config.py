"""Worked example: SFT (full and LoRA) then DPO on letter counting, exact match on held-out words.

"How many times does the letter "r" appear in "strawberry"?" is a famous failure of language
models that see tokens, not letters. Here the model reads bytes, so the letters are in view;
the question is what each post-training stage buys on words it never saw. Stages (the commands,
from the repository root, are in README.md):

  stage=pretrain  the common 4 x 128 byte-level model on stdlib source, at 128 tokens
  stage=sft       fine-tunes it on sft.jsonl (get_sweep: full and LoRA rank 8, 2 seeds)
  stage=dpo       DPO from an SFT run on preference.jsonl (right count vs a wrong one)

Every SFT and DPO run is evaluated with eval.task=heldout_task.jsonl: greedy answers, exact match.
"""

import os

from experiments import common
from lm import config as lm_config

_ARGS = {'stage': 'pretrain', 'task': 'workdirs/post_training/task',
         'init': 'workdirs/post_training/base'}
STAGES = ('pretrain', 'sft', 'dpo')


def get_config(arg=None):
  args = lm_config.parse_arg(arg, _ARGS)
  lm_config.choose('stage', args['stage'], dict.fromkeys(STAGES))
  config = common.get_config()
  config.data.seq_len, config.train.batch_size = 128, 16
  config.model.max_seq_len = 128
  if args['stage'] == 'pretrain':
    return config
  task = os.path.abspath(args['task'])
  d, t, o = config.data, config.train, config.optim
  t.init_from = os.path.abspath(args['init'])
  d.chat_template, d.val_fraction = 'builtin', 0.05
  config.eval.task = os.path.join(task, 'heldout_task.jsonl')
  config.eval.task_max_new_tokens = 4
  config.eval.max_batches = 0
  o.weight_decay = 0.0
  if args['stage'] == 'sft':
    d.format, d.corpus, d.packing = 'sft', os.path.join(task, 'sft.jsonl'), True
    t.steps, t.batch_size = 400, 16
    o.lr, o.warmup_steps = 1e-3, 40
  else:
    d.format, d.corpus, d.packing = 'preference', os.path.join(task, 'preference.jsonl'), False
    t.steps, t.batch_size, t.dpo_beta = 200, 16, 0.1
    o.lr, o.warmup_steps, o.schedule = 1e-4, 20, 'constant'
  t.log_every, t.steps_per_call = 20, 10
  config.checkpoint.every = config.eval.every = t.steps
  return config


def get_sweep(arg=None):
  stage = lm_config.parse_arg(arg, _ARGS)['stage']
  if stage == 'sft':
    return dict(runs=[{'name': 'full'},
                      {'name': 'lora', 'model.lora.rank': 8, 'optim.lr': 3e-3}], seeds=[0, 1])
  if stage == 'dpo':
    return dict(runs=[{'name': 'dpo'}], seeds=[0, 1])
  raise ValueError('Only stage=sft and stage=dpo are sweeps; train stage=pretrain with '
                   '--mode=train.')
