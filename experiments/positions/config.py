"""Study: which position scheme learns best, and which extrapolates past its training context?

Sinusoidal, learned, RoPE, ALiBi and no positions (NoPE) on the same 4 x 128 byte-level model,
trained at 64 tokens and evaluated at 64, 128 and 256. No scheme but `learned` has parameters
(its table adds 256 x 128 embedding parameters), so the blocks are equal in size. The learned
table covers 256 positions, but only the first 64 are ever trained.

  python run.py --config=experiments/positions/config.py --workdir=workdirs/positions --mode=sweep
"""

from experiments import common


def get_config(arg=None):
  del arg
  config = common.get_config()
  config.eval.seq_lens = (64, 128, 256)
  return config


def get_sweep(arg=None):
  del arg
  return dict(grid={'model.pos_emb': ['sinusoidal', 'learned', 'rope', 'alibi', 'none']},
              seeds=[0, 1])
