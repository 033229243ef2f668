"""Decoder-only transformer language models in Flax linen.

Tensor names carry their shapes, one letter per axis (`logits_BxTxV`), and einsum strings use
the same letters:

  B  batch                              T  time (query positions)
  S  key/value time                     D  d_model, the residual stream
  N  query heads                        K  key/value heads
  G  query heads per KV head (N / K)    H  head_dim
  F  FFN hidden width                   V  vocabulary
  E  experts                            C  expert capacity (slots per expert per sequence)
  A  experts a token is routed to (top_k)
  R  rotary frequencies, relative-position buckets, or the LoRA rank
  I  sinusoidal frequencies (D / 2)     L  layers

The public surface is `Transformer(config)` and pure helpers that read what a MoE model sows
into the mutable collections `apply` returns (`moe_losses`, `expert_load`, `dropped_tokens`).
"""

from lm.model.moe import dropped_tokens, expert_load, moe_losses
from lm.model.transformer import Block, Transformer, unroll_layers

__all__ = ['Block', 'Transformer', 'dropped_tokens', 'expert_load', 'moe_losses',
           'unroll_layers']
