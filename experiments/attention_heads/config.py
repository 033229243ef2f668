"""Study: multi-head vs grouped-query vs multi-query attention at equal parameters.

8 query heads of 16 dims share 8 (MHA), 2 (GQA) or 1 (MQA) key/value heads. Fewer KV heads
free 2 x 128 x 16 parameters per layer for every KV head removed; the GELU MLP is widened by
exactly that much (d_ff 512 -> 608 -> 640), so every variant has the same parameter count.
Measures loss, KV-cache bytes per token and greedy decoding speed.

  python run.py --config=experiments/attention_heads/config.py \
      --workdir=workdirs/attention_heads --mode=sweep
"""

from experiments import common

D_MODEL, HEAD_DIM, D_FF = 128, 16, 512


def get_config(arg=None):
  del arg
  config = common.get_config()
  config.model.ffn, config.model.d_ff = 'mlp', D_FF
  return config


def _equal_params(name: str, kv_heads: int) -> dict:
  # Attention holds 2 x D x (kv_heads x head_dim) K/V weights; an MLP unit costs 2 x D.
  d_ff = D_FF + D_MODEL - kv_heads * HEAD_DIM
  return {'name': name, 'model.num_kv_heads': kv_heads, 'model.d_ff': d_ff}


def get_sweep(arg=None):
  del arg
  return dict(runs=[_equal_params('MHA', 8), _equal_params('GQA-2', 2),
                    _equal_params('MQA', 1)],
              seeds=[0, 1], measure=['decode'])
