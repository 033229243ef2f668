"""Hugging Face checkpoints in and out: GPT-2, Llama (1/2/3), Mistral and Mixtral.

`load_pretrained(path)` reads a local Hugging Face directory (config.json with model.safetensors,
or shards listed in model.safetensors.index.json) into lm's Transformer; `save_pretrained` writes
one that `transformers` loads with the same logits. Both go through one table of rules, one per
Hugging Face tensor, naming the lm parameters it holds and whether it is transposed, so import
and export cannot disagree. Tensors are converted one at a time into parameter arrays allocated
once, so memory stays near one copy of the weights.

Layouts: torch's Linear stores [out, in] and lm's kernels are [in, out...], so those are
transposed; GPT-2's Conv1D already stores [in, out] and fuses q, k and v along out, so it is
split. Hugging Face Llama checkpoints hold q and k in the "rotate half" RoPE layout (their
conversion script permutes Meta's interleaved weights once), which is lm's layout too: q and k
are copied as they are.

config.json is read key by key. Every key that changes the numbers is mapped, or, where lm
cannot honour its value, is an error naming the supported values; keys known not to change the
logits (token ids, generation defaults, bookkeeping) are passed over; any other key is an error,
so nothing is silently ignored. Keys that config.json does not decide (how to run the model:
RUNTIME_KEYS; how to fine-tune it: TRAINING_KEYS) may be overridden.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import glob
import json
import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import flax
from flax import linen as nn
import jax
import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from lm import config as lm_config
from lm import info
from lm import model as lm_model
from lm.model import positions as pos_lib

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# model_type -> the Hugging Face class lm imports and exports.
ARCHITECTURES = {
    'gpt2': 'GPT2LMHeadModel',
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'mixtral': 'MixtralForCausalLM',
}
_BASE_MODELS = {'gpt2': 'GPT2Model', 'llama': 'LlamaModel', 'mistral': 'MistralModel',
                'mixtral': 'MixtralModel'}
# Model keys that config.json does not decide: how the model runs, not what it computes.
RUNTIME_KEYS = ('dtype', 'param_dtype', 'matmul_precision', 'scan_layers', 'remat',
                'attention_impl', 'attention_block')
# Model keys that only matter for training, which a fine-tuning config may set (LoRA adds
# adapters beside the checkpoint's weights).
TRAINING_KEYS = ('embed_dropout', 'attn_dropout', 'resid_dropout', 'capacity_factor',
                 'router_aux_loss_weight', 'router_z_loss_weight', 'lora')
# lm's values for what these families do not have (or do not state); sizes come from config.json.
# Every ModelConfig field must be decided here or by the family's mapping (read_config checks).
_LM_ONLY = dict(
    vocab_multiple_of=1, ffn_multiple_of=1, rope_theta=10000.0, rope_fraction=1.0,
    rope_scaling='none', rope_scaling_factor=1.0, rope_original_max_seq_len=8192,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, relative_num_buckets=32,
    relative_max_distance=128, attention_window=0, attention_pattern='full', attention_stride=0,
    attention_summary=1, attention_block=128, qk_norm=False, attn_logit_softcap=0.0,
    final_logit_softcap=0.0, attention_impl='xla', num_experts=8, top_k=2,
    expert_ffn='swiglu', capacity_factor=0.0, router_aux_loss_weight=0.0,
    router_z_loss_weight=0.0, norm_position='pre', embed_dropout=0.0, attn_dropout=0.0,
    resid_dropout=0.0, dtype='float32', param_dtype='float32', matmul_precision='float32',
    scan_layers=False, remat='none',
    lora=lm_config.LoraConfig(rank=0, alpha=16.0, dropout=0.0, targets=('q', 'k', 'v', 'o')))
# config.json keys that do not change the logits: ids of special tokens, generation defaults,
# bookkeeping of transformers itself.
_METADATA_KEYS = frozenset({
    'architectures', 'model_type', 'transformers_version', 'dtype', 'torch_dtype', 'use_cache',
    'bos_token_id', 'eos_token_id', 'pad_token_id', 'sep_token_id', 'decoder_start_token_id',
    '_name_or_path', 'name_or_path', 'return_dict', 'output_hidden_states',
    'output_attentions', 'torchscript', 'use_bfloat16', 'tf_legacy_loss', 'id2label',
    'label2id', 'problem_type', 'finetuning_task', 'tokenizer_class', 'prefix',
    'task_specific_params', 'is_decoder', 'chunk_size_feed_forward', 'max_length',
    'min_length', 'do_sample', 'early_stopping', 'num_beams', 'num_beam_groups',
    'diversity_penalty', 'temperature', 'top_k', 'top_p', 'typical_p', 'repetition_penalty',
    'length_penalty', 'no_repeat_ngram_size', 'encoder_no_repeat_ngram_size', 'bad_words_ids',
    'num_return_sequences', 'output_scores', 'return_dict_in_generate', 'forced_bos_token_id',
    'forced_eos_token_id', 'remove_invalid_values', 'exponential_decay_length_penalty',
    'suppress_tokens', 'begin_suppress_tokens', 'attn_implementation',
    '_attn_implementation',
})
# Generic transformers keys that change the model unless they have these values.
_REQUIRED_VALUES = {'is_encoder_decoder': (False,), 'add_cross_attention': (False,),
                    'tie_encoder_decoder': (False,), 'pruned_heads': ({},)}
# Tensors some checkpoints carry that are not weights: GPT-2's causal-mask buffers, old Llama
# RoPE buffers. They are recomputed, not loaded.
_BUFFER_SUFFIXES = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')
_FLOAT_DTYPES = ('F64', 'F32', 'F16', 'BF16')


# ---------------------------------------------------------------------------------------------
# The public API.


def load_pretrained(path: str, **overrides: Any) -> tuple[lm_model.Transformer, Any,
                                                         lm_config.ModelConfig]:
  """(model, params, model config) of the Hugging Face checkpoint directory `path`.

  `model.apply({'params': params}, ids_BxT)` gives float32 logits [B, T, V]. The parameters are
  host (numpy) arrays in model.param_dtype, in the layout of model.scan_layers (False unless
  overridden: one layer_i per layer, which decoding wants).

  Args:
    path: a local directory holding config.json and model.safetensors (or shards with
      model.safetensors.index.json).
    **overrides: model config keys config.json does not decide (RUNTIME_KEYS, TRAINING_KEYS),
      e.g. scan_layers=True, param_dtype='bfloat16'.
  """
  model_config = read_config(path, **overrides)
  return lm_model.Transformer(model_config), load_params(path, model_config), model_config


def read_config(path: str, **overrides: Any) -> lm_config.ModelConfig:
  """lm's model config for the checkpoint at `path` (its config.json), validated."""
  raw = _read_json(os.path.join(os.path.expanduser(path), CONFIG_FILE))
  family = _family(raw, path)
  fields = _Fields(raw, os.path.join(path, CONFIG_FILE), family)
  for key, allowed in _REQUIRED_VALUES.items():
    fields.expect(key, allowed, allowed[0])
  values = _gpt2_config(fields) if family == 'gpt2' else _llama_config(fields, family)
  fields.check_all_read()
  known = [field.name for field in dataclasses.fields(lm_config.ModelConfig)]
  for key in overrides:
    if key not in known:
      near = difflib.get_close_matches(key, known, n=1)
      raise ValueError(f'{key} is not a model config key.'
                       f'{f" Did you mean {near[0]}?" if near else ""}')
  fixed = sorted(set(overrides) - set(RUNTIME_KEYS + TRAINING_KEYS))
  if fixed:
    raise ValueError(
        f'model.{fixed[0]} is fixed by the checkpoint ({path}/{CONFIG_FILE}) and cannot be '
        f'overridden. Only {", ".join(RUNTIME_KEYS + TRAINING_KEYS)} may be set.')
  undecided = sorted(set(known) - set(_LM_ONLY) - set(values))
  if undecided:
    raise NotImplementedError(
        f'lm.hf does not decide model.{undecided[0]} for Hugging Face models: add the value '
        'that these families have (the feature switched off) to _LM_ONLY in lm/hf.py.')
  model_config = lm_config.ModelConfig(**{**_LM_ONLY, **values, **overrides})
  try:
    lm_config._validate_model(model_config)  # pylint: disable=protected-access
  except ValueError as e:
    raise ValueError(f'{path}/{CONFIG_FILE} describes a model lm cannot build: {e}') from None
  return model_config


def load_params(path: str, model_config: lm_config.ModelConfig) -> dict[str, Any]:
  """The checkpoint's tensors as lm parameters (numpy, model_config's dtype and layout).

  A tensor whose shape disagrees with `model_config`, a missing tensor, or one that no
  parameter takes is a ValueError naming it.
  """
  if model_config.lora.rank:
    raise ValueError(f'{path} holds a base model, not LoRA adapters: load it with model.lora '
                     'rank 0 (lm.model.lora.without_lora) and add adapters to it '
                     '(lm.train.create_state does).')
  target = info.param_shapes(model_config)
  params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), target)
  with _Reader(os.path.expanduser(path)) as reader:
    rules = _rules(model_config, fused_experts=reader.has_fused_experts)
    for rule in rules:
      slots = [_slot(params, part, model_config.scan_layers) for part in rule.parts]
      pieces = _to_lm(rule, reader.read(rule.name, rule.shape),
                      [leaf[index].shape for leaf, index in slots])
      for (leaf, index), piece in zip(slots, pieces):
        leaf[index] = piece  # cast to the parameter dtype in place
    reader.check_all_read({rule.name for rule in rules}, model_config.tie_embeddings)
  return params


def save_pretrained(model_config: lm_config.ModelConfig, params: Any, path: str, *,
                    max_shard_bytes: int = 5 << 30) -> None:
  """Writes `params` as a Hugging Face directory (config.json + safetensors) at `path`.

  The family follows from the config (learned positions: GPT-2; RoPE: Llama, Mistral with a
  sliding window, Mixtral with MoE); a key no family can express is a ValueError naming it.
  Weights over `max_shard_bytes` are split into shards with an index, as transformers does.
  Weight files already in `path` are replaced. Tensors keep the parameters' dtype.
  """
  family = export_family(model_config)
  host = flax.core.unfreeze(jax.device_get(nn.meta.unbox(params)))
  _check_tree(host, info.param_shapes(model_config))
  rules = _rules(model_config, fused_experts=False)
  dtype = np.dtype(jax.tree.leaves(host)[0].dtype)
  shards = _plan_shards(rules, dtype.itemsize, max_shard_bytes)
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  for old in glob.glob(os.path.join(path, 'model*.safetensors*')):
    os.remove(old)
  weight_map, total = {}, 0
  for number, shard in enumerate(shards, start=1):
    filename = WEIGHTS_FILE if len(shards) == 1 else (
        f'model-{number:05d}-of-{len(shards):05d}.safetensors')
    tensors = {}
    for rule in shard:
      pieces = [leaf[index] for leaf, index in (_slot(host, part, model_config.scan_layers)
                                                for part in rule.parts)]
      tensors[rule.name] = np.ascontiguousarray(_to_hf(rule, pieces))
      weight_map[rule.name] = filename
      total += tensors[rule.name].nbytes
    safetensors_numpy.save_file(tensors, os.path.join(path, filename), metadata={'format': 'pt'})
    del tensors
  if len(shards) > 1:
    _write_json(os.path.join(path, INDEX_FILE),
                {'metadata': {'total_size': total}, 'weight_map': weight_map})
  _write_json(os.path.join(path, CONFIG_FILE), _hf_config(model_config, family, dtype))


def export_family(model_config: lm_config.ModelConfig) -> str:
  """The Hugging Face family that expresses `model_config`; ValueError naming what none does."""
  m = model_config
  if m.lora.rank:
    raise ValueError('model.lora.rank > 0: Hugging Face models have no LoRA adapters. Fold them '
                     'into the base first (python run.py --mode=merge --workdir=DIR) and export '
                     'DIR/merged.')

  def need(key: str, value: Any, family: str) -> None:
    if getattr(m, key) != value:
      raise ValueError(
          f'model.{key}={getattr(m, key)!r} cannot be saved as a Hugging Face {family} model, '
          f'which needs {key}={value!r}. Only GPT-2, Llama, Mistral and Mixtral shaped models '
          'can be exported.')

  if m.pos_emb == 'learned':
    family = 'gpt2'
    for key, value in (('norm', 'layernorm'), ('ffn', 'mlp'), ('use_bias', True),
                       ('num_kv_heads', m.num_heads), ('head_dim', m.d_model // m.num_heads),
                       ('attention_window', 0)):
      need(key, value, family)
  elif m.pos_emb == 'rope':
    family = 'mixtral' if m.ffn == 'moe' else 'mistral' if m.attention_window else 'llama'
    need('norm', 'rmsnorm', family)
    need('rope_fraction', 1.0, family)
    if family == 'mixtral':
      need('expert_ffn', 'swiglu', family)
    else:
      need('ffn', 'swiglu', family)
    if family != 'llama':
      need('use_bias', False, family)
  else:
    raise ValueError(
        f'model.pos_emb={m.pos_emb!r} has no Hugging Face equivalent among the families lm '
        'exports: GPT-2 (learned) and Llama, Mistral, Mixtral (rope).')
  for key, value in (('norm_position', 'pre'), ('qk_norm', False), ('attn_logit_softcap', 0.0),
                     ('final_logit_softcap', 0.0)):
    need(key, value, family)
  if m.attention_pattern not in ('full', 'local'):  # a sliding window is Mistral's
    need('attention_pattern', 'local' if m.attention_window else 'full', family)
  if family != 'gpt2' and (m.embed_dropout or m.resid_dropout):
    logging.warning('Hugging Face %s has no embedding or residual dropout: model.embed_dropout '
                    'and resid_dropout are not saved (they do not change the logits).', family)
  if family == 'mixtral' and m.capacity_factor:
    logging.warning('Hugging Face Mixtral routes without capacity limits; this model drops '
                    'tokens at model.capacity_factor=%g, so its logits match those of the saved '
                    'one only with capacity_factor=0.', m.capacity_factor)
  return family


def run_config(config: lm_config.Config, path: str, *,
               training: bool = False) -> lm_config.Config:
  """`config` with its model section read from the checkpoint at `path`.

  Of the given model section only RUNTIME_KEYS (and, when training, TRAINING_KEYS) are used;
  every other model key is the checkpoint's, so a published model is run as published.
  """
  keys = RUNTIME_KEYS + (TRAINING_KEYS if training else ())
  model_config = read_config(path, **{key: getattr(config.model, key) for key in keys})
  if model_config.pos_emb == 'learned' and config.data.seq_len > model_config.max_seq_len:
    raise ValueError(
        f'data.seq_len={config.data.seq_len} exceeds the {model_config.max_seq_len} learned '
        f'positions of the checkpoint at {path}. Set --config.data.seq_len='
        f'{model_config.max_seq_len} or less.')
  config = dataclasses.replace(config, model=model_config)
  lm_config.validate(config)
  return config


def finetune_config(config: lm_config.Config, path: str, workdir: str) -> lm_config.Config:
  """For train.init_from=hf:PATH: the checkpoint's model, and its tokenizer in the workdir.

  The tokenizer is copied into DIR/tokenizer/ (once), where lm.data.prepare and later eval and
  sample find it, so the corpus is tokenized into the ids the imported embeddings know.
  """
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)

  config = run_config(config, path, training=True)
  tokenizer_dir = os.path.join(workdir, lm_data.pipeline.TOKENIZER_DIR)
  if not os.path.isdir(tokenizer_dir):
    if lm_data.tokenizers.has_hf_tokenizer(path):
      lm_data.tokenizers.load_hf_tokenizer(path).save(tokenizer_dir)
    else:
      logging.warning('%s has no tokenizer (tokenizer.json or tokenizer.model); tokenizing with '
                      'data.tokenizer=%s, whose ids mean nothing to the imported embeddings.',
                      path, config.data.tokenizer)
  return config


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig.


class _Fields:
  """config.json, read key by key, so that a key nothing reads is an error, never ignored."""

  def __init__(self, raw: Mapping[str, Any], source: str, family: str):
    self._raw, self._source, self._family = raw, source, family
    self._read: set[str] = set()

  def take(self, key: str, default: Any) -> Any:
    """The value (None if null), or transformers' default when config.json leaves it out."""
    self._read.add(key)
    return self._raw[key] if key in self._raw else default

  def expect(self, key: str, allowed: Sequence[Any], default: Any) -> Any:
    value = self.take(key, default)
    if value not in allowed:
      self.fail(key, value, ', '.join(repr(a) for a in allowed))
    return value

  def fail(self, key: str, value: Any, supported: str) -> None:
    raise ValueError(
        f'{self._source}: {key}={value!r} is not supported for {self._family} (lm supports '
        f'{supported}); lm cannot load this checkpoint with the same outputs. Use a checkpoint '
        f'with {key} in {supported}.')

  def check_all_read(self) -> None:
    unknown = sorted(set(self._raw) - self._read - _METADATA_KEYS)
    if unknown:
      raise ValueError(
          f'{self._source}: key {unknown[0]!r} (= {self._raw[unknown[0]]!r}) is unknown to lm\'s '
          f'{self._family} import, so lm cannot tell whether it changes the outputs'
          f'{" (also: " + ", ".join(unknown[1:]) + ")" if unknown[1:] else ""}. If it is only '
          'metadata, remove it from config.json; otherwise lm cannot load this model.')


def _family(raw: Mapping[str, Any], path: str) -> str:
  supported = ', '.join(f'{t} ({a})' for t, a in ARCHITECTURES.items())
  model_type = raw.get('model_type')
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f'{path}/{CONFIG_FILE}: model_type {model_type!r} (architectures '
        f'{raw.get("architectures")}) is not supported. lm imports {supported}.')
  for architecture in raw.get('architectures') or []:
    if architecture not in (ARCHITECTURES[model_type], _BASE_MODELS[model_type]):
      raise ValueError(
          f'{path}/{CONFIG_FILE}: architecture {architecture!r} is not supported (it is not a '
          f'causal language model). lm imports {supported}.')
  return model_type


def _gpt2_config(f: _Fields) -> dict[str, Any]:
  d_model, heads = f.take('n_embd', 768), f.take('n_head', 12)
  if d_model % heads:
    f.fail('n_embd', d_model, f'a multiple of n_head={heads}')
  f.expect('activation_function', ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new')
  f.expect('scale_attn_weights', (True,), True)
  f.expect('scale_attn_by_inverse_layer_idx', (False,), False)
  f.take('reorder_and_upcast_attn', False)  # float32 attention either way: the same numbers
  f.take('n_ctx', None)  # superseded by n_positions, unused by transformers
  for key in ('summary_type', 'summary_use_proj', 'summary_activation', 'summary_proj_to_labels',
              'summary_first_dropout'):  # GPT2DoubleHeadsModel's classifier, not the LM
    f.take(key, None)
  return dict(
      vocab_size=f.take('vocab_size', 50257), d_model=d_model,
      num_layers=f.take('n_layer', 12), num_heads=heads, num_kv_heads=heads,
      head_dim=d_model // heads, d_ff=f.take('n_inner', None) or 4 * d_model,
      max_seq_len=f.take('n_positions', 1024), pos_emb='learned', ffn='mlp', norm='layernorm',
      norm_eps=f.take('layer_norm_epsilon', 1e-5), use_bias=True,
      tie_embeddings=f.take('tie_word_embeddings', True), embed_dropout=f.take('embd_pdrop', 0.1),
      attn_dropout=f.take('attn_pdrop', 0.1), resid_dropout=f.take('resid_pdrop', 0.1),
      init_std=f.take('initializer_range', 0.02))


def _llama_config(f: _Fields, family: str) -> dict[str, Any]:
  """Llama, Mistral and Mixtral: the same block, a sliding window (Mistral), MoE (Mixtral)."""
  d_model, heads = f.take('hidden_size', 4096), f.take('num_attention_heads', 32)
  f.expect('hidden_act', ('silu',), 'silu')
  f.take('pretraining_tp', 1)  # old transformers split the matmuls in pieces: the same numbers
  if family == 'llama':
    attention_bias, mlp_bias = f.take('attention_bias', False), f.take('mlp_bias', False)
    if attention_bias != mlp_bias:
      f.fail('mlp_bias', mlp_bias, f'attention_bias == mlp_bias (here {attention_bias}): '
             'lm has one use_bias for all linear layers')
    use_bias, window = bool(attention_bias), 0
  else:
    use_bias = False
    window = f.take('sliding_window', 4096 if family == 'mistral' else None) or 0
  values = dict(
      vocab_size=f.take('vocab_size', 32000), d_model=d_model,
      num_layers=f.take('num_hidden_layers', 32), num_heads=heads,
      num_kv_heads=f.take('num_key_value_heads', None) or heads,
      head_dim=f.take('head_dim', None) or d_model // heads,
      d_ff=f.take('intermediate_size', {'llama': 11008, 'mistral': 14336,
                                        'mixtral': 14336}[family]),
      max_seq_len=f.take('max_position_embeddings', 2048 if family == 'llama' else 131072),
      pos_emb='rope', ffn='swiglu', norm='rmsnorm',
      norm_eps=f.take('rms_norm_eps', 1e-5 if family == 'mixtral' else 1e-6),
      use_bias=use_bias, attention_window=window,
      attention_pattern='local' if window else 'full',
      tie_embeddings=f.take('tie_word_embeddings', False),
      attn_dropout=f.take('attention_dropout', 0.0),
      init_std=f.take('initializer_range', 0.02),
      **_rope(f, default_theta=1e6 if family == 'mixtral' else 1e4))
  if family == 'mixtral':
    f.expect('router_jitter_noise', (0, 0.0), 0.0)
    # transformers adds the load-balancing loss only when it outputs the router logits.
    aux_weight = f.take('router_aux_loss_coef', 0.001)
    values.update(ffn='moe', expert_ffn='swiglu', num_experts=f.take('num_local_experts', 8),
                  top_k=f.take('num_experts_per_tok', 2), capacity_factor=0.0,
                  router_aux_loss_weight=aux_weight if f.take('output_router_logits', False)
                  else 0.0)
  return values


_ROPE_KEYS = {
    'default': ('rope_type', 'type', 'rope_theta'),
    'linear': ('rope_type', 'type', 'rope_theta', 'factor'),
    'llama3': ('rope_type', 'type', 'rope_theta', 'factor', 'low_freq_factor',
               'high_freq_factor', 'original_max_position_embeddings'),
}


def _rope(f: _Fields, default_theta: float) -> dict[str, Any]:
  """rope_theta + rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
  theta = f.take('rope_theta', default_theta)
  legacy, parameters = f.take('rope_scaling', None), f.take('rope_parameters', None)
  scaling = legacy or parameters or {}
  if not isinstance(scaling, dict):
    f.fail('rope_scaling', scaling, 'null or a dict with rope_type')
  theta = scaling.get('rope_theta', theta)
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in _ROPE_KEYS:
    f.fail('rope_scaling', scaling, 'rope_type ' + ', '.join(_ROPE_KEYS))
  for key in scaling:
    if key not in _ROPE_KEYS[kind]:
      f.fail(f'rope_scaling.{key}', scaling[key], f'only {", ".join(_ROPE_KEYS[kind])} for '
             f'rope_type {kind!r}')
  values = dict(rope_theta=float(theta))
  if kind != 'default':
    values.update(rope_scaling=kind, rope_scaling_factor=float(scaling['factor']))
  if kind == 'llama3':
    values.update(rope_low_freq_factor=float(scaling['low_freq_factor']),
                  rope_high_freq_factor=float(scaling['high_freq_factor']),
                  rope_original_max_seq_len=int(scaling['original_max_position_embeddings']))
  return values


def _hf_config(m: lm_config.ModelConfig, family: str, dtype: np.dtype) -> dict[str, Any]:
  """config.json for `m` (export_family(m) == family): what _gpt2_config/_llama_config read."""
  common = dict(architectures=[ARCHITECTURES[family]], model_type=family,
                vocab_size=m.vocab_size, initializer_range=m.init_std,
                tie_word_embeddings=m.tie_embeddings, dtype=dtype.name,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if family == 'gpt2':
    return dict(
        common, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.d_ff,
        n_positions=m.max_seq_len, activation_function='gelu_new',
        layer_norm_epsilon=m.norm_eps, embd_pdrop=m.embed_dropout, attn_pdrop=m.attn_dropout,
        resid_pdrop=m.resid_dropout, scale_attn_weights=True)
  scaling, theta = None, m.rope_theta
  if m.rope_scaling == 'ntk':  # Hugging Face has no static NTK type: it is a larger base
    theta = float(pos_lib.ntk_theta(m))
  elif m.rope_scaling != 'none':
    scaling = dict(rope_type=m.rope_scaling, factor=m.rope_scaling_factor)
  if m.rope_scaling == 'llama3':
    scaling.update(low_freq_factor=m.rope_low_freq_factor,
                   high_freq_factor=m.rope_high_freq_factor,
                   original_max_position_embeddings=m.rope_original_max_seq_len)
  config = dict(
      common, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
      intermediate_size=m.d_ff, hidden_act='silu', max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.norm_eps, rope_theta=theta, rope_scaling=scaling,
      attention_dropout=m.attn_dropout)
  if family == 'llama':
    config.update(attention_bias=m.use_bias, mlp_bias=m.use_bias)
  else:
    config.update(sliding_window=m.attention_window or None)
  if family == 'mixtral':
    config.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                  router_aux_loss_coef=m.router_aux_loss_weight,
                  output_router_logits=m.router_aux_loss_weight > 0, router_jitter_noise=0.0)
  return config


# ---------------------------------------------------------------------------------------------
# Tensor rules: one Hugging Face tensor <-> slices of lm parameters.


@dataclasses.dataclass(frozen=True)
class _Part:
  """A slice of one lm parameter: `path` inside a layer (or the top level), one expert's row."""

  path: tuple[str, ...]
  layer: int | None = None
  expert: int | None = None


@dataclasses.dataclass(frozen=True)
class _Rule:
  """A Hugging Face tensor of `shape`, holding `parts` concatenated along its output axis.

  `transpose`: a torch Linear weight, [..., out, in], where lm stores [..., in, out].
  """

  name: str
  shape: tuple[int, ...]
  parts: tuple[_Part, ...]
  transpose: bool = False


def _rules(m: lm_config.ModelConfig, fused_experts: bool) -> list[_Rule]:
  """Every tensor of the checkpoint, in file order (embeddings, layers, head)."""
  if m.pos_emb == 'learned':
    return _gpt2_rules(m)
  return _llama_rules(m, fused_experts)


def _gpt2_rules(m: lm_config.ModelConfig) -> list[_Rule]:
  D, F, V = m.d_model, m.d_ff, m.vocab_size  # pylint: disable=invalid-name
  rules = [_Rule('transformer.wte.weight', (V, D), (_Part(('embed', 'embedding')),)),
           _Rule('transformer.wpe.weight', (m.max_seq_len, D),
                 (_Part(('pos_embed', 'embedding')),))]
  for i in range(m.num_layers):
    prefix = f'transformer.h.{i}.'
    part = functools.partial(_layer_part, i)
    qkv = ('query', 'key', 'value')
    rules += [
        *_norm_rules(prefix + 'ln_1', D, 'attn_norm', i, bias=True),
        # Conv1D: [in, out] as lm stores it; q, k, v side by side along out.
        _Rule(prefix + 'attn.c_attn.weight', (D, 3 * D),
              tuple(part('attn', n, 'kernel') for n in qkv)),
        _Rule(prefix + 'attn.c_attn.bias', (3 * D,), tuple(part('attn', n, 'bias') for n in qkv)),
        _Rule(prefix + 'attn.c_proj.weight', (D, D), (part('attn', 'out', 'kernel'),)),
        _Rule(prefix + 'attn.c_proj.bias', (D,), (part('attn', 'out', 'bias'),)),
        *_norm_rules(prefix + 'ln_2', D, 'ffn_norm', i, bias=True),
        _Rule(prefix + 'mlp.c_fc.weight', (D, F), (part('ffn', 'fc_in', 'kernel'),)),
        _Rule(prefix + 'mlp.c_fc.bias', (F,), (part('ffn', 'fc_in', 'bias'),)),
        _Rule(prefix + 'mlp.c_proj.weight', (F, D), (part('ffn', 'fc_out', 'kernel'),)),
        _Rule(prefix + 'mlp.c_proj.bias', (D,), (part('ffn', 'fc_out', 'bias'),)),
    ]
  rules += _norm_rules('transformer.ln_f', D, 'final_norm', None, bias=True)
  return rules + _head_rules(m)


def _llama_rules(m: lm_config.ModelConfig, fused_experts: bool) -> list[_Rule]:
  D, F, V, E = m.d_model, m.d_ff, m.vocab_size, m.num_experts  # pylint: disable=invalid-name
  rules = [_Rule('model.embed_tokens.weight', (V, D), (_Part(('embed', 'embedding')),))]
  for i in range(m.num_layers):
    prefix = f'model.layers.{i}.'
    part = functools.partial(_layer_part, i)

    def linear(name: str, shape: tuple[int, ...], *path: str,
               bias: bool = m.use_bias) -> list[_Rule]:
      rules = [_Rule(prefix + name + '.weight', shape, (part(*path, 'kernel'),), transpose=True)]
      if bias:
        rules.append(_Rule(prefix + name + '.bias', shape[:1], (part(*path, 'bias'),)))
      return rules

    rules += [
        *_norm_rules(prefix + 'input_layernorm', D, 'attn_norm', i, bias=False),
        *linear('self_attn.q_proj', (m.num_heads * m.head_dim, D), 'attn', 'query'),
        *linear('self_attn.k_proj', (m.num_kv_heads * m.head_dim, D), 'attn', 'key'),
        *linear('self_attn.v_proj', (m.num_kv_heads * m.head_dim, D), 'attn', 'value'),
        *linear('self_attn.o_proj', (D, m.num_heads * m.head_dim), 'attn', 'out'),
        *_norm_rules(prefix + 'post_attention_layernorm', D, 'ffn_norm', i, bias=False),
    ]
    if m.ffn != 'moe':
      rules += [*linear('mlp.gate_proj', (F, D), 'ffn', 'gate'),
                *linear('mlp.up_proj', (F, D), 'ffn', 'up'),
                *linear('mlp.down_proj', (D, F), 'ffn', 'down')]
    elif fused_experts:  # transformers 5's in-memory layout: experts stacked, gate|up fused
      rules += [
          _Rule(prefix + 'mlp.gate.weight', (E, D), (part('ffn', 'router', 'kernel'),),
                transpose=True),
          _Rule(prefix + 'mlp.experts.gate_up_proj', (E, 2 * F, D),
                (part('ffn', 'experts', 'gate', 'kernel'), part('ffn', 'experts', 'up', 'kernel')),
                transpose=True),
          _Rule(prefix + 'mlp.experts.down_proj', (E, D, F),
                (part('ffn', 'experts', 'down', 'kernel'),), transpose=True)]
    else:  # the published layout: one Linear per expert and projection
      moe = prefix + 'block_sparse_moe.'
      rules.append(_Rule(moe + 'gate.weight', (E, D), (part('ffn', 'router', 'kernel'),),
                         transpose=True))
      for e in range(E):
        for name, shape, lm_name in (('w1', (F, D), 'gate'), ('w2', (D, F), 'down'),
                                     ('w3', (F, D), 'up')):
          rules.append(_Rule(f'{moe}experts.{e}.{name}.weight', shape,
                             (_Part(('ffn', 'experts', lm_name, 'kernel'), i, e),), True))
  rules += _norm_rules('model.norm', D, 'final_norm', None, bias=False)
  return rules + _head_rules(m)


def _layer_part(layer: int, *path: str) -> _Part:
  return _Part(path, layer=layer)


def _norm_rules(name: str, width: int, lm_name: str, layer: int | None,
                bias: bool) -> list[_Rule]:
  rules = [_Rule(name + '.weight', (width,), (_Part((lm_name, 'scale'), layer),))]
  if bias:
    rules.append(_Rule(name + '.bias', (width,), (_Part((lm_name, 'bias'), layer),)))
  return rules


def _head_rules(m: lm_config.ModelConfig) -> list[_Rule]:
  if m.tie_embeddings:
    return []
  return [_Rule('lm_head.weight', (m.vocab_size, m.d_model), (_Part(('lm_head', 'kernel')),),
                transpose=True)]


def _slot(params: Mapping[str, Any], part: _Part,
          scan_layers: bool) -> tuple[np.ndarray, tuple[int, ...]]:
  """The lm parameter array a part lives in, and the index of the part inside it."""
  index: tuple[int, ...] = ()
  node = params
  if part.layer is not None:
    if scan_layers:
      node, index = params['layers'], (part.layer,)
    else:
      node = params[f'layer_{part.layer}']
  for key in part.path:
    node = node[key]
  if part.expert is not None:
    index += (part.expert,)
  return node, index


def _to_lm(rule: _Rule, tensor: np.ndarray,
           shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
  """The Hugging Face tensor as its parts, in lm's layout (`shapes`)."""
  if rule.transpose:
    tensor = np.swapaxes(tensor, -1, -2)
  pieces = np.split(tensor, len(rule.parts), axis=-1)
  return [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]


def _to_hf(rule: _Rule, pieces: Sequence[np.ndarray]) -> np.ndarray:
  """The inverse of _to_lm: lm slices -> one tensor of rule.shape."""
  shape = rule.shape
  lead = shape[:-2] + shape[-1:] if rule.transpose else shape[:-1]  # all axes but out
  tensor = np.concatenate([piece.reshape(*lead, -1) for piece in pieces], axis=-1)
  return np.swapaxes(tensor, -1, -2) if rule.transpose else tensor


def _plan_shards(rules: Sequence[_Rule], itemsize: int, max_bytes: int) -> list[list[_Rule]]:
  """Consecutive rules grouped into files of at most max_bytes (a larger tensor: alone)."""
  shards: list[list[_Rule]] = [[]]
  size = 0
  for rule in rules:
    nbytes = math.prod(rule.shape) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(rule)
    size += nbytes
  return shards


def _check_tree(params: Mapping[str, Any], target: Mapping[str, Any]) -> None:
  """Params must have exactly the model's parameters and shapes (save_pretrained's input)."""
  got = flax.traverse_util.flatten_dict(params, sep='/')
  want = flax.traverse_util.flatten_dict(target, sep='/')
  for name, spec in want.items():
    if name not in got:
      raise ValueError(f'params lack {name} {spec.shape}, which the model config has. Pass the '
                       'parameters of the model this config describes (scan_layers included).')
    if tuple(got[name].shape) != tuple(spec.shape):
      raise ValueError(f'params {name} has shape {tuple(got[name].shape)} but the model config '
                       f'says {tuple(spec.shape)}. Pass the config the parameters belong to.')
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f'params {extra[0]} is not a parameter of the model config. Pass the '
                     'config the parameters belong to.')


# ---------------------------------------------------------------------------------------------
# Reading safetensors, one tensor at a time.


class _Reader:
  """The tensors of model.safetensors or its shards, each file opened once (memory-mapped).

  Names are those of the CausalLM class; a checkpoint saved from the bare model (GPT2Model's
  'h.0...', LlamaModel's 'layers.0...') is read as if it had the 'transformer.'/'model.' prefix.
  """

  def __init__(self, path: str):
    self._path = path
    self._stack = contextlib.ExitStack()
    self._files: dict[str, Any] = {}
    self._read: set[str] = set()
    # name -> (file, name as stored)
    self._where = {_prefixed(name): (filename, name)
                   for name, filename in self._weight_map().items()}

  def __enter__(self) -> _Reader:
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  @property
  def has_fused_experts(self) -> bool:
    return any(name.endswith('.experts.gate_up_proj') for name in self._where)

  def _weight_map(self) -> dict[str, str]:
    """Stored tensor name -> file, from the index or from the single file's header."""
    index_path = os.path.join(self._path, INDEX_FILE)
    if os.path.isfile(index_path):
      index = _read_json(index_path)
      if not isinstance(index.get('weight_map'), dict):
        raise ValueError(f'{index_path} has no "weight_map": it is corrupt. Download it again.')
      weight_map = {name: os.path.join(self._path, f) for name, f in index['weight_map'].items()}
      for filename in sorted(set(weight_map.values())):
        if not os.path.isfile(filename):
          raise FileNotFoundError(f'{filename} is listed in {index_path} but missing. Download '
                                  'every shard of the checkpoint.')
      return weight_map
    filename = os.path.join(self._path, WEIGHTS_FILE)
    if not os.path.isfile(filename):
      others = [f for f in ('pytorch_model.bin', 'tf_model.h5', 'flax_model.msgpack')
                if os.path.exists(os.path.join(self._path, f))]
      hint = (f' It holds {others[0]}, but lm reads safetensors only: convert it with '
              'transformers (AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)).'
              if others else f' Point at a directory with {WEIGHTS_FILE}, or with {INDEX_FILE} '
              'and its shards.')
      raise FileNotFoundError(f'No {WEIGHTS_FILE} or {INDEX_FILE} in {self._path}.{hint}')
    return {name: filename for name in self._open(filename).keys()}

  def _open(self, filename: str) -> Any:
    if filename not in self._files:
      try:
        self._files[filename] = self._stack.enter_context(
            safetensors.safe_open(filename, framework='np'))
      except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f'{filename} is not a readable safetensors file ({e}): it is corrupt or '
                         'truncated. Download it again.') from None
    return self._files[filename]

  def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, checked to have `shape` and a float dtype."""
    if name not in self._where:
      near = difflib.get_close_matches(name, list(self._where), n=1)
      raise ValueError(
          f'Tensor {name} {shape} is missing from the checkpoint in {self._path}'
          f'{f" (closest: {near[0]})" if near else ""}, but its config.json describes a model '
          'with it. The weights and config.json do not belong together: use the config.json '
          'saved with these weights.')
    self._read.add(name)
    filename, stored = self._where[name]
    handle = self._open(filename)
    try:
      view = handle.get_slice(stored)
      found, dtype = tuple(view.get_shape()), view.get_dtype()
    except (safetensors.SafetensorError, KeyError) as e:
      raise ValueError(f'Cannot read tensor {stored} from {filename} ({e}): the file is corrupt '
                       'or does not hold what the index says. Download it again.') from None
    if found != shape:
      raise ValueError(
          f'Tensor {name} has shape {found} in {filename}, but config.json implies {shape}. The '
          'weights and config.json do not belong together: use the config.json saved with these '
          'weights.')
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f'Tensor {name} is stored as {dtype}; lm loads float weights only '
                       f'({", ".join(_FLOAT_DTYPES)}). Dequantize the checkpoint first.')
    try:
      return handle.get_tensor(stored)
    except safetensors.SafetensorError as e:
      raise ValueError(f'Cannot read tensor {stored} from {filename} ({e}): the file is '
                       'corrupt. Download it again.') from None

  def check_all_read(self, expected: set[str], tied: bool) -> None:
    """Every stored tensor must have been loaded, except buffers (and a tied head's copy)."""
    unused = sorted(name for name in set(self._where) - self._read
                    if not name.endswith(_BUFFER_SUFFIXES)
                    and not (tied and name == 'lm_head.weight'))
    if unused:
      raise ValueError(
          f'Tensor {self._where[unused[0]][1]} in {self._path} has no place in the model its '
          f'config.json describes ({len(unused)} such tensors; the model takes {len(expected)}). '
          'The weights and config.json do not belong together: use the config.json saved with '
          'these weights.')


def _prefixed(name: str) -> str:
  """GPT2Model/LlamaModel names -> the CausalLM's ('h.0...' -> 'transformer.h.0...')."""
  if name.startswith(('h.', 'wte.', 'wpe.', 'ln_f.')):
    return 'transformer.' + name
  if name.startswith(('layers.', 'embed_tokens.', 'norm.')):
    return 'model.' + name
  return name


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist. Point at a Hugging Face model directory (with config.json and '
        f'{WEIGHTS_FILE}), e.g. one downloaded with `hf download REPO --local-dir DIR`.')
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}). Download it again.') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} does not hold a JSON object. Download it again.')
  return value


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')
