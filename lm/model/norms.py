"""The configured normalisation layer: flax's LayerNorm / RMSNorm statistics, then scale and bias."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model import matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine(x_hat_XxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None,
            has_bias: bool) -> jax.Array:
  """x_hat * scale (+ bias), float32; X stands for the leading (token) axes."""
  y_XxD = x_hat_XxD * scale_D.astype(jnp.float32)
  return y_XxD + bias_D.astype(jnp.float32) if has_bias else y_XxD


def _affine_fwd(x_hat_XxD, scale_D, bias_D, has_bias):
  return _affine(x_hat_XxD, scale_D, bias_D, has_bias), (x_hat_XxD, scale_D, bias_D)


def _affine_bwd(has_bias, residuals, dy_XxD):
  """The scale and bias gradients sum over the tokens as matrix-vector products on CPU."""
  x_hat_XxD, scale_D, bias_D = residuals
  dscale_D = matmul.sum_leading(dy_XxD * x_hat_XxD).astype(scale_D.dtype)
  dbias_D = matmul.sum_leading(dy_XxD).astype(bias_D.dtype) if has_bias else None
  return dy_XxD * scale_D.astype(jnp.float32), dscale_D, dbias_D


_affine.defvjp(_affine_fwd, _affine_bwd)


class Norm(nn.Module):
  """LayerNorm (bias per `use_bias`) or RMSNorm over D, with parameters 'scale' (and 'bias').

  Flax computes the statistics (in float32 whatever the compute dtype, so bf16 activations are
  normalised stably); the scale and bias, stored in `param_dtype`, are applied in float32 before
  the cast to the compute dtype, as in flax's own layers (which fold the scale into the inverse
  standard deviation: the result differs in the last bit). The custom VJP, and with it the
  ban on forward-mode derivatives, applies only where matmul.sum_leading multiplies.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_XxD: jax.Array) -> jax.Array:
    c = self.config
    param_dtype = jnp.dtype(c.param_dtype)
    if c.norm == 'layernorm':
      x_hat_XxD = nn.LayerNorm(epsilon=c.norm_eps, dtype=jnp.float32, use_bias=False,
                               use_scale=False, name='stats')(x_XxD)
    elif c.norm == 'rmsnorm':
      x_hat_XxD = nn.RMSNorm(epsilon=c.norm_eps, dtype=jnp.float32, use_scale=False,
                             name='stats')(x_XxD)
    else:
      raise ValueError(f'model.norm: {c.norm!r} is not one of layernorm, rmsnorm.')
    features = x_XxD.shape[-1]
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                         (features,), param_dtype)
    has_bias = c.norm == 'layernorm' and c.use_bias
    bias_D = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                        (features,), param_dtype) if has_bias else None
    affine = _affine if matmul.sums_by_matvec() else _affine.fun
    return affine(x_hat_XxD, scale_D, bias_D, has_bias).astype(jnp.dtype(c.dtype))


def norm(config: ModelConfig, name: str) -> nn.Module:
  """The configured norm layer, named `name`."""
  return Norm(config, name=name)
