"""One jitted forward pass that keeps what inspect shows: the pure, numeric half of inspect.

The model is run as it is. Its intermediates come out through flax: `capture_intermediates`
records each block's output (the residual stream) and each MoE router's logits, and attention
sows its softmax weights into the 'attention_weights' collection on the einsum ('xla') path.
The logit lens reuses the model's own embedding, final norm and LM head (`lens_logits`), so at
the last layer it is the model's output exactly.

Axis letters as in lm.model, plus L for the residual streams: the embeddings, then the output
of each of the model's layers (num_layers + 1 streams).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import config as lm_config
from lm import model as lm_model
from lm.model import embed as embed_lib
from lm.model import moe as moe_lib
from lm.model.norms import norm


def inspect_config(model_config: lm_config.ModelConfig) -> lm_config.ModelConfig:
  """The same model (same parameters and numbers) set up to expose its internals.

  Attention on the einsum path (the only one that materialises its weights), no remat (a
  forward pass has nothing to save) and unrolled layers (one name per layer to capture).
  """
  return dataclasses.replace(model_config, attention_impl='xla', remat='none',
                             scan_layers=False)


def prepare(model_config: lm_config.ModelConfig,
            params: Any) -> tuple[lm_config.ModelConfig, Any]:
  """inspect_config and parameters in its (unrolled) layout."""
  model_config, params = lm_model.unroll_layers(model_config, params)
  return inspect_config(model_config), params


class _Lens(nn.Module):
  """The Transformer's embedding and head, with its parameter names, on any residual stream."""

  config: lm_config.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
               x_BxTxD: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    c = self.config
    x0_BxTxD, token_embed = embed_lib.embed(c, tokens_BxT, positions_BxT)
    x_BxTxD = x0_BxTxD if x_BxTxD is None else x_BxTxD
    if c.norm_position == 'pre':  # post-norm streams leave every block normalised
      x_BxTxD = norm(c, 'final_norm')(x_BxTxD)
    return x0_BxTxD, embed_lib.logits(c, x_BxTxD, token_embed)


def lens_logits(model_config: lm_config.ModelConfig, params: Any, tokens_BxT: jax.Array,
                x_BxTxD: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(embeddings x0 [B, T, D], float32 logits [B, T, V] the model's head reads off x_BxTxD).

  x_BxTxD None reads the embeddings themselves. `params` may be the whole model's.
  """
  positions_BxT = _positions(tokens_BxT)
  return _Lens(model_config).apply({'params': params}, tokens_BxT, positions_BxT, x_BxTxD)


def _positions(tokens_BxT: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)


def _captured(module: nn.Module, method_name: str) -> bool:
  """capture_intermediates filter: block outputs and MoE router logits."""
  if method_name != '__call__':
    return False
  return isinstance(module, lm_model.Block) or (
      module.name == 'router' and isinstance(module.parent, moe_lib.MoE))


def _top_k(logits_BxTxV: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-probabilities [B, T, V], top-k probabilities [B, T, k], their ids [B, T, k])."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  top_logp_BxTxK, top_ids_BxTxK = jax.lax.top_k(logp_BxTxV, k)
  return logp_BxTxV, jnp.exp(top_logp_BxTxK), top_ids_BxTxK.astype(jnp.int32)


def forward(model_config: lm_config.ModelConfig, top_k: int, params: Any,
            tokens_BxT: jax.Array) -> dict[str, jax.Array]:
  """Everything inspect reports about tokens_BxT, as arrays (pure; `capture` jits it).

  `model_config` and `params` come from `prepare`. Keys:
    logits_BxTxV                  the model's output
    top_probs_BxTxK, top_ids_BxTxK   the k most likely next tokens at every position
    next_prob_BxT, next_rank_BxT  probability and rank (1 = top) of the token that came next
                                  (the last position has none: NaN and 0)
    lens_probs_LxBxTxK, lens_ids_LxBxTxK   logit lens: top-k of each residual stream
    lens_final_prob_LxBxT         each stream's probability of the model's own top-1 token
    streams_LxBxTxD               the residual streams themselves
    resid_norm_LxBxT              L2 norm of each residual stream
    attention_LxBxNxTxS           softmax weights per layer and query head (S = T)
    router_probs_LxBxTxE, experts_LxBxTxA, gates_LxBxTxA   MoE only (L = layers here):
                                  router softmax, chosen experts and their renormalised gates
  """
  c = model_config
  model = lm_model.Transformer(c)
  logits_BxTxV, state = model.apply({'params': params}, tokens_BxT,
                                    capture_intermediates=_captured,
                                    mutable=['intermediates', 'attention_weights'])
  layers = [f'layer_{i}' for i in range(c.num_layers)]
  captured, sown = state['intermediates'], state['attention_weights']
  x0_BxTxD, _ = lens_logits(c, params, tokens_BxT)
  streams_LxBxTxD = jnp.stack([x0_BxTxD] + [captured[name]['__call__'][0] for name in layers])

  logp_BxTxV, top_probs_BxTxK, top_ids_BxTxK = _top_k(logits_BxTxV, top_k)
  next_BxT = jnp.roll(tokens_BxT, -1, axis=1)  # the token after each position
  next_logp_BxT = jnp.take_along_axis(logp_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
  next_rank_BxT = 1 + jnp.sum(logp_BxTxV > next_logp_BxT[..., None], axis=-1)
  has_next_T = jnp.arange(tokens_BxT.shape[1]) < tokens_BxT.shape[1] - 1
  final_top_BxT = top_ids_BxTxK[..., 0]

  def lens(x_BxTxD):
    _, logits = lens_logits(c, params, tokens_BxT, x_BxTxD)
    logp, probs, ids = _top_k(logits, top_k)
    final_BxT = jnp.exp(jnp.take_along_axis(logp, final_top_BxT[..., None], axis=-1)[..., 0])
    return probs, ids, final_BxT

  # One stream at a time: [L, B, T, V] logits at once would not fit for long prompts.
  lens_probs_LxBxTxK, lens_ids_LxBxTxK, lens_final_LxBxT = jax.lax.map(lens, streams_LxBxTxD)
  out = dict(
      logits_BxTxV=logits_BxTxV, top_probs_BxTxK=top_probs_BxTxK, top_ids_BxTxK=top_ids_BxTxK,
      next_prob_BxT=jnp.where(has_next_T, jnp.exp(next_logp_BxT), jnp.nan),
      next_rank_BxT=jnp.where(has_next_T, next_rank_BxT, 0),
      lens_probs_LxBxTxK=lens_probs_LxBxTxK, lens_ids_LxBxTxK=lens_ids_LxBxTxK,
      lens_final_prob_LxBxT=lens_final_LxBxT, streams_LxBxTxD=streams_LxBxTxD,
      resid_norm_LxBxT=jnp.linalg.norm(streams_LxBxTxD.astype(jnp.float32), axis=-1),
      attention_LxBxNxTxS=jnp.stack([sown[name]['attn']['probs'][0] for name in layers]))
  if c.ffn == 'moe':
    router_LxBxTxE = jnp.stack([captured[name]['ffn']['router']['__call__'][0]
                                for name in layers]).astype(jnp.float32)
    router_probs_LxBxTxE = jax.nn.softmax(router_LxBxTxE, axis=-1)
    top_probs_LxBxTxA, experts_LxBxTxA = jax.lax.top_k(router_probs_LxBxTxE, c.top_k)  # as moe.py
    out.update(router_probs_LxBxTxE=router_probs_LxBxTxE, experts_LxBxTxA=experts_LxBxTxA,
               gates_LxBxTxA=top_probs_LxBxTxA / jnp.sum(top_probs_LxBxTxA, -1, keepdims=True))
  return out


@functools.lru_cache(maxsize=8)
def _compiled_forward(model_config: lm_config.ModelConfig, top_k: int):
  return jax.jit(functools.partial(forward, model_config, top_k))


def capture(model_config: lm_config.ModelConfig, params: Any, tokens_BxT: Any,
            top_k: int = 10) -> dict[str, np.ndarray]:
  """`forward` jitted (compiled once per model, k and prompt length), as numpy arrays.

  Takes any model config and parameters (scanned or not, any attention implementation).
  """
  model_config, params = prepare(model_config, params)
  top_k = min(top_k, model_config.vocab_size)
  out = _compiled_forward(model_config, top_k)(params, jnp.asarray(tokens_BxT, jnp.int32))
  return jax.tree.map(np.asarray, out)


def first_row(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Row 0 of every batched array, named without its B axis (x_LxBxT -> x_LxT)."""
  rows = {}
  for key, value in arrays.items():
    name, shape = key.rsplit('_', 1)
    axes = shape.split('x')
    rows[f'{name}_{"x".join(a for a in axes if a != "B")}'] = np.take(
        value, 0, axis=axes.index('B'))
  return rows


# ---------------------------------------------------------------------------------------------
# Embedding geometry.


@functools.partial(jax.jit, static_argnames='k')
def _neighbours(table_VxD: jax.Array, ids_Q: jax.Array, valid_V: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  unit_VxD = table_VxD / jnp.maximum(jnp.linalg.norm(table_VxD, axis=-1, keepdims=True), 1e-12)
  sims_QxV = unit_VxD[ids_Q] @ unit_VxD.T
  pairs_QxQ = sims_QxV[:, ids_Q]
  sims_QxV = jnp.where(valid_V & (jnp.arange(sims_QxV.shape[1]) != ids_Q[:, None]), sims_QxV,
                       -jnp.inf)
  top_sims_QxK, top_ids_QxK = jax.lax.top_k(sims_QxV, k)
  return top_ids_QxK, top_sims_QxK, pairs_QxQ


def embedding_neighbours(table_VxD: Any, ids: list[int], valid_V: Any,
                         k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cosine nearest neighbours in an embedding table.

  Returns (neighbour ids [Q, k], their cosine similarities [Q, k], similarities among `ids`
  [Q, Q]). A token is never its own neighbour; rows where `valid_V` is False (the padding of a
  vocabulary rounded up past the tokenizer's) are never neighbours.
  """
  k = min(k, int(np.sum(valid_V)) - 1)
  out = _neighbours(jnp.asarray(table_VxD, jnp.float32), jnp.asarray(ids, jnp.int32),
                    jnp.asarray(valid_V, bool), k)
  return tuple(np.asarray(x) for x in out)


def pca_2d(points_PxD: Any) -> tuple[np.ndarray, np.ndarray]:
  """(2-D coordinates [P, 2] on the top two principal axes, their share of the variance [2])."""
  x_PxD = np.asarray(points_PxD, np.float64)
  x_PxD = x_PxD - x_PxD.mean(axis=0)
  _, s, vt_DxD = np.linalg.svd(x_PxD, full_matrices=False)
  variance = s ** 2
  share_2 = variance[:2] / max(float(variance.sum()), 1e-30)
  coords_Px2 = x_PxD @ vt_DxD[:2].T
  if coords_Px2.shape[1] < 2:  # a single point or a 1-D table
    coords_Px2 = np.pad(coords_Px2, ((0, 0), (0, 2 - coords_Px2.shape[1])))
    share_2 = np.pad(share_2, (0, 2 - len(share_2)))
  return coords_Px2, share_2
