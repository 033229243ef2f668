"""Study: full, local and fixed (Sparse Transformer) attention at equal parameters.

The common 4 x 128 byte-level RoPE model, trained at 256 tokens (batch 8, so the same 2,048
tokens per step as the other studies). `local` sees the last 32 positions; `fixed` (Child et
al., 2019) sees its own block of 32 and the last 4 positions of every earlier block. Attention
patterns hold no parameters, so every variant has the same weights; only what each query may
read differs. Evaluated at 256, 512 and 1024 tokens.

  python run.py --config=experiments/sparse_attention/config.py \
      --workdir=workdirs/sparse_attention --mode=sweep
"""

from experiments import common

SEQ_LEN, BLOCK, SUMMARY = 256, 32, 4


def get_config(arg=None):
  del arg
  config = common.get_config()
  config.data.seq_len, config.train.batch_size = SEQ_LEN, 8
  config.model.max_seq_len = 4 * SEQ_LEN
  config.eval.seq_lens = (SEQ_LEN, 2 * SEQ_LEN, 4 * SEQ_LEN)
  config.eval.max_batches = 4
  return config


def get_sweep(arg=None):
  del arg
  return dict(runs=[
      {'name': 'full', 'model.attention_pattern': 'full'},
      {'name': 'local', 'model.attention_pattern': 'local', 'model.attention_window': BLOCK},
      {'name': 'fixed', 'model.attention_pattern': 'fixed', 'model.attention_stride': BLOCK,
       'model.attention_summary': SUMMARY},
  ], seeds=[0, 1])
