"""ConfigDict -> frozen dataclasses, validated once, so nothing downstream sees a ConfigDict.

`Config.from_config_dict(cd)` checks every section against its dataclass (a missing or unknown
key is an error that suggests the nearest valid name), resolves derived sizes (head_dim, d_ff)
and validates values and combinations, raising `ValueError` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Mapping

POS_EMBS = ('sinusoidal', 'learned', 'rope', 'alibi', 'relative', 'none')
FFNS = ('mlp', 'swiglu', 'moe')
EXPERT_FFNS = ('mlp', 'swiglu')
NORMS = ('layernorm', 'rmsnorm')
NORM_POSITIONS = ('pre', 'post')
ROPE_SCALINGS = ('none', 'linear', 'ntk', 'llama3')
ATTENTION_IMPLS = ('xla', 'dot_product_attention', 'cudnn', 'blockwise')
ATTENTION_PATTERNS = ('full', 'local', 'fixed')
REMATS = ('none', 'full', 'dots', 'dots_no_batch')
# model.lora.targets: attention's query, key, value and output projections, and every matrix
# of the FFN (each expert's under MoE; the router stays frozen).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'ffn')
DTYPES = ('float32', 'bfloat16', 'float16')
MATMUL_PRECISIONS = ('float32', 'bfloat16')
TOKENIZERS = ('sentencepiece', 'byte', 'char')
# data.format: a text corpus, SFT examples, or preference pairs (DPO); the last two are JSONL.
DATA_FORMATS = ('text', 'sft', 'preference')
# data.chat_template names; a path to a .jinja file is accepted too.
CHAT_TEMPLATES = ('builtin', 'hf', 'none')
SP_MODEL_TYPES = ('bpe', 'unigram')
OPTIMIZERS = ('adamw', 'adafactor', 'lion', 'muon')
SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')
STRATEGIES = ('pmap', 'mesh')
# The mesh axis that ring attention passes key/value blocks around (parallel.mesh_context).
CONTEXT_AXIS = 'context'
# The device mesh of parallel.strategy=mesh, outermost first (parallel.mesh_<axis> sizes).
# The ring's neighbours sit next to each other, inside all but tensor parallelism.
MESH_AXES = ('data', 'fsdp', 'expert', CONTEXT_AXIS, 'tensor')
# Every logical axis name the model's parameters carry, plus 'batch' and 'length' (the sequence)
# for inputs and activations; each needs a parallel.rules entry (a new name in lm/model goes
# here and into configs/base.py).
# Listed in priority order: where two axes of one weight ask for the same mesh axis, the
# earlier gets it (flax logical rules).
LOGICAL_AXES = ('batch', 'length', 'expert', 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
                'mlp', 'layers', 'relative_buckets')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (Hu et al., 2021) on the projections named in `targets`; rank 0: off."""

  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    """alpha / rank: the update's scale, so that changing the rank keeps the learning rate."""
    return self.alpha / self.rank if self.rank else 0.0

  @property
  def signature(self) -> tuple[Any, ...]:
    """What fixes the parameters and the logits (dropout only acts in training); () if off."""
    return (self.rank, self.alpha, self.targets) if self.rank else ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Sizes are resolved: head_dim and d_ff are never 0 here."""

  vocab_size: int
  vocab_multiple_of: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  ffn_multiple_of: int
  max_seq_len: int
  pos_emb: str
  rope_theta: float
  rope_fraction: float
  rope_scaling: str
  rope_scaling_factor: float
  rope_original_max_seq_len: int
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  relative_num_buckets: int
  relative_max_distance: int
  attention_window: int
  attention_pattern: str
  attention_stride: int
  attention_summary: int
  qk_norm: bool
  attn_logit_softcap: float
  final_logit_softcap: float
  attention_impl: str
  attention_block: int
  ffn: str
  num_experts: int
  top_k: int
  expert_ffn: str
  capacity_factor: float
  router_aux_loss_weight: float
  router_z_loss_weight: float
  norm: str
  norm_eps: float
  norm_position: str
  use_bias: bool
  tie_embeddings: bool
  embed_dropout: float
  attn_dropout: float
  resid_dropout: float
  init_std: float
  dtype: str
  param_dtype: str
  matmul_precision: str
  scan_layers: bool
  remat: str
  lora: LoraConfig

  @property
  def rope_dim(self) -> int:
    """Dimensions per head that RoPE rotates (even)."""
    return int(self.head_dim * self.rope_fraction) // 2 * 2

  @property
  def num_groups(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str
  val_fraction: float
  tokenizer: str
  tokenizer_path: str
  vocab_size: int
  sp_model_type: str
  sp_train_chars: int
  seq_len: int
  packing: bool
  eval_stride: int
  cache_dir: str
  prefetch: int
  format: str
  chat_template: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  tokens: int
  flops: float
  batch_size: int
  grad_accum: int
  steps_per_call: int
  log_every: int
  max_nan_steps: int
  init_from: str
  trainable: tuple[str, ...]
  peak_flops: float
  dpo_beta: float


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str
  lr: float
  schedule: str
  warmup_steps: int
  min_lr_ratio: float
  decay_fraction: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int
  keep: int
  keep_best: int
  async_save: bool


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int
  batch_size: int
  max_batches: int
  seq_lens: tuple[int, ...]
  task: str
  task_max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  stop: str


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Device layout. `rules` pairs each logical axis with the mesh axes it is sharded over."""

  strategy: str
  mesh_data: int
  mesh_fsdp: int
  mesh_expert: int
  mesh_context: int
  mesh_tensor: int
  rules: tuple[tuple[str, str], ...]
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  xla_flags: str

  @property
  def mesh_sizes(self) -> dict[str, int]:
    """Configured size of each of MESH_AXES (-1: the devices left over)."""
    return {axis: getattr(self, f'mesh_{axis}') for axis in MESH_AXES}

  def mesh_rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """flax logical-axis rules: (logical name, a mesh axis, several, or None: replicated)."""
    def axes(rule: str) -> str | tuple[str, ...] | None:
      names = mesh_axes(rule)
      return names[0] if len(names) == 1 else names or None
    return tuple((name, axes(rule)) for name, rule in self.rules)


def mesh_axes(rule: str) -> tuple[str, ...]:
  """'data,fsdp' -> ('data', 'fsdp'); '' -> () (replicated)."""
  return tuple(axis.strip() for axis in rule.split(',') if axis.strip())


_SECTIONS = {
    'model': ModelConfig,
    'data': DataConfig,
    'train': TrainConfig,
    'optim': OptimConfig,
    'checkpoint': CheckpointConfig,
    'eval': EvalConfig,
    'sample': SampleConfig,
    'parallel': ParallelConfig,
}


# Model keys that change no parameter, so a trained model may be run (evaluated, sampled, or
# fine-tuned, e.g. to extend its context) with other values; the given config wins.
INFERENCE_KEYS = ('max_seq_len', 'rope_scaling', 'rope_scaling_factor',
                  'rope_original_max_seq_len', 'rope_low_freq_factor', 'rope_high_freq_factor',
                  'attention_window', 'attention_impl', 'dtype', 'matmul_precision',
                  'capacity_factor')

# Keys added to configs/base.py after runs were first saved, with the value an older run's
# config.json means by leaving them out (the behaviour before they existed). A new key whose
# default changes nothing belongs here too, so that every saved run keeps loading.
ADDED_KEYS: dict[str, Any] = {
    'model': {'attention_pattern': 'full', 'attention_stride': 0, 'attention_summary': 1,
              'attention_block': 128, 'matmul_precision': 'float32',
              'lora': {'rank': 0, 'alpha': 16.0, 'dropout': 0.0, 'targets': ['q', 'k', 'v', 'o']}},
    'data': {'format': 'text', 'chat_template': 'builtin'},
    'train': {'tokens': 0, 'flops': 0.0, 'dpo_beta': 0.1},
    'eval': {'task': '', 'task_max_new_tokens': 64},
    'parallel': {'mesh_expert': 1, 'mesh_context': 1,
                 'rules': {**{axis: '' for axis in LOGICAL_AXES}, 'length': CONTEXT_AXIS},
                 'distributed': False, 'coordinator_address': '', 'num_processes': 0,
                 'process_id': -1, 'xla_flags': ''},
}


def with_added_keys(raw: Mapping[str, Any], added: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
  """`raw` with every missing key of ADDED_KEYS filled in (present keys are kept as they are)."""
  raw = dict(_to_plain(raw))
  for key, value in (ADDED_KEYS if added is None else added).items():
    if key not in raw:
      raw[key] = _to_plain(value)
    elif isinstance(value, Mapping) and isinstance(raw[key], Mapping):
      raw[key] = with_added_keys(raw[key], value)
  return raw


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole run, validated. Build it with `Config.from_config_dict`."""

  seed: int
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optim: OptimConfig
  checkpoint: CheckpointConfig
  eval: EvalConfig
  sample: SampleConfig
  parallel: ParallelConfig

  @classmethod
  def from_saved(cls, raw: Mapping[str, Any]) -> Config:
    """A run's saved config.json, written by this or an earlier version of lm.

    Keys added since (ADDED_KEYS) are filled with the values that keep the run's behaviour;
    everything else is checked as strictly as a new config.
    """
    return cls.from_config_dict(with_added_keys(raw))

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> Config:
    """Builds and validates; `cd` is a ConfigDict or a plain nested dict (e.g. config.json)."""
    raw = _to_plain(cd)
    _check_keys(raw, ['seed', *_SECTIONS], where='')
    sections = {}
    for name, section_cls in _SECTIONS.items():
      values = raw[name]
      if not isinstance(values, dict):
        raise ValueError(f'config.{name} must be a section (a ConfigDict), got {values!r}.')
      _check_keys(values, [f.name for f in dataclasses.fields(section_cls)], where=f'{name}.')
      if name == 'model':  # types first: a hand-edited d_model='64' must not reach arithmetic
        values = _resolve_model_sizes(_coerce(section_cls, values, name))
      if name == 'parallel':
        values = _resolve_rules(values)
      sections[name] = section_cls(**_coerce(section_cls, values, name))
    config = cls(seed=_coerce_value(raw['seed'], int, 'seed'), **sections)
    validate(config)
    return config

  def to_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values['parallel']['rules'] = dict(self.parallel.rules)  # as written in configs/base.py
    return values


def with_vocab_size(model: ModelConfig, tokenizer_vocab_size: int) -> ModelConfig:
  """Fits the model's vocabulary to a tokenizer's.

  `model.vocab_size == 0` takes the tokenizer's size rounded up to `vocab_multiple_of`; an
  explicit size must hold every token id the tokenizer can produce.
  """
  if model.vocab_size == 0:
    multiple = model.vocab_multiple_of
    return dataclasses.replace(
        model, vocab_size=-(-tokenizer_vocab_size // multiple) * multiple)
  if model.vocab_size < tokenizer_vocab_size:
    raise ValueError(
        f'model.vocab_size={model.vocab_size} is smaller than the tokenizer\'s vocabulary '
        f'({tokenizer_vocab_size} tokens): ids past {model.vocab_size - 1} would have no '
        f'embedding. Set --config.model.vocab_size=0 (fit the tokenizer) or >= '
        f'{tokenizer_vocab_size}.')
  return model


def with_budget(config: Config, flops_per_token: float) -> Config:
  """Turns a `train.tokens` or `train.flops` budget into `train.steps` (rounded up).

  Variants of different size then train on equal tokens or equal compute, which is what a fair
  comparison at a fixed budget needs; `flops_per_token` is lm.info's training estimate.
  """
  t = config.train
  if not (t.tokens or t.flops):
    return config
  tokens_per_step = t.batch_size * config.data.seq_len
  tokens = t.tokens or t.flops / flops_per_token
  steps = max(1, math.ceil(tokens / tokens_per_step))
  if config.optim.warmup_steps > steps:
    budget = f'train.tokens={t.tokens}' if t.tokens else f'train.flops={t.flops:g}'
    _fail('optim.warmup_steps', f'{config.optim.warmup_steps} exceeds the {steps} steps that '
          f'{budget} gives', f'Use at most {steps} warmup steps, or a larger budget.')
  return dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))


def check_devices(config: Config, num_devices: int, over: str = 'devices') -> None:
  """Checks that the global batch splits evenly over devices and micro-batches.

  `num_devices` is what the batch is split over: every device under pmap, the product of the
  mesh axes in parallel.rules.batch under mesh (`over` names them in the error).
  """
  t = config.train
  per_step = num_devices * t.grad_accum
  if t.batch_size % per_step:
    raise ValueError(
        f'train.batch_size={t.batch_size} must be divisible by {over} x train.grad_accum = '
        f'{num_devices} x {t.grad_accum} = {per_step}. Use a multiple of {per_step}, e.g. '
        f'--config.train.batch_size={max(per_step, t.batch_size // per_step * per_step)}.')
  if config.eval.batch_size % num_devices:
    raise ValueError(
        f'eval.batch_size={config.eval.batch_size} must be divisible by the {num_devices} '
        f'{over}. Use a multiple of {num_devices}.')


# ---------------------------------------------------------------------------------------------
# Validation.


def _fail(key: str, problem: str, fix: str) -> None:
  raise ValueError(f'{key}: {problem}. {fix}')


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    near = difflib.get_close_matches(str(value), choices, n=1)
    hint = f'Did you mean {near[0]!r}? ' if near else ''
    _fail(key, f'{value!r} is not one of {", ".join(choices)}', f'{hint}Pick one of those.')


def _positive(key: str, value: float) -> None:
  if value <= 0:
    _fail(key, f'must be > 0, got {value}', 'Set a positive value.')


def _non_negative(key: str, value: float) -> None:
  if value < 0:
    _fail(key, f'must be >= 0, got {value}', 'Set 0 or a positive value.')


def _probability(key: str, value: float) -> None:
  if not 0.0 <= value < 1.0:
    _fail(key, f'must be in [0, 1), got {value}', 'Use a rate such as 0.1, or 0 for none.')


def validate(config: Config) -> None:
  """Raises ValueError naming the key and the fix for any invalid value or combination."""
  _validate_model(config.model)
  _validate_data(config.data, config.model)
  _validate_training(config)


def _validate_model(m: ModelConfig) -> None:
  for key in ('pos_emb', 'ffn', 'expert_ffn', 'norm', 'norm_position', 'rope_scaling',
              'attention_impl', 'attention_pattern', 'remat', 'dtype', 'param_dtype',
              'matmul_precision'):
    choices = {
        'pos_emb': POS_EMBS, 'ffn': FFNS, 'expert_ffn': EXPERT_FFNS, 'norm': NORMS,
        'norm_position': NORM_POSITIONS, 'rope_scaling': ROPE_SCALINGS,
        'attention_impl': ATTENTION_IMPLS, 'attention_pattern': ATTENTION_PATTERNS,
        'remat': REMATS, 'dtype': DTYPES,
        'param_dtype': DTYPES, 'matmul_precision': MATMUL_PRECISIONS}[key]
    _one_of(f'model.{key}', getattr(m, key), choices)
  _non_negative('model.vocab_size', m.vocab_size)
  for key in ('vocab_multiple_of', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
              'head_dim', 'd_ff', 'ffn_multiple_of', 'max_seq_len', 'norm_eps', 'init_std'):
    _positive(f'model.{key}', getattr(m, key))
  if m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads',
          f'num_heads={m.num_heads} is not divisible by num_kv_heads={m.num_kv_heads}',
          'Use num_heads (MHA), 1 (MQA) or a divisor of num_heads (GQA).')
  for key in ('embed_dropout', 'attn_dropout', 'resid_dropout'):
    _probability(f'model.{key}', getattr(m, key))
  for key in ('attention_window', 'attn_logit_softcap', 'final_logit_softcap'):
    _non_negative(f'model.{key}', getattr(m, key))
  _validate_attention(m)
  if m.pos_emb == 'rope':
    if not 0.0 < m.rope_fraction <= 1.0:
      _fail('model.rope_fraction', f'must be in (0, 1], got {m.rope_fraction}',
            'Use 1.0 to rotate every dimension, or e.g. 0.25 for partial rotary.')
    if m.rope_dim < 2:
      _fail('model.rope_fraction',
            f'rotates {m.rope_dim} of head_dim={m.head_dim} dimensions; RoPE needs at least 2',
            'Raise rope_fraction or head_dim.')
    _positive('model.rope_theta', m.rope_theta)
    if m.rope_scaling != 'none' and m.rope_scaling_factor < 1.0:
      _fail('model.rope_scaling_factor', f'must be >= 1 to extend the context, got '
            f'{m.rope_scaling_factor}', 'Use e.g. 2.0 to double the context.')
    if m.rope_scaling == 'llama3' and not m.rope_high_freq_factor > m.rope_low_freq_factor:
      _fail('model.rope_high_freq_factor',
            f'must exceed rope_low_freq_factor={m.rope_low_freq_factor}, got '
            f'{m.rope_high_freq_factor}', 'Llama 3 uses low=1, high=4.')
  elif m.rope_scaling != 'none':
    _fail('model.rope_scaling', f'{m.rope_scaling!r} needs pos_emb=rope, got {m.pos_emb!r}',
          'Set --config.model.pos_emb=rope or rope_scaling=none.')
  if m.pos_emb == 'relative':
    _positive('model.relative_num_buckets', m.relative_num_buckets)
    _positive('model.relative_max_distance', m.relative_max_distance)
  if m.ffn == 'moe':
    _positive('model.num_experts', m.num_experts)
    _positive('model.top_k', m.top_k)
    if m.top_k > m.num_experts:
      _fail('model.top_k', f'top_k={m.top_k} exceeds num_experts={m.num_experts}',
            f'Use top_k <= {m.num_experts}.')
    _non_negative('model.capacity_factor', m.capacity_factor)
    _non_negative('model.router_aux_loss_weight', m.router_aux_loss_weight)
    _non_negative('model.router_z_loss_weight', m.router_z_loss_weight)
  _validate_lora(m.lora)


def _validate_lora(lora: LoraConfig) -> None:
  """model.lora: rank 0 is off; targets name projections of LORA_TARGETS, each once."""
  _non_negative('model.lora.rank', lora.rank)
  _probability('model.lora.dropout', lora.dropout)
  for target in lora.targets:
    _one_of('model.lora.targets', target, LORA_TARGETS)
  if len(set(lora.targets)) != len(lora.targets):
    _fail('model.lora.targets', f'{list(lora.targets)} names a projection twice',
          'Name each once.')
  if lora.rank:
    _positive('model.lora.alpha', lora.alpha)
    if not lora.targets:
      _fail('model.lora.targets', f'is empty, so rank={lora.rank} adapts nothing',
            f"Name projections ({', '.join(LORA_TARGETS)}), e.g. ['q', 'v'], or set rank=0.")


def _validate_attention(m: ModelConfig) -> None:
  if m.attention_pattern == 'local' and not m.attention_window:
    _fail('model.attention_window', "is 0 but attention_pattern='local' needs a window",
          'Set e.g. --config.model.attention_window=256.')
  if m.attention_pattern == 'fixed':
    if m.attention_stride < 1:
      _fail('model.attention_stride', f"must be a positive block length for attention_pattern="
            f"'fixed', got {m.attention_stride}", 'Set e.g. --config.model.attention_stride=64.')
    if not 1 <= m.attention_summary <= m.attention_stride:
      _fail('model.attention_summary', f'must be in [1, attention_stride={m.attention_stride}],'
            f' got {m.attention_summary}', 'Use e.g. 1 (the last position of each block).')
    if m.attention_window:
      _fail('model.attention_window', f"is {m.attention_window} with attention_pattern='fixed', "
            'whose summary positions reach back to the start', 'Set attention_window=0.')
  if m.matmul_precision == 'bfloat16' and m.dtype != 'float32':
    _fail('model.matmul_precision', f"is 'bfloat16', which rounds float32 operands, but "
          f'model.dtype={m.dtype} computes in 16 bits already (float16 operands would lose '
          'precision to bfloat16)', "Use matmul_precision='float32' with a 16-bit dtype, or "
          "dtype='float32' with matmul_precision='bfloat16'.")
  if m.attention_impl == 'cudnn':
    if m.dtype not in ('bfloat16', 'float16'):
      _fail('model.dtype', f"is {m.dtype!r}, but cuDNN's fused attention (attention_impl="
            "'cudnn') computes in 16 bits only", "Set model.dtype=bfloat16, or use "
            "attention_impl='dot_product_attention' (cuDNN where it applies, XLA otherwise).")
    if m.attn_logit_softcap or m.attn_dropout:
      _fail('model.attention_impl', "is 'cudnn', whose fused kernel has no logit soft cap "
            'and no dropout on the weights', "Use attention_impl='xla', or set "
            'attn_logit_softcap=0 and attn_dropout=0.')
  if m.attention_impl == 'blockwise':
    _positive('model.attention_block', m.attention_block)
    if m.attn_dropout:
      _fail('model.attn_dropout', f'is {m.attn_dropout}, but blockwise attention never forms '
            'the weights that dropout would drop', "Use attention_impl='xla', or attn_dropout=0.")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
  _one_of('data.tokenizer', d.tokenizer, TOKENIZERS)
  _one_of('data.sp_model_type', d.sp_model_type, SP_MODEL_TYPES)
  if not d.corpus:
    _fail('data.corpus', 'is empty', 'Use stdlib, a text file, a directory, a glob or a .bin.')
  if not 0.0 < d.val_fraction < 1.0:
    _fail('data.val_fraction', f'must be in (0, 1), got {d.val_fraction}',
          'Use e.g. 0.05 to hold out 5% for validation.')
  for key in ('seq_len', 'vocab_size', 'sp_train_chars'):
    _positive(f'data.{key}', getattr(d, key))
  _non_negative('data.eval_stride', d.eval_stride)
  _non_negative('data.prefetch', d.prefetch)
  if d.eval_stride > d.seq_len:
    _fail('data.eval_stride', f'{d.eval_stride} exceeds data.seq_len={d.seq_len}, which would '
          'skip tokens', f'Use 0 (= seq_len) or a value <= {d.seq_len}.')
  if m.pos_emb == 'learned' and d.seq_len > m.max_seq_len:
    _fail('model.max_seq_len', f'learned positions cover {m.max_seq_len} tokens but '
          f'data.seq_len={d.seq_len}', f'Set --config.model.max_seq_len={d.seq_len} or more, '
          'or shorten data.seq_len.')
  _validate_examples(d)


def _validate_examples(d: DataConfig) -> None:
  """data.format and data.chat_template: SFT and preference data are JSONL examples."""
  _one_of('data.format', d.format, DATA_FORMATS)
  if d.chat_template not in CHAT_TEMPLATES and not d.chat_template.endswith('.jinja'):
    near = difflib.get_close_matches(d.chat_template, CHAT_TEMPLATES, n=1)
    hint = f'Did you mean {near[0]!r}? ' if near else ''
    _fail('data.chat_template', f'{d.chat_template!r} is neither one of '
          f'{", ".join(CHAT_TEMPLATES)} nor a .jinja file', f'{hint}Use builtin, hf (the '
          "Hugging Face tokenizer's own), none (plain concatenation) or a path ending in .jinja.")
  if d.format == 'text':
    return
  if not d.corpus.endswith('.jsonl'):
    fields = ('{"prompt", "response"} or {"messages": [...]}' if d.format == 'sft'
              else '{"prompt", "chosen", "rejected"}')
    _fail('data.corpus', f'is {d.corpus!r}, but data.format={d.format} reads a JSONL file of '
          f'{fields}', f'Point --config.data.corpus at a .jsonl file, or set data.format=text.')
  if d.format == 'preference' and d.packing:
    _fail('data.packing', 'is True, but preference pairs are padded, one sequence per row, '
          'so that chosen and rejected line up', 'Set --config.data.packing=False.')


def _validate_training(c: Config) -> None:
  t, o, k, e, p = c.train, c.optim, c.checkpoint, c.eval, c.parallel
  for key in ('steps', 'batch_size', 'grad_accum', 'steps_per_call', 'log_every',
              'max_nan_steps'):
    _positive(f'train.{key}', getattr(t, key))
  _non_negative('train.peak_flops', t.peak_flops)
  _non_negative('train.tokens', t.tokens)
  _non_negative('train.flops', t.flops)
  if t.tokens and t.flops:
    _fail('train.flops', f'is set ({t.flops:g}) together with train.tokens={t.tokens}',
          'Budget a run by tokens or by FLOPs, not both: set the other to 0.')
  if t.batch_size % t.grad_accum:
    _fail('train.grad_accum', f'train.batch_size={t.batch_size} is not divisible by '
          f'grad_accum={t.grad_accum}', 'Use a divisor of the batch size.')
  if t.log_every % t.steps_per_call or k.every % t.steps_per_call or (
      c.eval.every % t.steps_per_call):
    _fail('train.steps_per_call', f'{t.steps_per_call} must divide train.log_every='
          f'{t.log_every}, checkpoint.every={k.every} and eval.every={c.eval.every}',
          'Pick a common divisor so logs, evaluations and checkpoints land on call boundaries.')
  _one_of('optim.name', o.name, OPTIMIZERS)
  _one_of('optim.schedule', o.schedule, SCHEDULES)
  _positive('optim.lr', o.lr)
  _non_negative('optim.warmup_steps', o.warmup_steps)
  if o.warmup_steps > t.steps and not (t.tokens or t.flops):  # budgets: see with_budget
    _fail('optim.warmup_steps', f'{o.warmup_steps} exceeds train.steps={t.steps}',
          f'Use at most {t.steps} warmup steps.')
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    _fail('optim.min_lr_ratio', f'must be in [0, 1], got {o.min_lr_ratio}',
          'Use e.g. 0.1 to decay to a tenth of the peak.')
  if not 0.0 <= o.decay_fraction <= 1.0:
    _fail('optim.decay_fraction', f'must be in [0, 1], got {o.decay_fraction}',
          'Use e.g. 0.2 to decay over the last fifth of training.')
  for key in ('b1', 'b2'):
    _probability(f'optim.{key}', getattr(o, key))
  for key in ('eps', 'weight_decay', 'grad_clip'):
    _non_negative(f'optim.{key}', getattr(o, key))
  if o.name in ('adamw', 'muon') and o.eps <= 0:  # it divides: 0 / 0 where a gradient is 0
    _fail('optim.eps', f'must be > 0 for optim.name={o.name!r}, got {o.eps}',
          'Set a small positive value such as 1e-8.')
  _positive('checkpoint.every', k.every)
  _positive('checkpoint.keep', k.keep)
  _non_negative('checkpoint.keep_best', k.keep_best)
  _non_negative('eval.every', e.every)
  _positive('eval.batch_size', e.batch_size)
  _non_negative('eval.max_batches', e.max_batches)
  for n in e.seq_lens:
    _positive('eval.seq_lens', n)
  if e.task and not e.task.endswith('.jsonl'):
    _fail('eval.task', f'is {e.task!r}, not a .jsonl file', 'Point it at a JSONL file of '
          '{"prompt", "answer"} lines, or set it to \'\' to score the validation split.')
  _positive('eval.task_max_new_tokens', e.task_max_new_tokens)
  _positive('train.dpo_beta', t.dpo_beta)
  s = c.sample
  _non_negative('sample.max_new_tokens', s.max_new_tokens)
  _non_negative('sample.temperature', s.temperature)
  _non_negative('sample.top_k', s.top_k)
  if not 0.0 < s.top_p <= 1.0:
    _fail('sample.top_p', f'must be in (0, 1], got {s.top_p}', 'Use 1.0 to turn it off.')
  _validate_parallel(p)
  _validate_context(c)


def _validate_parallel(p: ParallelConfig) -> None:
  _one_of('parallel.strategy', p.strategy, STRATEGIES)
  for axis, value in p.mesh_sizes.items():
    if value == 0 or value < -1:
      _fail(f'parallel.mesh_{axis}', f'must be a positive size or -1 (the rest), got {value}',
            'Use e.g. 1, 2, 4 or -1.')
  rest = [f'mesh_{axis}' for axis, value in p.mesh_sizes.items() if value == -1]
  if len(rest) > 1:
    _fail(f'parallel.{rest[1]}', f'is -1 like parallel.{rest[0]}; only one mesh axis can take '
          'the devices left over', f'Give parallel.{rest[1]} a size.')
  for name, rule in p.rules:
    axes = mesh_axes(rule)
    for axis in axes:
      if axis not in MESH_AXES:
        near = difflib.get_close_matches(axis, MESH_AXES, n=1)
        hint = f'Did you mean {near[0]!r}? ' if near else ''
        _fail(f'parallel.rules.{name}', f'{axis!r} is not a mesh axis ({", ".join(MESH_AXES)})',
              f"{hint}Use mesh axis names separated by commas, or '' to replicate.")
    if len(set(axes)) != len(axes):
      _fail(f'parallel.rules.{name}', f'{rule!r} names a mesh axis twice', 'Name each once.')
  if p.distributed and p.strategy != 'mesh':
    _fail('parallel.distributed', 'multi-host runs need parallel.strategy=mesh (pmap keeps '
          'one replica per local device and never spans hosts)',
          'Set --config.parallel.strategy=mesh.')
  _non_negative('parallel.num_processes', p.num_processes)
  for flag in p.xla_flags.split():
    if not re.fullmatch(r'--xla_\w+(=\S*)?', flag):
      _fail('parallel.xla_flags', f'{flag!r} is not an XLA flag',
            "Give space-separated flags of the form --xla_name=value, e.g. "
            "'--xla_force_host_platform_device_count=2'.")
  if p.process_id < -1:
    _fail('parallel.process_id', f'must be >= 0, or -1 (from the environment), got '
          f'{p.process_id}', 'Use 0 for the coordinator, 1, 2, ... for the others.')
  if p.num_processes and p.process_id >= p.num_processes:
    _fail('parallel.process_id', f'{p.process_id} is not below parallel.num_processes='
          f'{p.num_processes}', f'Use 0 .. {p.num_processes - 1}.')


def _validate_context(c: Config) -> None:
  """Context parallelism: ring attention over parallel.mesh_context devices (lm/model/ring.py)."""
  p, m, context = c.parallel, c.model, c.parallel.mesh_context
  if context == 1:
    return
  if p.strategy != 'mesh':
    _fail('parallel.mesh_context', f'is {context}, but context parallelism shards the sequence '
          f'over a device mesh and parallel.strategy={p.strategy!r}',
          'Set --config.parallel.strategy=mesh, or parallel.mesh_context=1.')
  if context > 1 and c.data.seq_len % context:
    _fail('data.seq_len', f'{c.data.seq_len} does not split into parallel.mesh_context='
          f'{context} equal chunks', f'Use a multiple of {context}, e.g. '
          f'--config.data.seq_len={-(-c.data.seq_len // context) * context}.')
  if m.attn_dropout:
    _fail('model.attn_dropout', f'is {m.attn_dropout}, but ring attention (parallel.mesh_context='
          f'{context}) never forms the weights that dropout would drop',
          'Set attn_dropout=0, or parallel.mesh_context=1.')
  if m.attention_impl in ('dot_product_attention', 'cudnn'):
    _fail('model.attention_impl', f"is {m.attention_impl!r}, which cannot be combined across "
          f'the key chunks of ring attention (parallel.mesh_context={context})',
          "Use 'xla' (one block per chunk) or 'blockwise' (model.attention_block keys at a time).")


# ---------------------------------------------------------------------------------------------
# Building.


def _resolve_model_sizes(values: dict[str, Any]) -> dict[str, Any]:
  """Fills head_dim=0 and d_ff=0 with the conventional sizes."""
  values = dict(values)
  if values['head_dim'] == 0:
    d_model, heads = values['d_model'], values['num_heads']
    if heads <= 0 or d_model % heads:
      _fail('model.d_model', f'd_model={d_model} is not divisible by num_heads={heads}',
            'Change d_model or num_heads, or set model.head_dim explicitly.')
    values['head_dim'] = d_model // heads
  if values['d_ff'] == 0:
    if values['ffn'] == 'mlp':
      values['d_ff'] = 4 * values['d_model']
    else:  # gated FFNs keep the parameter count of a 4x MLP (Shazeer, 2020)
      multiple = values['ffn_multiple_of']
      values['d_ff'] = -(-(8 * values['d_model'] // 3) // multiple) * multiple
  return values


def _resolve_rules(values: dict[str, Any]) -> dict[str, Any]:
  """parallel.rules {logical axis: 'mesh,axes'} -> pairs in LOGICAL_AXES order (the priority
  flax gives them); every logical axis needs a rule, so none stays replicated by omission."""
  rules = values['rules']
  if not isinstance(rules, Mapping):
    raise ValueError(f'parallel.rules must be a section {{logical axis: mesh axes}}, got '
                     f'{rules!r}.')
  _check_keys(rules, list(LOGICAL_AXES), where='parallel.rules.')
  for name, rule in rules.items():
    if not isinstance(rule, str):
      raise ValueError(f'parallel.rules.{name} must be a string of mesh axes such as '
                       f"'data,fsdp' (or '' to replicate), got {rule!r}.")
  return dict(values, rules=tuple((name, rules[name]) for name in LOGICAL_AXES))


def _to_plain(cd: Any) -> Any:
  if hasattr(cd, 'to_dict'):
    cd = cd.to_dict()
  if isinstance(cd, Mapping):
    return {k: _to_plain(v) for k, v in cd.items()}
  return cd


def _check_keys(values: Mapping[str, Any], expected: list[str], where: str) -> None:
  unknown = [k for k in values if k not in expected]
  if unknown:
    key = unknown[0]
    near = difflib.get_close_matches(key, expected, n=1)
    hint = f'Did you mean {where}{near[0]}?' if near else f'Valid keys: {", ".join(expected)}.'
    raise ValueError(f'Unknown config key {where}{key}. {hint}')
  missing = [k for k in expected if k not in values]
  if missing:
    raise ValueError(
        f'Config key {where}{missing[0]} is missing. Start your config from configs/base.py '
        '(`config = base.get_config()`), which defines every key.')


def _coerce(section_cls: type, values: Mapping[str, Any], name: str) -> dict[str, Any]:
  types = {f.name: f.type for f in dataclasses.fields(section_cls)}
  return {k: _coerce_value(v, _TYPES[types[k]], f'{name}.{k}') for k, v in values.items()}


_TYPES = {'int': int, 'float': float, 'str': str, 'bool': bool,
          'tuple[str, ...]': (tuple, str), 'tuple[int, ...]': (tuple, int),
          'tuple[tuple[str, str], ...]': (tuple, (tuple, str)),
          'LoraConfig': LoraConfig}


def _subsection(section_cls: type, values: Any, key: str) -> Any:
  """A section nested in a section (model.lora), its keys checked like a top-level one's."""
  if isinstance(values, section_cls):  # built already (sections are coerced twice)
    return values
  if not isinstance(values, Mapping):
    raise ValueError(f'config.{key} must be a section (a ConfigDict), got {values!r}.')
  _check_keys(values, [f.name for f in dataclasses.fields(section_cls)], where=f'{key}.')
  return section_cls(**_coerce(section_cls, values, key))


def _coerce_value(value: Any, kind: Any, key: str) -> Any:
  """Checks a value's type; ints are accepted for floats, lists for tuples."""
  if dataclasses.is_dataclass(kind):
    return _subsection(kind, value, key)
  if isinstance(kind, tuple):
    if isinstance(value, (str, int)) and not isinstance(value, bool):
      value = (value,)
    if not isinstance(value, (list, tuple)):
      raise ValueError(f'{key} must be a list, got {value!r}.')
    return tuple(_coerce_value(v, kind[1], key) for v in value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, float) and value.is_integer() and math.isfinite(value):
    return int(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ValueError(f'{key} must be a {kind.__name__}, got {value!r} '
                     f'({type(value).__name__}).')
  return value


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Parses a config file's `k=v,k2=v2` argument against its known keys and their types.

  For `--config=configs/gpt2.py:size=medium`, a config calls `parse_arg(arg, {'size': 'small'})`.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep:
      raise ValueError(f'Config argument {item!r} is not of the form key=value '
                       f'(known keys: {", ".join(defaults)}).')
    if key not in defaults:
      near = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f'Did you mean {near[0]}?' if near else f'Known keys: {", ".join(defaults)}.'
      raise ValueError(f'Unknown config argument {key!r}. {hint}')
    kind = type(defaults[key])
    text = text.strip()
    if kind is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key} must be true or false, got {text!r}.')
      values[key] = text.lower() in ('true', '1')
    else:
      try:
        values[key] = kind(text)
      except ValueError:
        raise ValueError(f'Config argument {key} must be a {kind.__name__}, got {text!r}.'
                         ) from None
  return values


def choose(key: str, value: str, presets: Mapping[str, Any]) -> Any:
  """Looks up a named preset, failing with the list of valid names."""
  if value not in presets:
    _one_of(key, value, tuple(presets))
  return presets[value]
