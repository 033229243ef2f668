"""Study: a dense SwiGLU FFN vs mixtures of experts at equal active parameters.

Every variant spends the same FFN FLOPs per token: the dense model's 352-wide SwiGLU, one of 4
experts of the same width (top-1), or two of 8 experts half as wide (top-2). The MoE models hold
more parameters in total but activate the dense model's count (plus a tiny router). Measures
loss, how evenly the router spreads tokens (the busiest expert's share x experts, 1 = even),
the token-to-expert assignments dropped at capacity factor 1.25, and training tokens/s.

  python run.py --config=experiments/moe/config.py --workdir=workdirs/moe --mode=sweep
"""

from experiments import common

D_FF = 352


def get_config(arg=None):
  del arg
  config = common.get_config()
  config.model.d_ff = D_FF  # MoE runs keep base's capacity factor 1.25 (Switch Transformer)
  return config


def get_sweep(arg=None):
  del arg
  return dict(runs=[
      {'name': 'dense'},
      {'name': 'moe-4x1', 'model.ffn': 'moe', 'model.num_experts': 4, 'model.top_k': 1},
      {'name': 'moe-8x2', 'model.ffn': 'moe', 'model.num_experts': 8, 'model.top_k': 2,
       'model.d_ff': D_FF // 2},
  ], seeds=[0, 1], measure=['expert_load'])
