"""Mixtral-style sparse mixture of experts: `--config=configs/mixtral.py:size=8x7b|tiny`.

The Llama block with each FFN replaced by 8 SwiGLU experts, 2 active per token, dropless.
"""

from configs import base
from configs import llama
from lm import config as lm_config

SIZES = {
    'tiny': dict(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 d_ff=128, num_experts=4, top_k=2, max_seq_len=128, rope_theta=10000.0),
    # Jiang et al., 2024 (Mixtral of Experts).
    '8x7b': dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 d_ff=14336, num_experts=8, top_k=2, max_seq_len=32768,
                 rope_theta=1000000.0),
}


def get_config(arg=None):
  args = lm_config.parse_arg(arg, {'size': 'tiny'})
  config = base.get_config()
  m = config.model
  m.update(lm_config.choose('size', args['size'], SIZES))
  m.ffn = 'moe'
  m.expert_ffn = 'swiglu'
  m.capacity_factor = 0.0
  llama.llama_style(m)
  config.data.seq_len = min(m.max_seq_len, 2048)
  return config
