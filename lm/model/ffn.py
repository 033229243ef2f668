"""Position-wise feed-forward layers: the GELU MLP (GPT-2) and SwiGLU (Llama)."""

import math

import flax.linen as nn
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model import lora as lora_lib
from lm.model import matmul


def residual_std(config: ModelConfig) -> float:
  """Init std of projections that write into the residual stream (GPT-2's 1/sqrt(2L))."""
  return config.init_std / math.sqrt(2 * config.num_layers)


def dense(config: ModelConfig, features: int, axes: tuple[str | None, str | None], *,
          name: str, std: float | None = None, use_bias: bool | None = None,
          dtype: jnp.dtype | None = None, matmul_precision: str | None = None) -> nn.Dense:
  """nn.Dense with a normal(std) kernel and zero bias, both carrying logical axis names, and
  lm.model.matmul's weight gradient.

  Args:
    config: sizes, dtypes and defaults (init_std, use_bias).
    features: output width.
    axes: logical names of the kernel's (input, output) axes; the bias takes the output's.
    name: parameter scope.
    std: kernel init std; default config.init_std.
    use_bias: default config.use_bias.
    dtype: compute dtype; default config.dtype.
    matmul_precision: float32 or bfloat16 operands; default config.matmul_precision.
  """
  std = config.init_std if std is None else std
  return nn.Dense(
      features,
      use_bias=config.use_bias if use_bias is None else use_bias,
      dtype=jnp.dtype(config.dtype) if dtype is None else dtype,
      param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      dot_general=matmul.projection_dot_general(matmul_precision or config.matmul_precision),
      name=name)


class Mlp(nn.Module):
  """D -> F -> D with tanh-approximated GELU, as GPT-2's 'gelu_new'.

  Works on any leading axes (the MoE experts call it on [B, C, D] slots).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    c = self.config
    h_BxTxF = lora_lib.adapt(c, 'ffn', dense(c, c.d_ff, ('embed', 'mlp'), name='fc_in'))(
        x_BxTxD, deterministic)
    h_BxTxF = nn.gelu(h_BxTxF, approximate=True)
    return lora_lib.adapt(c, 'ffn', dense(c, c.d_model, ('mlp', 'embed'), name='fc_out',
                                          std=residual_std(c)))(h_BxTxF, deterministic)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer, 2020); biases only if config.use_bias."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    c = self.config
    adapted = lambda layer: lora_lib.adapt(c, 'ffn', layer)
    gate_BxTxF = adapted(dense(c, c.d_ff, ('embed', 'mlp'), name='gate'))(x_BxTxD, deterministic)
    up_BxTxF = adapted(dense(c, c.d_ff, ('embed', 'mlp'), name='up'))(x_BxTxD, deterministic)
    h_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
    return adapted(dense(c, c.d_model, ('mlp', 'embed'), name='down', std=residual_std(c)))(
        h_BxTxF, deterministic)


def ffn_class(kind: str) -> type[nn.Module]:
  """The dense FFN module for 'mlp' or 'swiglu'."""
  classes = {'mlp': Mlp, 'swiglu': SwiGLU}
  if kind not in classes:
    raise ValueError(f'FFN kind {kind!r} is not one of {", ".join(classes)}.')
  return classes[kind]
