"""Llama-style models: `--config=configs/llama.py:size=llama2_7b|llama3_8b|tiny`.

RoPE, pre-RMSNorm, SwiGLU, no biases, untied head; Llama 3 adds grouped-query attention.
"""

from configs import base
from lm import config as lm_config

SIZES = {
    'tiny': dict(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 d_ff=0, max_seq_len=128, rope_theta=10000.0),
    # Touvron et al., 2023 (Llama 2).
    'llama2_7b': dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, d_ff=11008, max_seq_len=4096, rope_theta=10000.0),
    # Llama 3 8B (Meta, 2024).
    'llama3_8b': dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, d_ff=14336, max_seq_len=8192, rope_theta=500000.0),
}


def get_config(arg=None):
  args = lm_config.parse_arg(arg, {'size': 'tiny'})
  config = base.get_config()
  config.model.update(lm_config.choose('size', args['size'], SIZES))
  llama_style(config.model)
  config.data.seq_len = min(config.model.max_seq_len, 2048)
  return config


def llama_style(m) -> None:
  """The Llama block: shared by the Llama and Mixtral presets."""
  m.pos_emb = 'rope'
  m.norm = 'rmsnorm'
  m.norm_eps = 1e-5
  m.use_bias = False
  m.tie_embeddings = False
  if m.ffn == 'mlp':
    m.ffn = 'swiglu'
