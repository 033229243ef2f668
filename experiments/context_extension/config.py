"""Study: stretching a RoPE model's context from 64 to 128 tokens by fine-tuning.

Stage 1 trains the common 4 x 128 byte-level RoPE model at 64 tokens. Stage 2 fine-tunes it at
128 tokens for 200 steps with each `model.rope_scaling` (factor 2): none (plain RoPE at longer
positions), linear position interpolation, NTK-aware base scaling and Llama 3's frequency
blend. Every model is evaluated at 64, 128, 256 and 512 tokens; `before.py` scores the stage-1
model with each scaling and no fine-tuning.

  python run.py --config=experiments/context_extension/config.py --workdir=workdirs/ctx/base
  python -m experiments.context_extension.before workdirs/ctx/base
  python run.py --config=experiments/context_extension/config.py:base=workdirs/ctx/base \
      --workdir=workdirs/ctx/extend --mode=sweep
"""

import os

from experiments import common
from lm import config as lm_config

SHORT, LONG = 64, 128
SCALINGS = ('none', 'linear', 'ntk', 'llama3')


def get_config(arg=None):
  """The stage-1 model; with `base=DIR`, the stage-2 fine-tune starting from DIR's last step."""
  args = lm_config.parse_arg(arg, {'base': ''})
  config = common.get_config()
  m = config.model
  m.max_seq_len = 8 * SHORT
  m.rope_scaling_factor = LONG / SHORT  # used by the stage-2 scalings only
  m.rope_original_max_seq_len = SHORT  # llama3: the context stage 1 trained at
  config.eval.seq_lens = (SHORT, 2 * SHORT, 4 * SHORT, 8 * SHORT)
  if args['base']:
    config.train.init_from = os.path.abspath(args['base'])
    config.data.seq_len = LONG
    config.train.steps, config.train.batch_size = 200, 16  # same tokens per step as stage 1
    config.optim.lr, config.optim.warmup_steps = 1e-3, 20
    config.checkpoint.every = 100
  return config


def get_sweep(arg=None):
  if not lm_config.parse_arg(arg, {'base': ''})['base']:
    raise ValueError('The sweep fine-tunes a trained model: pass its workdir as '
                     '--config=experiments/context_extension/config.py:base=DIR.')
  return dict(grid={'model.rope_scaling': list(SCALINGS)}, seeds=[0, 1])
