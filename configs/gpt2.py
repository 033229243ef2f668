"""GPT-2 (Radford et al., 2019): `--config=configs/gpt2.py:size=small|medium|large|xl|tiny`.

Learned positions, pre-LayerNorm with biases, GELU MLP, tied head, 50257-token vocabulary.
"""

from configs import base
from lm import config as lm_config

# (d_model, num_layers, num_heads)
SIZES = {
    'tiny': (64, 2, 4),
    'small': (768, 12, 12),
    'medium': (1024, 24, 16),
    'large': (1280, 36, 20),
    'xl': (1600, 48, 25),
}


def get_config(arg=None):
  args = lm_config.parse_arg(arg, {'size': 'small'})
  d_model, num_layers, num_heads = lm_config.choose('size', args['size'], SIZES)
  config = base.get_config()
  m = config.model
  m.d_model, m.num_layers = d_model, num_layers
  m.num_heads = m.num_kv_heads = num_heads
  m.pos_emb = 'learned'
  m.ffn = 'mlp'
  m.norm = 'layernorm'
  m.use_bias = True
  m.tie_embeddings = True
  if args['size'] == 'tiny':
    m.max_seq_len = config.data.seq_len = 64
  else:
    m.vocab_size = 50257
    m.max_seq_len = config.data.seq_len = 1024
    # GPT-2 trained with dropout 0.1 everywhere.
    m.embed_dropout = m.attn_dropout = m.resid_dropout = 0.1
  return config
