"""Ring attention (Liu et al., 2023): context parallelism over the mesh axis 'context'.

With parallel.mesh_context = C > 1 each device holds a chunk of T / C consecutive positions of
every sequence. Queries stay put; key/value chunks (with their positions and segment ids, so
that document masks, windows and position biases see the true values) travel around the ring
by `lax.ppermute`, and each device folds every chunk it receives into blockwise.py's online
softmax. The [T, S] logits exist one chunk (or one attention_block) at a time, recomputed in
the backward pass. The forward pass holds two key chunks at a time; the backward pass (plain
autodiff through the ring's scan) keeps each step's chunk, so K and V of the whole sequence,
which grows with T, not T^2 (a hand-written backward ring would pass them around again).

Causality by index makes every chunk that starts after a device's own fully masked: the fold
is skipped (lax.cond), so device i computes i + 1 of the C chunks. The last device does C
folds while the first does one: the ring's time is that of a full chunk per step, a load
imbalance that a zigzag (striped) layout of the sequence would even out.

The rest of the model is not changed: XLA shards its [B, T, ...] activations along T by the
'length' rule, and `attention` is the only place that runs per device (jax.shard_map, manual
over 'context' only, so the batch and heads stay sharded as the mesh has them). The mesh comes
from the context that lm.parallel.MeshParallel traces the step under (jax.set_mesh); outside a
mesh, or with one device on 'context', the model never calls this module.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lm.config import CONTEXT_AXIS
from lm.model import blockwise

P = jax.sharding.PartitionSpec
# attention.attention_mask's positional arguments: (q_positions_BxT, k_positions_BxS,
# q_segment_ids_BxT, k_segment_ids_BxS, q_order_T, k_order_S) -> [B, T, S] bool.
MaskFn = Callable[..., jax.Array]
# (q_positions_BxT, k_positions_BxS, *arrays) -> [B, N, T, S] float32, as ALiBi's or T5's.
BiasFn = Callable[..., jax.Array]


def context_shards() -> int:
  """Devices along 'context' in the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[CONTEXT_AXIS]


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
              positions_BxT: jax.Array, segment_ids_BxT: jax.Array, mask_fn: MaskFn,
              bias_fn: BiasFn | None = None, bias_arrays: tuple[jax.Array, ...] = (),
              block: int = 0, softcap: float = 0.0) -> jax.Array:
  """Causal self-attention [B, T, N, H] (q's dtype) with T split over the 'context' ring.

  Takes global arrays and the mesh of the current context. Each chunk of keys is folded
  `block` keys at a time (0: the whole chunk at once), as attention_impl=blockwise does.
  The arrays the bias needs (T5's table) come as `bias_arrays`, not closed over: a traced
  value closed over by the shard_map keeps the sharding of the mesh outside it, which its
  gradient then trips over.
  """
  shards, seq_len = context_shards(), q_BxTxNxH.shape[1]
  if seq_len % shards:
    raise ValueError(
        f'Ring attention splits the sequence over parallel.mesh_context={shards} devices, but '
        f'it has {seq_len} positions. Use a data.seq_len (and batches) divisible by {shards}.')
  kernel = functools.partial(_ring, mask_fn=mask_fn, bias_fn=bias_fn, block=block,
                             softcap=softcap)
  spec = P(None, CONTEXT_AXIS)  # [B, T, ...]: T split; the other mesh axes stay automatic
  # check_vma=False: with it on, a replicated input (the bias table) used inside the skipping
  # lax.cond is cast to 'varying' inside the branch, and the transpose puts that cast's psum
  # inside the cond, which only some devices run: a deadlock (cf. jax#40823). Off, such
  # cotangents are summed once, at the shard_map boundary.
  return jax.shard_map(kernel, in_specs=(spec,) * 5 + (P(),), out_specs=spec,
                       axis_names={CONTEXT_AXIS}, check_vma=False)(
                           q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT,
                           tuple(bias_arrays))


def _ring(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
          positions_BxT: jax.Array, segment_ids_BxT: jax.Array, bias_arrays: tuple[jax.Array, ...],
          *, mask_fn: MaskFn, bias_fn: BiasFn | None, block: int, softcap: float) -> jax.Array:
  """One device's share: its T (= S) local positions against every chunk of the ring."""
  shards, me = lax.axis_size(CONTEXT_AXIS), lax.axis_index(CONTEXT_AXIS)
  chunk = q_BxTxNxH.shape[1]
  q_order_T = me * chunk + jnp.arange(chunk, dtype=jnp.int32)
  q_BxTxKxGxH = blockwise.group_heads(q_BxTxNxH, k_BxSxKxH.shape[2])
  bias = None if bias_fn is None else (
      lambda k_positions_BxS: bias_fn(positions_BxT, k_positions_BxS, *bias_arrays))

  def fold(partial: blockwise.Partial, keys: tuple[jax.Array, ...],
           source: jax.Array) -> blockwise.Partial:
    """Folds in the keys of chunk `source`, unless all of them come after every query here."""
    k_order_S = source * chunk + jnp.arange(chunk, dtype=jnp.int32)
    mask = lambda pos, seg, order: mask_fn(positions_BxT, pos, segment_ids_BxT, seg,
                                           q_order_T, order)
    attend = lambda: blockwise.fold(partial, q_BxTxKxGxH, *keys, k_order_S, mask, bias, block,
                                    softcap)
    return lax.cond(source <= me, attend, lambda: partial)

  # Device i receives from i - 1, so at step s it holds chunk (i - s) mod C. Each step sends
  # the chunk on before folding it, so the transfer can overlap the compute.
  ring = [(i, (i + 1) % shards) for i in range(shards)]

  def step(carry, s):
    partial, keys = carry
    arriving = lax.ppermute(keys, CONTEXT_AXIS, ring)
    return (fold(partial, keys, (me - s) % shards), arriving), None

  keys = (k_BxSxKxH, v_BxSxKxH, positions_BxT, segment_ids_BxT)
  (partial, keys), _ = lax.scan(step, (blockwise.init(q_BxTxKxGxH), keys),
                                jnp.arange(shards - 1))
  partial = fold(partial, keys, (me + 1) % shards)  # the last chunk: nothing left to send
  return blockwise.finish(partial).reshape(q_BxTxNxH.shape).astype(q_BxTxNxH.dtype)
