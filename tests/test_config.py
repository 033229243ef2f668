"""lm.config: building, resolution and every validation error."""

import json

import pytest

from configs import base
from lm import config as lm_config


def build(**overrides):
  """A validated Config from base with `section__key=value` overrides."""
  cd = base.get_config()
  for name, value in overrides.items():
    section, key = name.split('__')
    cd[section][key] = value
  return lm_config.Config.from_config_dict(cd)


def test_base_builds_and_resolves_sizes():
  config = build()
  assert config.model.head_dim == config.model.d_model // config.model.num_heads
  assert config.model.d_ff == 4 * config.model.d_model
  assert isinstance(config.train.trainable, tuple)


def test_swiglu_hidden_width_rounds_up():
  config = build(model__ffn='swiglu', model__d_model=96, model__ffn_multiple_of=64)
  assert config.model.d_ff == 256  # 8/3 * 96 = 256 exactly
  config = build(model__ffn='swiglu', model__d_model=100, model__ffn_multiple_of=64)
  assert config.model.d_ff == 320  # 266 rounded up


def test_round_trips_through_json():
  config = build(train__trainable=['attn.*'])
  again = lm_config.Config.from_config_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config


def _drop(raw, added):
  """`raw` without the keys of `added` (nested)."""
  raw = dict(raw)
  for key, value in added.items():
    if isinstance(value, dict) and isinstance(raw.get(key), dict):
      raw[key] = _drop(raw[key], value)
      if not raw[key]:
        del raw[key]
    else:
      raw.pop(key, None)
  return raw


def test_saved_configs_from_older_versions_still_load():
  saved = lm_config.Config.from_config_dict(base.get_config()).to_dict()
  old = _drop(saved, lm_config.ADDED_KEYS)
  with pytest.raises(ValueError, match='missing'):
    lm_config.Config.from_config_dict(old)
  config = lm_config.Config.from_saved(old)
  # What an old run left out means what it did then, not whatever base.py says today.
  assert dict(config.parallel.rules) == {**{axis: '' for axis in lm_config.LOGICAL_AXES},
                                         'length': 'context'}
  assert config.model.attention_pattern == 'full'
  # Present keys win, and a key nobody knows is still an error.
  assert lm_config.Config.from_saved(saved) == lm_config.Config.from_config_dict(saved)
  with pytest.raises(ValueError, match='Unknown config key model.d_modle'):
    lm_config.Config.from_saved(dict(old, model=dict(old['model'], d_modle=3)))


def test_added_keys_exist_in_base():
  def walk(added, values, where):
    for key, value in added.items():
      assert key in values, f'ADDED_KEYS names {where}{key}, which base.py lacks'
      if isinstance(value, dict):
        walk(value, values[key], f'{where}{key}.')
  walk(lm_config.ADDED_KEYS, base.get_config().to_dict(), '')


def test_unknown_key_suggests_nearest():
  cd = base.get_config()
  cd.model.num_hedas = 4
  with pytest.raises(ValueError, match=r'model\.num_hedas.*Did you mean model\.num_heads'):
    lm_config.Config.from_config_dict(cd)


def test_missing_key_points_to_base():
  cd = base.get_config()
  del cd.train['steps']
  with pytest.raises(ValueError, match=r'train\.steps is missing.*configs/base\.py'):
    lm_config.Config.from_config_dict(cd)


def test_wrong_type_names_key():
  raw = base.get_config().to_dict()  # e.g. a hand-edited config.json
  raw['model']['num_layers'] = 'four'
  with pytest.raises(ValueError, match=r'model\.num_layers must be a int'):
    lm_config.Config.from_config_dict(raw)


@pytest.mark.parametrize('overrides, pattern', [
    (dict(model__d_model=100, model__num_heads=3), r'model\.d_model.*not divisible by num_heads'),
    (dict(model__num_kv_heads=3), r'model\.num_kv_heads.*MQA'),
    (dict(model__pos_emb='ropee'), r"model\.pos_emb.*'ropee'.*Did you mean 'rope'"),
    (dict(model__ffn='moe', model__top_k=9, model__num_experts=8), r'model\.top_k.*exceeds'),
    (dict(model__pos_emb='learned', model__max_seq_len=64, data__seq_len=128),
     r'model\.max_seq_len.*learned positions cover 64'),
    (dict(model__pos_emb='rope', model__rope_fraction=0.01), r'model\.rope_fraction'),
    (dict(model__rope_scaling='linear', model__rope_scaling_factor=2.0),
     r'model\.rope_scaling.*needs pos_emb=rope'),
    (dict(model__attn_dropout=1.5), r'model\.attn_dropout.*\[0, 1\)'),
    (dict(model__norm='batchnorm'), r'model\.norm'),
    (dict(model__dtype='float64'), r'model\.dtype'),
    (dict(model__matmul_precision='tf32'), r"model\.matmul_precision.*'tf32'"),
    (dict(model__matmul_precision='bfloat16', model__dtype='float16'),
     r'model\.matmul_precision.*model\.dtype=float16'),
    (dict(data__tokenizer='bpe'), r'data\.tokenizer'),
    (dict(data__val_fraction=0.0), r'data\.val_fraction'),
    (dict(data__eval_stride=999, data__seq_len=64, model__max_seq_len=64), r'data\.eval_stride'),
    (dict(train__steps=0), r'train\.steps.*> 0'),
    (dict(train__batch_size=10, train__grad_accum=4), r'train\.grad_accum.*divisor'),
    (dict(train__steps_per_call=7), r'train\.steps_per_call'),
    (dict(optim__name='sgdd'), r"optim\.name.*'sgdd'"),
    (dict(optim__warmup_steps=5000, train__steps=100), r'optim\.warmup_steps.*exceeds'),
    (dict(optim__b2=1.0), r'optim\.b2'),
    (dict(optim__eps=0.0), r'optim\.eps: must be > 0 for optim\.name=.adamw.'),
    (dict(sample__top_p=0.0), r'sample\.top_p'),
    (dict(parallel__strategy='fsdp'), r'parallel\.strategy'),
    (dict(parallel__mesh_fsdp=0), r'parallel\.mesh_fsdp'),
    (dict(parallel__xla_flags='--xla_cpu_enable_fast_math=true xla_ftz'),
     r"parallel\.xla_flags: 'xla_ftz' is not an XLA flag"),
])
def test_invalid_values_name_key(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    build(**overrides)


def test_check_devices():
  config = build(train__batch_size=12)
  lm_config.check_devices(config, 4)
  with pytest.raises(ValueError, match=r'train\.batch_size=12.*devices x train\.grad_accum'):
    lm_config.check_devices(config, 8)


def test_vocab_resolution():
  model = build().model
  assert lm_config.with_vocab_size(model, 65).vocab_size == 128
  explicit = build(model__vocab_size=100).model
  assert lm_config.with_vocab_size(explicit, 100).vocab_size == 100
  with pytest.raises(ValueError, match=r'model\.vocab_size=100 is smaller.*4096'):
    lm_config.with_vocab_size(explicit, 4096)


def test_parse_arg():
  assert lm_config.parse_arg('size=medium,seeds=3', {'size': 'small', 'seeds': 1}) == {
      'size': 'medium', 'seeds': 3}
  with pytest.raises(ValueError, match=r"Unknown config argument 'sise'.*Did you mean size"):
    lm_config.parse_arg('sise=medium', {'size': 'small'})
  with pytest.raises(ValueError, match=r'seeds must be a int'):
    lm_config.parse_arg('seeds=x', {'seeds': 1})
