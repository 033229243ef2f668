"""The decoder-only transformer: pre- or post-norm blocks, scanned or unrolled, with remat."""

from typing import Callable

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model import embed as embed_lib
from lm.model import ffn as ffn_lib
from lm.model import matmul
from lm.model import moe as moe_lib
from lm.model.attention import Attention
from lm.model.norms import norm

# The 'dots' policies also save Dense matmuls, which on CPU are lm.model.matmul's custom VJP.
_SAVE_DENSE = jax.checkpoint_policies.save_only_these_names(matmul.CHECKPOINT_NAME)
_REMAT_POLICIES = {
    'full': None,  # save nothing, recompute the whole block
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _SAVE_DENSE),
    'dots_no_batch': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _SAVE_DENSE),
}


def pin_residual(x_BxTxD: jnp.ndarray) -> jnp.ndarray:
  """Keeps a residual-stream activation split over batch and sequence, d_model whole.

  Under a mesh (lm.parallel traces steps under its logical axis rules) XLA's propagation would
  otherwise follow FSDP's weights, sharded along d_model, and all-reduce full-batch activations;
  pinned, it all-gathers each weight where it is used. Without rules (one device, pmap) this is
  the identity.
  """
  return nn.with_logical_constraint(x_BxTxD, ('batch', 'length', None))


def _sublayer(config: ModelConfig, norm_name: str,
              fn: Callable[[jnp.ndarray], jnp.ndarray], x_BxTxD: jnp.ndarray,
              deterministic: bool) -> jnp.ndarray:
  """Pre-norm x + drop(f(norm(x))) (GPT-2, Llama) or post-norm norm(x + drop(f(x)))."""
  drop = nn.Dropout(config.resid_dropout, deterministic=deterministic)
  normed = lambda h_BxTxD: pin_residual(norm(config, norm_name)(h_BxTxD))
  branch = lambda h_BxTxD: pin_residual(drop(fn(h_BxTxD)))
  if config.norm_position == 'pre':
    return pin_residual(x_BxTxD + branch(normed(x_BxTxD)))
  return normed(x_BxTxD + branch(x_BxTxD))


class Block(nn.Module):
  """Attention then FFN (Mlp, SwiGLU or MoE), each with a residual connection.

  Flags are positional so that nn.remat can mark them static.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, positions_BxT: jnp.ndarray,
               segment_ids_BxT: jnp.ndarray | None = None, deterministic: bool = True,
               decode: bool = False) -> jnp.ndarray:
    c = self.config
    attn = Attention(c, name='attn')
    x_BxTxD = _sublayer(
        c, 'attn_norm',
        lambda h: attn(h, positions_BxT, segment_ids_BxT, deterministic=deterministic,
                       decode=decode),
        x_BxTxD, deterministic)
    if c.ffn == 'moe':
      # Segment id 0 marks padding (data layer, sampler): it must not take expert capacity.
      valid_BxT = None if segment_ids_BxT is None else segment_ids_BxT != 0
      moe = moe_lib.MoE(c, name='ffn')
      ffn = lambda h: moe(h, valid_BxT, deterministic)
    else:
      dense_ffn = ffn_lib.ffn_class(c.ffn)(c, name='ffn')
      ffn = lambda h: dense_ffn(h, deterministic)
    return _sublayer(c, 'ffn_norm', ffn, x_BxTxD, deterministic)


def _block_class(config: ModelConfig) -> type[nn.Module]:
  """Block, wrapped in nn.remat with the configured policy (flags static)."""
  if config.remat == 'none':
    return Block
  if config.remat not in _REMAT_POLICIES:
    raise ValueError(f'model.remat: {config.remat!r} is not one of none, '
                     f'{", ".join(_REMAT_POLICIES)}.')
  # Inside scan the loop already keeps XLA from merging the recomputation away.
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat],
                  prevent_cse=not config.scan_layers, static_argnums=(4, 5))


class Transformer(nn.Module):
  """Decoder-only LM: tokens [B, T] -> float32 logits [B, T, V].

  Param tree: embed, pos_embed ('learned' only), layers (scanned, every leaf with a leading L
  axis) or layer_0..layer_{L-1}, each with attn_norm, attn, ffn_norm, ffn; final_norm
  (pre-norm only); lm_head (untied only).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
               segment_ids_BxT: jnp.ndarray | None = None, *, deterministic: bool = True,
               decode: bool = False) -> jnp.ndarray:
    """Logits for every position.

    Args:
      tokens_BxT: int token ids in [0, vocab_size) (checked by the data layer).
      positions_BxT: position of each token; default arange(T). Packed sequences restart
        it per document; decoding must pass the absolute positions of the new tokens.
      segment_ids_BxT: document id per token for packed sequences (attention stays within a
        document); None: one document per row.
      deterministic: False enables dropout (rng 'dropout').
      decode: use and update the KV cache in the 'cache' collection (created by `init` with
        decode=True on tokens [B, max_len]).

    Returns:
      float32 logits [B, T, V].
    """
    c = self.config
    if c.vocab_size <= 0:
      raise ValueError(
          f'model.vocab_size is {c.vocab_size} (meaning "the tokenizer\'s size"), so the '
          'model has no vocabulary yet: resolve it with '
          'lm.config.with_vocab_size(config.model, tokenizer_vocab_size) before building '
          'the Transformer.')
    if positions_BxT is None:
      if decode and not self.is_initializing():
        raise ValueError('Transformer(decode=True) needs positions_BxT: the absolute '
                         'positions of the tokens being decoded.')
      positions_BxT = jnp.broadcast_to(
          jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)

    x_BxTxD, token_embed = embed_lib.embed(c, tokens_BxT, positions_BxT)
    x_BxTxD = pin_residual(nn.Dropout(c.embed_dropout, deterministic=deterministic)(x_BxTxD))

    block_cls = _block_class(c)
    if c.scan_layers:
      def body(block, x_BxTxD, positions_BxT, segment_ids_BxT):
        return block(x_BxTxD, positions_BxT, segment_ids_BxT, deterministic, decode), None

      layers = nn.scan(
          body,
          variable_axes={'params': 0, 'cache': 0, 'losses': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxD, _ = layers(block_cls(c, name='layers'), x_BxTxD, positions_BxT,
                          segment_ids_BxT)
    else:
      for i in range(c.num_layers):
        x_BxTxD = block_cls(c, name=f'layer_{i}')(
            x_BxTxD, positions_BxT, segment_ids_BxT, deterministic, decode)

    if c.norm_position == 'pre':  # post-norm blocks already end with a norm
      x_BxTxD = pin_residual(norm(c, 'final_norm')(x_BxTxD))
    return embed_lib.logits(c, x_BxTxD, token_embed)


def unroll_layers(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """The same model with its scanned layer stack split into layer_0..layer_{L-1}.

  The parameters are the same numbers. Decoding wants this: under nn.scan every decode step
  re-stacks the whole [L, ...] KV cache (a copy per token), while unrolled layers each update
  their own cache in place.
  """
  if not config.scan_layers:
    return config, params
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(config.num_layers):
    params[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return dataclasses.replace(config, scan_layers=False), params
