"""The small model every study starts from: 4 layers, 128 wide, byte-level, on 2 CPU cores.

Bytes of Python standard-library source (the embedded corpus, no download) keep the vocabulary
small, so nearly all parameters sit in the blocks the studies change. Each study's config.py
changes only what its question is about.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 128, 4, 8, 8
  m.norm, m.ffn, m.use_bias = 'rmsnorm', 'swiglu', False
  m.pos_emb = 'rope'
  m.tie_embeddings = True
  m.scan_layers = False  # unrolled blocks train faster on CPU at this size
  d = config.data
  d.tokenizer, d.seq_len = 'byte', 64
  m.max_seq_len = 4 * d.seq_len  # room for the 4x context-length evaluation
  t = config.train
  t.steps, t.batch_size, t.log_every, t.steps_per_call = 600, 32, 50, 10
  o = config.optim
  o.lr, o.warmup_steps = 3e-3, 60
  config.checkpoint.every = 200
  config.eval.every, config.eval.max_batches = 100, 8
  return config
