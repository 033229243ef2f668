"""The configured normalisation layer (flax's own LayerNorm / RMSNorm)."""

import flax.linen as nn
import jax.numpy as jnp

from lm.config import ModelConfig


def norm(config: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (bias per `use_bias`) or RMSNorm over D.

  Flax computes the statistics in at least float32 whatever the compute dtype, so bf16
  activations are normalised stably; scale and bias are stored in `param_dtype`.
  """
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
  common = dict(
      epsilon=config.norm_eps,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      scale_init=scale_init,
      name=name)
  if config.norm == 'layernorm':
    return nn.LayerNorm(
        use_bias=config.use_bias,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        **common)
  if config.norm == 'rmsnorm':
    return nn.RMSNorm(**common)
  raise ValueError(f'model.norm: {config.norm!r} is not one of layernorm, rmsnorm.')
