"""Token embedding, absolute positions, and the LM head (tied or untied).

Token ids are not range-checked here (that would need a host sync): the data layer checks that
every id lies in [0, vocab_size), and lm.config.with_vocab_size sizes the table to the
tokenizer. An id outside the range is never clamped or wrapped to a valid row: ids >= vocab_size
get NaN embeddings from jnp.take's default 'fill' mode, and negative ids (which would wrap, numpy
style, to the last rows) are moved past the table first, so such a bug shows as a NaN loss rather
than a silently wrong one.
"""

import flax.linen as nn
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model import ffn as ffn_lib
from lm.model import positions as positions_lib

# GPT-2 initialises its learned position table with std 0.01 (tokens: init_std).
LEARNED_POSITION_STD = 0.01


def embed(config: ModelConfig, tokens_BxT: jnp.ndarray,
          positions_BxT: jnp.ndarray) -> tuple[jnp.ndarray, nn.Embed]:
  """Token embedding plus absolute positions ('learned' or 'sinusoidal'), in config.dtype.

  Must be called inside a compact module; creates `embed` (and `pos_embed`) there. Other
  position schemes (rope, alibi, relative, none) act inside attention, not here.

  Returns:
    The embedded sequence and the token embedding module (for a tied head).
  """
  dtype = jnp.dtype(config.dtype)
  token_embed = nn.Embed(
      config.vocab_size, config.d_model, dtype=dtype,
      param_dtype=jnp.dtype(config.param_dtype),
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(config.init_std), ('vocab', 'embed')),
      name='embed')
  x_BxTxD = token_embed(jnp.where(tokens_BxT < 0, config.vocab_size, tokens_BxT))
  if config.pos_emb == 'learned':
    pos_embed = nn.Embed(
        config.max_seq_len, config.d_model, dtype=dtype,
        param_dtype=jnp.dtype(config.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(LEARNED_POSITION_STD), (None, 'embed')),
        name='pos_embed')
    x_BxTxD = x_BxTxD + pos_embed(positions_BxT)
  elif config.pos_emb == 'sinusoidal':
    x_BxTxD = x_BxTxD + positions_lib.sinusoidal(positions_BxT, config.d_model).astype(dtype)
  return x_BxTxD, token_embed


def logits(config: ModelConfig, x_BxTxD: jnp.ndarray, token_embed: nn.Embed) -> jnp.ndarray:
  """The LM head in float32: x @ embedding.T if tied, else the `lm_head` Dense (no bias).

  The tied product reads the embedding table directly because nn.Embed.attend would compute
  in the compute dtype. An optional final_logit_softcap squashes with cap * tanh(z / cap).
  """
  x_BxTxD = x_BxTxD.astype(jnp.float32)
  if config.tie_embeddings:
    embedding_VxD = jnp.asarray(token_embed.embedding, jnp.float32)
    logits_BxTxV = jnp.einsum('BTD,VD->BTV', x_BxTxD, embedding_VxD)
  else:
    head = ffn_lib.dense(config, config.vocab_size, ('embed', 'vocab'), name='lm_head',
                         use_bias=False, dtype=jnp.float32, matmul_precision='float32')
    logits_BxTxV = head(x_BxTxD)
  if config.final_logit_softcap > 0:
    cap = config.final_logit_softcap
    logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
  return logits_BxTxV
