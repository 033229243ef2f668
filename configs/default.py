"""What `make run` trains: a small Llama-style model on the Python standard library's source.

About five minutes on 2 CPU cores, with a 4096-token BPE sentencepiece tokenizer.
"""

from configs import base
from configs import llama


def get_config(arg=None):
  del arg
  config = base.get_config()
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 192, 4, 6, 2
  m.max_seq_len = config.data.seq_len = 128
  llama.llama_style(m)
  m.tie_embeddings = True
  m.scan_layers = False  # unrolled blocks train about 25% faster on CPU at this size
  t = config.train
  t.steps, t.batch_size, t.log_every = 400, 32, 25
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 50
  config.checkpoint.every = 200
  config.eval.every = 200
  config.eval.max_batches = 8
  config.sample.max_new_tokens = 120
  return config
