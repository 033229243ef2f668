"""Character-level Shakespeare with nanoGPT's CPU settings, at twice its learning rate (below).

`--config=configs/shakespeare_char.py` reads ../shared/data/tinyshakespeare.txt beside the repo;
`--config.data.corpus=PATH` points it at any copy.
"""

import os

from configs import base

DEFAULT_CORPUS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'tinyshakespeare.txt')


def get_config(arg=None):
  del arg
  config = base.get_config()
  d = config.data
  d.corpus = os.path.normpath(DEFAULT_CORPUS)
  d.tokenizer = 'char'
  d.val_fraction = 0.1
  d.seq_len = 64
  m = config.model
  m.vocab_multiple_of = 1  # the 65 characters exactly, as nanoGPT
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 128, 4, 4, 4
  m.max_seq_len = 64
  m.pos_emb, m.ffn, m.norm = 'learned', 'mlp', 'layernorm'
  m.use_bias = False
  m.tie_embeddings = True
  m.scan_layers = False  # on CPU the scanned backward is about 2x slower at this size
  # The projections' matmuls on bfloat16-rounded operands with float32 sums (TPU's default):
  # on a CPU with AVX512-BF16 lm's native kernel runs them about 1.9x faster than XLA's float32,
  # 28 -> 20 ms/step, and the validation loss is the same (1.837 vs 1.836; BENCHMARKS.md).
  # Without AVX512-BF16 XLA's path is slower than float32, and a warning says to set float32.
  m.matmul_precision = 'bfloat16'
  t = config.train
  t.steps, t.batch_size, t.log_every = 2000, 12, 100
  t.steps_per_call = 10  # a small model's step is short: amortize the per-call cost
  o = config.optim
  o.lr, o.min_lr_ratio, o.warmup_steps, o.b2 = 2e-3, 0.1, 100, 0.99
  # nanoGPT uses lr 1e-3. Here that reaches 1.917 on the whole validation split (1.915 on
  # nanoGPT-style 20 random batches; the same in an independent minimal JAX GPT), not the
  # 1.88 nanoGPT reports; 2e-3 reaches about 1.84. benchmarks/BENCHMARKS.md has both.
  o.decay_embeddings = True  # nanoGPT decays every 2-D weight, the tied embedding included
  # CPU speed (53 -> 30 ms/step on 2 cores, benchmarks/BENCHMARKS.md): two host devices, each
  # running its half of the batch on its own threads (tiny matmuls scale poorly across cores);
  # XLA's YNNPACK library for the matmuls alone (its reductions are slower here); and no
  # tree_reduction_rewriter, which splits every row reduction (softmax, norms) into a slow
  # reduce-window plus a second reduction instead of fusing it with its producer. It exists for
  # the precision of very long float32 sums; here the longest is a 128 x 512 weight's norm.
  # And 512-bit vectors for the elementwise code (XLA prefers 256): tanh-GELU and exp run
  # 1.4-1.7x faster on AVX-512 and the step about 0.25 ms; a CPU without it uses what it has.
  # run.py appends these to $XLA_FLAGS, so they replace any --xla_disable_hlo_passes there.
  config.parallel.xla_flags = ('--xla_force_host_platform_device_count=2 '
                               '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT '
                               '--xla_disable_hlo_passes=tree_reduction_rewriter '
                               '--xla_cpu_prefer_vector_width=512')
  config.checkpoint.every = 500
  config.eval.every = 500
  config.eval.batch_size = 64
  return config
