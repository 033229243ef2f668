"""LoRA (Hu et al., 2021): a frozen projection plus a trainable low-rank update.

An adapted projection W (nn.Dense or nn.DenseGeneral, kernel [*in, *out]) computes

  y = x W + b + (alpha / R) * dropout(x) A B,    A [*in, R] (fan-in normal), B [R, *out] (zeros)

with A and B stored as `lora_a` and `lora_b` beside W's own `kernel` and `bias`, which keep the
paths they have without LoRA (nn.share_scope). So a base checkpoint is a subset of the adapted
tree, the update starts at exactly 0 (op by op, the logits are the base model's bit for bit;
one jit may fuse the two graphs differently, to an ulp), and zeroing every `lora_b` gives the
base model back. Under nn.scan and the MoE experts' nn.vmap
the adapters gain the same leading [L] and [E] axes as the kernels they adapt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig

DOWN, UP = 'lora_a', 'lora_b'  # A [..., R] and B [R, ...]: zeroing B switches an adapter off
LEAVES = (DOWN, UP)


def is_adapter(path: str) -> bool:
  """Whether a '/'-joined parameter path names a LoRA matrix."""
  return path.rsplit('/', 1)[-1] in LEAVES


def without_lora(model_config: ModelConfig) -> ModelConfig:
  """The base model the adapters sit on: the same config with LoRA off."""
  return dataclasses.replace(model_config, lora=dataclasses.replace(model_config.lora, rank=0))


class Lora(nn.Module):
  """`layer(x)` plus LoRA's update, with the adapters in the layer's own parameter scope."""

  layer: nn.Module  # nn.Dense or nn.DenseGeneral, bound to its parent under its usual name
  config: ModelConfig

  def setup(self):
    nn.share_scope(self, self.layer)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    lora, dtype = self.config.lora, jnp.dtype(self.config.dtype)
    y = self.layer(x)
    kernel = self.get_variable('params', 'kernel')  # boxed, with axis names, at init
    shape = nn.meta.unbox(kernel).shape
    features = self.layer.features
    num_in = len(shape) - (len(features) if isinstance(features, Sequence) else 1)
    names = getattr(kernel, 'names', (None,) * len(shape))
    param_dtype = jnp.dtype(self.config.param_dtype)
    init_a = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal',
                                              in_axis=tuple(range(num_in)), out_axis=-1)
    a = self.param(DOWN, nn.with_logical_partitioning(init_a, (*names[:num_in], None)),
                   (*shape[:num_in], lora.rank), param_dtype)
    b = self.param(UP, nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None, *names[num_in:])),
                   (lora.rank, *shape[num_in:]), param_dtype)
    # Leading axes are the layer input's (B, T; B, C for expert slots); R is the rank.
    x = nn.Dropout(lora.dropout)(x, deterministic=deterministic)
    down_BxTxR = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=num_in)
    update = jnp.tensordot(down_BxTxR * lora.scale, b.astype(dtype), axes=1)
    return y + update.astype(y.dtype)


def adapt(config: ModelConfig, target: str,
          layer: nn.Module) -> Callable[[jax.Array, bool], jax.Array]:
  """`layer`, with LoRA if model.lora adapts `target` (a LORA_TARGETS name).

  Call the result as f(x, deterministic): the adapters' dropout needs to know.
  """
  if config.lora.rank and target in config.lora.targets:
    return Lora(layer, config)
  return lambda x, deterministic=True: layer(x)


def merge(model_config: ModelConfig, params: Any) -> Any:
  """Params of the base model: every kernel + (alpha / R) A B, the adapters dropped.

  The update is formed in float32 on the host (numpy) and cast to the kernel's dtype. Works on
  any leading axes the adapters share with their kernel (layers [L], experts [E]).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  merged = {path: np.asarray(leaf) for path, leaf in flat.items() if path[-1] not in LEAVES}
  for path in flat:
    if path[-1] != DOWN:
      continue
    module = path[:-1]
    a = np.asarray(flat[path], np.float32)
    b = np.asarray(flat[module + (UP,)], np.float32)
    kernel = merged[module + ('kernel',)]
    lead = a.ndim + b.ndim - 2 - kernel.ndim  # stacked axes: [L], [E] or [L, E]
    rank = a.shape[-1]
    a_2d = a.reshape(*a.shape[:lead], -1, rank)
    b_2d = b.reshape(*b.shape[:lead], rank, -1)
    update = (model_config.lora.scale * np.matmul(a_2d, b_2d)).reshape(kernel.shape)
    merged[module + ('kernel',)] = (kernel.astype(np.float32) + update).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(merged)
