"""Direct Preference Optimization (Rafailov et al., 2023): the loss and its reference model.

For a pair (chosen c, rejected r) of responses to one prompt, with log p the summed log-prob of
a response's tokens under the policy and log p_ref under the frozen reference,

  reward(y) = beta * (log p(y) - log p_ref(y))
  loss      = -log sigmoid(reward(c) - reward(r))

so at the start (policy = reference) every pair's loss is log 2. The reference is the model
training started from: a frozen copy of its parameters kept in the train state, or, for a
LoRA run, the very same parameters with the adapters switched off (every `lora_b` zeroed,
which makes each adapter's update B @ A zero), so LoRA-DPO holds no second copy of the model.

Batches hold pairs as [B, 2, T]: index 0 the chosen sequence, 1 the rejected one (see
lm.data.examples); weights are 1 on response tokens only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lm import optim
from lm.model import lora

ADAPTER_LEAF = lora.UP


def sequence_logprobs(logits_NxTxV: jax.Array, targets_NxT: jax.Array,
                      weights_NxT: jax.Array) -> jax.Array:
  """Weighted sum over each sequence of log p(target), in float32: [N]."""
  ce_NxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_NxTxV.astype(jnp.float32), targets_NxT)
  return -jnp.sum(ce_NxT * weights_NxT.astype(jnp.float32), axis=-1)


def dpo_loss(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array,
             beta: float) -> tuple[jax.Array, jax.Array]:
  """(loss_B, reward_Bx2): per-pair DPO loss and the implicit rewards of chosen and rejected."""
  reward_Bx2 = beta * (logp_Bx2 - ref_logp_Bx2)
  loss_B = -jax.nn.log_sigmoid(reward_Bx2[:, 0] - reward_Bx2[:, 1])
  return loss_B, reward_Bx2


def pair_mask(weights_Bx2xT: jax.Array) -> jax.Array:
  """[B] float32: 1 for real pairs, 0 for the padding pairs that fill a last eval batch."""
  return (jnp.sum(weights_Bx2xT[:, 0].astype(jnp.float32), axis=-1) > 0).astype(jnp.float32)


def pair_sums(loss_B: jax.Array, reward_Bx2: jax.Array,
              mask_B: jax.Array) -> dict[str, jax.Array]:
  """Sums over real pairs of what DPO logs: divided by the pair count they give the means."""
  margin_B = reward_Bx2[:, 0] - reward_Bx2[:, 1]
  return {
      'loss_sum': jnp.sum(loss_B * mask_B),
      'reward_accuracy_sum': jnp.sum((margin_B > 0).astype(jnp.float32) * mask_B),
      'reward_margin_sum': jnp.sum(margin_B * mask_B),
      'chosen_reward_sum': jnp.sum(reward_Bx2[:, 0] * mask_B),
      'rejected_reward_sum': jnp.sum(reward_Bx2[:, 1] * mask_B),
  }


def flatten_pairs(x_Bx2xT: jax.Array) -> jax.Array:
  """[B, 2, T] -> [2B, T]: rows 2b and 2b + 1 are pair b's chosen and rejected."""
  return x_Bx2xT.reshape(-1, *x_Bx2xT.shape[2:])


# ---------------------------------------------------------------------------------------------
# The reference model.


def has_adapters(params: Any) -> bool:
  """Whether the parameters carry LoRA adapters (leaves named ADAPTER_LEAF)."""
  return any(map(lora.is_adapter, optim.param_paths(params)))


def adapters_off(params: Any) -> Any:
  """The parameters with every adapter switched off: the LoRA run's reference model.

  Only the small `lora_b` leaves are replaced (by zeros); every base weight is the same array,
  so no copy of the model is made.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if optim.path_str(path).rsplit('/', 1)[-1]
      == ADAPTER_LEAF else x, params)


def check_reference_start(params: Any) -> None:
  """A LoRA-DPO run must start with its adapters off, or its reference would not be the model
  it starts from (say, a LoRA SFT checkpoint whose adapters are not merged yet)."""
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = optim.path_str(path)
    if name.rsplit('/', 1)[-1] == ADAPTER_LEAF and bool(jnp.any(x != 0)):
      raise ValueError(
          f'train.init_from: the starting checkpoint\'s adapter {name} is not zero, so with '
          'LoRA the DPO reference (the adapters switched off) would not be the starting model. '
          'Fold the adapters in first (--mode=merge) and start DPO from the merged checkpoint.')
