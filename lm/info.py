"""`--mode=info`: parameter counts and cost of a config, without allocating any weights."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import config as lm_config
from lm import model as lm_model
from lm import optim

# Parameter-path fragments that count as embeddings rather than compute (Kaplan et al., 2020).
_EMBEDDING_PARAMS = ('embed', 'pos_embed')


def param_shapes(model_config: lm_config.ModelConfig) -> dict[str, Any]:
  """The parameter tree as ShapeDtypeStructs, via jax.eval_shape (no memory is allocated)."""
  model = lm_model.Transformer(model_config)
  tokens_BxT = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens_BxT)
  return flax.core.unfreeze(nn.meta.unbox(variables['params']))


def count_params(model_config: lm_config.ModelConfig) -> dict[str, int]:
  """Total, non-embedding and active (per token, for MoE) parameter counts."""
  flat = flax.traverse_util.flatten_dict(param_shapes(model_config))
  sizes = {path: math.prod(leaf.shape) for path, leaf in flat.items()}
  total = sum(sizes.values())
  embedding = sum(n for path, n in sizes.items() if path[0] in _EMBEDDING_PARAMS)
  expert = sum(n for path, n in sizes.items() if _is_expert_param(path, model_config))
  m = model_config
  inactive = expert * (m.num_experts - m.top_k) // m.num_experts if m.ffn == 'moe' else 0
  return {
      'params_total': total,
      'params_non_embedding': total - embedding,
      'params_active': total - inactive,
  }


def count_trainable(config: lm_config.Config) -> int:
  """Parameters the optimizer updates: all, train.trainable's matches, or LoRA's adapters."""
  sizes = {path: math.prod(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(
      param_shapes(config.model), sep='/').items()}
  trains = optim.trains_fn(config, list(sizes)) or (lambda path: True)
  return sum(n for path, n in sizes.items() if trains(path))


def _is_expert_param(path: tuple[str, ...], m: lm_config.ModelConfig) -> bool:
  return m.ffn == 'moe' and 'ffn' in path and 'router' not in path


def flops_per_token(model_config: lm_config.ModelConfig, seq_len: int,
                    params_active_non_embedding: int) -> float:
  """Training FLOPs per token: 6 x (active matmul params + LM head) + attention (PaLM, App. B).

  The attention term 12 * L * N * H * T counts the score and value matmuls over the full
  context (no causal discount), T capped by a sliding window.
  """
  m = model_config
  head = m.vocab_size * m.d_model
  context = min(seq_len, m.attention_window) if m.attention_window else seq_len
  return 6.0 * (params_active_non_embedding + head) + 12.0 * (
      m.num_layers * m.num_heads * m.head_dim * context)


def kv_cache_bytes_per_token(model_config: lm_config.ModelConfig) -> int:
  m = model_config
  return 2 * m.num_layers * m.num_kv_heads * m.head_dim * np.dtype(jnp.dtype(m.dtype)).itemsize


def model_info(config: lm_config.Config) -> dict[str, Any]:
  """The numbers `--mode=info` prints, for a config whose vocabulary is resolved."""
  m = config.model
  counts = count_params(m)
  embedding = counts['params_total'] - counts['params_non_embedding']
  return {
      **counts,
      'params_trainable': count_trainable(config),
      'flops_per_token': flops_per_token(m, config.data.seq_len,
                                         counts['params_active'] - embedding),
      'kv_cache_bytes_per_token': kv_cache_bytes_per_token(m),
      'seq_len': config.data.seq_len,
      'model': dataclasses.asdict(m),
  }


def resolve_vocab(config: lm_config.Config) -> lm_config.Config:
  """Fills model.vocab_size=0 from the tokenizer the data section would build."""
  if config.model.vocab_size:
    return config
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (only when needed)
  model = lm_config.with_vocab_size(config.model, lm_data.tokenizer_vocab_size(config))
  return dataclasses.replace(config, model=model)


def main(config: lm_config.Config, workdir: str | None) -> None:
  del workdir
  print(json.dumps(model_info(resolve_vocab(config)), indent=2))
