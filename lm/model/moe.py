"""Mixture-of-experts FFN: top-k routing with Switch/GShard-style capacity dispatch.

What the layer sows, per layer (stacked along L under nn.scan), when `apply` is called with
`mutable=['losses', 'intermediates']`:

  losses/router_aux_loss       Switch load-balancing loss, UNWEIGHTED (1.0 when balanced)
  losses/router_z_loss         router z-loss, UNWEIGHTED
  intermediates/expert_load    [E] share of the token->expert assignments each expert received
  intermediates/dropped_tokens number of token->expert assignments dropped for capacity

The trainer adds `router_aux_loss_weight * aux + router_z_loss_weight * z` using `moe_losses`.
"""

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lm.config import ModelConfig
from lm.model import ffn as ffn_lib


def capacity(config: ModelConfig, tokens: int) -> int:
  """Slots per expert for a group of `tokens` tokens; 0 means dropless.

  C = ceil(capacity_factor * tokens * top_k / E), capped at `tokens` since a token takes at
  most one slot per expert (so C = tokens can never drop).
  """
  if config.capacity_factor == 0:
    return 0
  c = math.ceil(config.capacity_factor * tokens * config.top_k / config.num_experts)
  return min(c, tokens)


def _experts(config: ModelConfig, mapped_input: bool) -> nn.Module:
  """E copies of the expert FFN with weights stacked on a leading 'expert' axis ([E, D, F])."""
  return nn.vmap(
      ffn_lib.ffn_class(config.expert_ffn),
      in_axes=(0 if mapped_input else None, None),  # (slots, deterministic)
      out_axes=0,
      variable_axes={'params': 0},
      split_rngs={'params': True, 'dropout': True},
      axis_size=config.num_experts,
      metadata_params={nn.PARTITION_NAME: 'expert'},
  )(config, name='experts')


class MoE(nn.Module):
  """Routes each token to its top_k experts; gates renormalised over the k chosen (Mixtral).

  Each sequence (row) is a dispatch group. With capacity_factor > 0 each expert takes at most
  C tokens of a row, filled in token order (position-major, then choice), so whether a token
  is dropped depends only on earlier tokens and the layer stays causal (packed documents in a
  row share its capacity, and a prefill of P tokens gets a capacity for P). A dropped
  assignment contributes 0 and the residual carries the token through. With
  capacity_factor = 0 every expert runs on every token and the gates select (exact, no
  drops, E/top_k times the expert FLOPs: meant for small models and for checking).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, valid_BxT: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Mixes each token's experts; tokens where `valid_BxT` is False (padding) are not routed:
    they take no capacity, count in no statistic and get a zero output. `deterministic` is for
    the experts' LoRA dropout."""
    c = self.config
    E, A = c.num_experts, c.top_k
    B, T, _ = x_BxTxD.shape
    dtype = jnp.dtype(c.dtype)

    router = ffn_lib.dense(c, E, ('embed', None), name='router', use_bias=False,
                           dtype=jnp.float32, matmul_precision='float32')
    logits_BxTxE = router(x_BxTxD.astype(jnp.float32))
    probs_BxTxE = jax.nn.softmax(logits_BxTxE, axis=-1)
    top_probs_BxTxA, expert_BxTxA = jax.lax.top_k(probs_BxTxE, A)
    gates_BxTxA = top_probs_BxTxA / jnp.sum(top_probs_BxTxA, axis=-1, keepdims=True)
    valid_BxT = (jnp.ones((B, T), jnp.float32) if valid_BxT is None
                 else valid_BxT.astype(jnp.float32))
    choice_BxTxAxE = (jax.nn.one_hot(expert_BxTxA, E, dtype=jnp.float32)
                      * valid_BxT[:, :, None, None])
    # A token picks distinct experts, so at most one of its A choices names each expert.
    chosen_BxTxE = jnp.sum(choice_BxTxAxE, axis=2)
    gate_BxTxE = jnp.einsum('BTA,BTAE->BTE', gates_BxTxA, choice_BxTxAxE)

    num_valid = jnp.maximum(jnp.sum(valid_BxT), 1.0)
    load_E = jnp.sum(chosen_BxTxE, axis=(0, 1)) / (num_valid * A)
    mean_probs_E = jnp.einsum('BTE,BT->E', probs_BxTxE, valid_BxT) / num_valid
    aux_loss = E * jnp.sum(load_E * mean_probs_E)
    z_loss = jnp.sum(jax.nn.logsumexp(logits_BxTxE, axis=-1) ** 2 * valid_BxT) / num_valid
    self._sow('losses', 'router_aux_loss', aux_loss)
    self._sow('losses', 'router_z_loss', z_loss)
    self._sow('intermediates', 'expert_load', load_E)

    C = capacity(c, T)
    if C == 0:
      y_ExBxTxD = _experts(c, mapped_input=False)(x_BxTxD, deterministic)
      y_BxTxD = jnp.einsum('BTE,EBTD->BTD', gate_BxTxE.astype(dtype), y_ExBxTxD)
      self._sow('intermediates', 'dropped_tokens', jnp.zeros((), jnp.int32))
      return y_BxTxD

    # Slot of each assignment in its expert's queue, counted over (T, A) in order; -1 if the
    # expert was not chosen. one_hot maps -1 and slots >= C (the dropped) to all zeros.
    order_BxTxAxE = jnp.cumsum(choice_BxTxAxE.reshape(B, T * A, E), axis=1).reshape(B, T, A, E)
    slot_BxTxE = jnp.sum((order_BxTxAxE - 1) * choice_BxTxAxE, axis=2)
    slot_BxTxE = jnp.where(chosen_BxTxE > 0, slot_BxTxE, -1).astype(jnp.int32)
    dispatch_BxTxExC = jax.nn.one_hot(slot_BxTxE, C, dtype=dtype)
    combine_BxTxExC = dispatch_BxTxExC * gate_BxTxE.astype(dtype)[..., None]
    kept = jnp.sum(dispatch_BxTxExC, dtype=jnp.float32)
    self._sow('intermediates', 'dropped_tokens',
             (jnp.sum(chosen_BxTxE) - kept).astype(jnp.int32))

    x_ExBxCxD = jnp.einsum('BTEC,BTD->EBCD', dispatch_BxTxExC, x_BxTxD.astype(dtype))
    y_ExBxCxD = _experts(c, mapped_input=True)(x_ExBxCxD, deterministic)
    return jnp.einsum('BTEC,EBCD->BTD', combine_BxTxExC, y_ExBxCxD)

  def _sow(self, collection: str, name: str, value: jnp.ndarray) -> None:
    # Not at init, where every collection is mutable: the values would land in the variables
    # and every later apply would append to them.
    if not self.is_initializing():
      self.sow(collection, name, value)


def _sown(state: Mapping[str, Any], collection: str, name: str) -> list[jnp.ndarray]:
  """Every value sown as `name` in `collection`, in layer order (scan: one [L, ...] array)."""
  flat = traverse_util.flatten_dict(dict(state.get(collection, {})))
  return [value for path, values in flat.items() if path[-1] == name for value in values]


def moe_losses(state: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
  """Router losses summed over layers, UNWEIGHTED, from the mutable state `apply` returned.

  `logits, state = model.apply(variables, tokens, mutable=['losses', 'intermediates'])`;
  then `loss + cfg.router_aux_loss_weight * l['router_aux_loss']
  + cfg.router_z_loss_weight * l['router_z_loss']`. Both keys are always present (0.0 for a
  dense model), so a train step needs no branch.
  """
  return {name: sum((jnp.sum(v, dtype=jnp.float32) for v in _sown(state, 'losses', name)),
                    jnp.zeros((), jnp.float32))
          for name in ('router_aux_loss', 'router_z_loss')}


def expert_load(state: Mapping[str, Any]) -> jnp.ndarray | None:
  """[L, E] share of the token->expert assignments (before capacity drops) per layer; rows
  sum to 1 (uniform: 1/E). None for a dense model."""
  loads = _sown(state, 'intermediates', 'expert_load')
  if not loads:
    return None
  return jnp.concatenate([jnp.reshape(v, (-1, v.shape[-1])) for v in loads])


def dropped_tokens(state: Mapping[str, Any]) -> jnp.ndarray:
  """Token->expert assignments dropped for capacity, summed over layers (0 if dense)."""
  return sum((jnp.sum(v) for v in _sown(state, 'intermediates', 'dropped_tokens')),
             jnp.zeros((), jnp.int32))
