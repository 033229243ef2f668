"""`--mode=train`: the train state, a pure compiled train step, and the loop around it.

The step is compiled once (jit on one device, pmap over several, or jit over a sharded mesh:
see lm.parallel) with the state's buffers donated, and runs train.steps_per_call optimizer
steps per call under lax.scan. Gradients are token-weighted over the whole global batch: each
device and micro-batch differentiates its weighted cross-entropy sum divided by the global
weight, so the sum of those gradients over micro-batches and devices (lax.psum under pmap;
implicit under the mesh's jit) is exactly the large-batch gradient. With data.format=preference
the objective is DPO's (lm.dpo) on pairs [B, 2, T], weighted per pair instead. A non-finite loss
or gradient keeps the previous parameters and optimizer state (the step counter still advances
past the bad batch, the optimizer's own count and schedule do not).

The loop resumes from DIR/checkpoints by itself, logs to DIR/metrics.jsonl and TensorBoard,
evaluates, checkpoints asynchronously, and turns SIGTERM into a checkpoint and a clean exit.
With several processes (parallel.distributed) each loads only its rows of every batch, all
write their shards of each checkpoint, and only process 0 writes logs and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax import linen as nn
from flax import struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import dpo
from lm import info as info_lib
from lm import metrics as metrics_lib
from lm import model as lm_model
from lm import optim
from lm import parallel
from lm.model import lora as lora_lib


class NonFiniteLossError(RuntimeError):
  """train.max_nan_steps consecutive updates were skipped for a NaN or Inf loss or gradient."""


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static (hashable) settings of the compiled step."""

  grad_accum: int = 1
  axis_name: str | None = None  # the pmap axis to reduce over; None: one device
  dropout: bool = False  # any dropout rate > 0: run the model non-deterministically
  router_aux_loss_weight: float = 0.0
  router_z_loss_weight: float = 0.0
  frozen: tuple[bool, ...] | None = None  # per parameter leaf (tree order): no gradient
  objective: str = 'lm'  # lm: weighted cross-entropy; dpo: preference pairs [B, 2, T] (lm.dpo)
  dpo_beta: float = 0.1
  dpo_reference: str = 'copy'  # dpo: copy (state.ref_params) | adapters_off (LoRA's lora_b = 0)
  # optim.ELEMENTWISE_UPDATE: the measured update norm recomputes the update (see train_step).
  elementwise_update: bool = True
  # optim.STATE_READ_BY_UPDATE: the state is written after the parameters.
  state_read_by_update: bool = False


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; apply_fn, tx, lr and options are static."""

  step: jax.Array  # int32 [], optimizer steps taken (skipped ones included)
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # uint32 raw key data: dropout keys are folded from it and the step
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  lr: optax.Schedule = struct.field(pytree_node=False)
  options: StepOptions = struct.field(pytree_node=False, default=StepOptions())
  # DPO without LoRA: the frozen starting parameters, never updated nor in the optimizer (nor
  # checkpointed: a resumed run reloads them from train.init_from). None otherwise.
  ref_params: Any = None


# ---------------------------------------------------------------------------------------------
# The step.


def _psum(x: Any, axis_name: str | None) -> Any:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmean(x: Any, axis_name: str | None) -> Any:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
  return dict(positions_BxT=batch.get('positions'), segment_ids_BxT=batch.get('segment_ids'))


def weighted_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                           weights_BxT: jax.Array) -> jax.Array:
  """Sum over tokens of weight x cross-entropy, in float32."""
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT)
  return jnp.sum(ce_BxT * weights_BxT.astype(jnp.float32))


def _rows(batch: Mapping[str, jax.Array], options: StepOptions) -> Mapping[str, jax.Array]:
  """The model's input rows: DPO's pairs [B, 2, T] flattened to [2B, T]."""
  if options.objective == 'dpo':
    return {k: dpo.flatten_pairs(v) for k, v in batch.items()}
  return batch


def loss_weight(batch: Mapping[str, jax.Array], options: StepOptions) -> jax.Array:
  """What this device's loss sum is divided by (before summing over devices): target weights,
  or DPO's real pairs."""
  if options.objective == 'dpo':
    return jnp.sum(dpo.pair_mask(batch['weights']))
  return jnp.sum(batch['weights'].astype(jnp.float32))


def _loss_sums(state: TrainState, params: Any, batch: Mapping[str, jax.Array],
               rows: Mapping[str, jax.Array], logits_NxTxV: jax.Array) -> dict[str, jax.Array]:
  """{'loss_sum': ...} plus DPO's reward sums: what the objective and the metrics add up."""
  o = state.options
  if o.objective != 'dpo':
    return {'loss_sum': weighted_cross_entropy(logits_NxTxV, rows['targets'], rows['weights'])}
  logp_Bx2 = dpo.sequence_logprobs(logits_NxTxV, rows['targets'], rows['weights']).reshape(-1, 2)
  # The reference: computed here each step, never differentiated, always without dropout.
  ref_params = state.ref_params if o.dpo_reference == 'copy' else dpo.adapters_off(params)
  ref_logits_NxTxV = state.apply_fn({'params': jax.lax.stop_gradient(ref_params)},
                                    rows['inputs'], **_model_inputs(rows), deterministic=True)
  ref_logp_Bx2 = jax.lax.stop_gradient(dpo.sequence_logprobs(
      ref_logits_NxTxV, rows['targets'], rows['weights']).reshape(-1, 2))
  loss_B, reward_Bx2 = dpo.dpo_loss(logp_Bx2, ref_logp_Bx2, o.dpo_beta)
  return dpo.pair_sums(loss_B, reward_Bx2, dpo.pair_mask(batch['weights']))


def _objective(params: Any, state: TrainState, batch: Mapping[str, jax.Array],
               weight_total: jax.Array, moe_scale: float,
               rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """This device's micro-batch share of the global loss: loss_sum / W_global + MoE / shards."""
  o = state.options
  if o.frozen is not None:
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jax.lax.stop_gradient(x) if f else x for x, f in zip(leaves, o.frozen)]
    params = jax.tree.unflatten(treedef, leaves)
  rows = _rows(batch, o)
  logits_NxTxV, variables = state.apply_fn(
      {'params': params}, rows['inputs'], **_model_inputs(rows),
      deterministic=rng is None, rngs=None if rng is None else {'dropout': rng},
      mutable=['losses', 'intermediates'])
  sums = _loss_sums(state, params, batch, rows, logits_NxTxV)
  moe = lm_model.moe_losses(variables)
  moe_loss = (o.router_aux_loss_weight * moe['router_aux_loss']
              + o.router_z_loss_weight * moe['router_z_loss'])
  objective = sums['loss_sum'] / weight_total + moe_loss * moe_scale
  return objective, {**sums, **moe}


def _gradients(state: TrainState, batch: Mapping[str, jax.Array], weight_total: jax.Array,
               rng: jax.Array | None) -> tuple[Any, dict[str, jax.Array]]:
  """Summed gradients and statistics of this device's micro-batches (lax.scan if > 1)."""
  o = state.options
  shards = 1 if o.axis_name is None else jax.lax.psum(1, o.axis_name)
  moe_scale = 1.0 / (o.grad_accum * shards)  # router losses: the mean over all micro-batches
  grad_fn = jax.grad(_objective, has_aux=True)
  if o.grad_accum == 1:
    return grad_fn(state.params, state, batch, weight_total, moe_scale, rng)

  # Micro-batch j takes rows j, j + A, j + 2A, ...: every device's (or mesh batch shard's)
  # contiguous rows then feed every micro-batch alike, so no rows move between devices.
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // o.grad_accum, o.grad_accum, *x.shape[1:]).swapaxes(
          0, 1), batch)

  def accumulate(carry, inputs):
    index, micro_batch = inputs
    micro_rng = None if rng is None else jax.random.fold_in(rng, index)
    grads, stats = grad_fn(state.params, state, micro_batch, weight_total, moe_scale,
                           micro_rng)
    return jax.tree.map(jnp.add, carry, (grads, stats)), None

  shapes = jax.eval_shape(grad_fn, state.params, state, jax.tree.map(lambda x: x[0], micro),
                          weight_total, moe_scale, rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  (grads, stats), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(o.grad_accum), micro))
  stats = dict(stats, router_aux_loss=stats['router_aux_loss'] / o.grad_accum,
               router_z_loss=stats['router_z_loss'] / o.grad_accum)
  return grads, stats


def train_step(state: TrainState, batch: Mapping[str, jax.Array],
               measure_norms: bool | jax.Array = True) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share [B_local, T] of the global batch.

  The step is skipped (parameters and optimizer state kept) if the loss or the gradient norm is
  not finite; a finite gradient gives a finite update (optim.eps > 0 where it divides).
  `measure_norms` (a bool, or a traced one under lax.scan) says whether to measure the parameter
  and update norms (the update computed once more, and one more pass over the parameters); they
  are NaN where it is false.
  """
  o = state.options
  weight_total = jnp.maximum(_psum(loss_weight(batch, o), o.axis_name), 1e-9)
  rng = None
  if o.dropout:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if o.axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(o.axis_name))
  grads, stats = _gradients(state, batch, weight_total, rng)
  if o.axis_name is not None:
    grads = parallel.psum_tree(grads, o.axis_name)
  # Means over the global batch (DPO: reward_accuracy, reward_margin, ... over pairs).
  means = {k[:-len('_sum')]: v / weight_total for k, v in _psum(
      {k: v for k, v in stats.items() if k.endswith('_sum')}, o.axis_name).items()}
  loss = means.pop('loss')
  moe = _pmean({k: stats[k] for k in ('router_aux_loss', 'router_z_loss')}, o.axis_name)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A skipped step's updates are zero and its optimizer state is kept (optim.skippable).
  tx_update = functools.partial(state.tx.update, grads, state.opt_state, state.params)
  norm = lambda tree: optax.tree.norm(tree).astype(jnp.float32)
  unmeasured = lambda: jnp.float32(jnp.nan)
  if o.elementwise_update:
    # The branch computes the update again rather than take it as an operand (a cond's operands
    # are materialised, so every unmeasured step would write the update out).
    update_norm = jax.lax.cond(measure_norms, lambda: norm(tx_update(apply=finite)[0]),
                               unmeasured)
    # `finite` again (the norm is >= 0 or NaN, never -1), but computed after the branch, so its
    # reads of the old parameters visibly precede their in-place overwrite; XLA copied every
    # decayed matrix each step without that order. (A flag the branch passed through unchanged
    # would not do: JAX prunes such outputs of a cond.)
    finite = finite & (update_norm != -1.0)
    updates, opt_state = tx_update(apply=finite)
  else:  # Muon: its Newton-Schulz iterations are worth keeping rather than redoing
    updates, opt_state = tx_update(apply=finite)
    update_norm = jax.lax.cond(measure_norms, lambda: norm(updates), unmeasured)
  # Skipped parameters are kept bit for bit (p + 0 would turn -0.0 into 0.0).
  params = jax.tree.map(lambda p, new: jnp.where(finite, new, p), state.params,
                        optax.apply_updates(state.params, updates))
  param_norm = jax.lax.cond(measure_norms, lambda: norm(params), unmeasured)
  if o.state_read_by_update:
    # The same pure update again, so the same state, but its choice now waits for the new
    # parameters (the flag is `finite`: the norm is never -1). Otherwise XLA cannot see that the
    # step direction's reads of the old state come first, and copies the whole state at every
    # step of a multi-step scan.
    _, opt_state = tx_update(apply=finite & (param_norm != -1.0))
  metrics = {
      'loss': loss,
      **means,
      'router_aux_loss': moe['router_aux_loss'],
      'router_z_loss': moe['router_z_loss'],
      'grad_norm': grad_norm,
      'update_norm': update_norm,
      'param_norm': param_norm,
      'lr': jnp.asarray(state.lr(state.step), jnp.float32),
      'tokens': weight_total if o.objective == 'lm' else _psum(
          jnp.sum(batch['weights'].astype(jnp.float32)), o.axis_name),
      'skipped': (~finite).astype(jnp.int32),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def train_steps(state: TrainState, batches: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
  """Several steps in one compiled call: batches [K, B_local, T] -> metrics [K].

  Only the last step measures the parameter and update norms (the loop logs the last step's
  metrics of each call); the others report NaN for them.
  """
  num_steps = jax.tree.leaves(batches)[0].shape[0]

  def step(state, indexed_batch):
    index, batch = indexed_batch
    return train_step(state, batch, measure_norms=index == num_steps - 1)

  return jax.lax.scan(step, state, (jnp.arange(num_steps), batches))


def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Loss sums and the weight they divide by (DPO: pairs) of a validation batch, summed over
  devices."""
  rows = _rows(batch, state.options)
  logits_NxTxV = state.apply_fn({'params': state.params}, rows['inputs'],
                                **_model_inputs(rows), deterministic=True)
  sums = dict(_loss_sums(state, state.params, batch, rows, logits_NxTxV),
              weight_sum=loss_weight(batch, state.options))
  return _psum(sums, state.options.axis_name)


# ---------------------------------------------------------------------------------------------
# Building the state.


def step_options(config: lm_config.Config, axis_name: str | None,
                 frozen: tuple[bool, ...] | None = None,
                 dpo_reference: str = 'copy') -> StepOptions:
  m = config.model
  return StepOptions(
      grad_accum=config.train.grad_accum,
      axis_name=axis_name,
      dropout=max(m.embed_dropout, m.attn_dropout, m.resid_dropout,
                  m.lora.dropout if m.lora.rank else 0.0) > 0,
      router_aux_loss_weight=m.router_aux_loss_weight if m.ffn == 'moe' else 0.0,
      router_z_loss_weight=m.router_z_loss_weight if m.ffn == 'moe' else 0.0,
      frozen=frozen,
      objective='dpo' if config.data.format == 'preference' else 'lm',
      dpo_beta=config.train.dpo_beta,
      dpo_reference=dpo_reference,
      elementwise_update=config.optim.name in optim.ELEMENTWISE_UPDATE,
      state_read_by_update=config.optim.name in optim.STATE_READ_BY_UPDATE)


abstract_params = parallel.abstract_params  # boxed parameter shapes (logical axis names)


@functools.lru_cache(maxsize=8)
def _init_fn(model_config: lm_config.ModelConfig) -> Callable[[jax.Array], Any]:
  model = lm_model.Transformer(model_config)
  return jax.jit(
      lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))['params']))


def init_params(model_config: lm_config.ModelConfig, seed: int) -> Any:
  """Fresh parameters (unboxed) on the default device; the same for the same seed."""
  return _init_fn(model_config)(jax.random.fold_in(jax.random.key(seed), 0))


@functools.lru_cache(maxsize=8)
def _init_adapters_fn(model_config: lm_config.ModelConfig) -> Callable[[jax.Array], Any]:
  init = _init_fn(model_config)
  return jax.jit(lambda key: optim.select(init(key), lora_lib.is_adapter))


def init_adapters(model_config: lm_config.ModelConfig, seed: int) -> Any:
  """init_params' LoRA adapters alone (jit drops the rest of the initialisation)."""
  return _init_adapters_fn(model_config)(jax.random.fold_in(jax.random.key(seed), 0))


def saved_params(config: lm_config.Config, params: Any) -> Any:
  """What a checkpoint holds: every parameter; with LoRA only those that train (the base
  stays where train.init_from points, BASE_KEY in the checkpoint's meta)."""
  if not config.model.lora.rank:
    return params
  return optim.select(params, optim.trains_fn(config, optim.param_paths(params)))


@functools.lru_cache(maxsize=16)
def _static_fields(config: lm_config.Config) -> tuple[Callable[..., Any],
                                                     optax.GradientTransformation,
                                                     optax.Schedule]:
  """apply_fn, tx and lr, one object each per config so that compiled steps are reused."""
  lr = optim.schedule(config)
  tx = optim.make_optimizer(config, abstract_params(config.model), lr)
  return lm_model.Transformer(config.model).apply, tx, lr


def create_state(config: lm_config.Config, params: Any | None = None,
                 axis_name: str | None = None) -> TrainState:
  """A step-0 state (host arrays are fine): fresh or given params, fresh optimizer state."""
  apply_fn, tx, lr = _static_fields(config)
  if params is None:
    params = init_params(config.model, config.seed)
  elif config.model.lora.rank and not any(map(lora_lib.is_adapter, optim.param_paths(params))):
    params = ckpt_lib.overlay(init_adapters(config.model, config.seed), params)  # the base's
  frozen = None
  if config.train.trainable or config.model.lora.rank:
    frozen = tuple(not t for t in jax.tree.leaves(optim.trainable_mask(config, params)))
  # DPO's reference: LoRA switches its adapters off; otherwise a copy of the starting params
  # (a separate buffer: params are donated and updated, the reference never).
  reference, ref_params = 'adapters_off' if dpo.has_adapters(params) else 'copy', None
  if config.data.format == 'preference' and reference == 'copy':
    ref_params = jax.tree.map(jnp.array, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
      apply_fn=apply_fn,
      tx=tx,
      lr=lr,
      options=step_options(config, axis_name, frozen, reference),
      ref_params=ref_params)


def finetune_config(config: lm_config.Config, directory: str,
                    workdir: str) -> lm_config.Config:
  """For train.init_from=DIR: DIR's model, and its tokenizer copied into this run's workdir.

  A fine-tuning config (SFT, DPO) then need not repeat the architecture, and its data is
  tokenized into the ids the model learned. Of the given model section only how to run and
  train it is used (lm.hf's RUNTIME_KEYS and TRAINING_KEYS, but the checkpoint's scan_layers,
  which decides its parameter layout) and LoRA's settings. A checkpoint folder without a
  config.json keeps the given model, whose shapes the restore then checks.
  """
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)

  if not os.path.isfile(os.path.join(directory, ckpt_lib.CONFIG_FILE)):
    return config
  saved = ckpt_lib.load_config(directory)
  data = dataclasses.replace(config.data, tokenizer=saved.data.tokenizer)
  config = dataclasses.replace(config, model=finetune_model(saved.model, config.model), data=data)
  lm_config.validate(config)
  source = os.path.join(directory, lm_data.pipeline.TOKENIZER_DIR)
  target = os.path.join(workdir, lm_data.pipeline.TOKENIZER_DIR)
  if os.path.isdir(source) and not os.path.isdir(target):
    lm_data.load_tokenizer(source).save(target)
  return config


def finetune_model(saved: lm_config.ModelConfig,
                   given: lm_config.ModelConfig) -> lm_config.ModelConfig:
  """The model a fine-tuning config trains: `saved`, with how to run and train it from `given`.

  Keys that change no parameter (lm.config.INFERENCE_KEYS: RoPE scaling, context length,
  window, ...) also come from `given`, with a warning where they differ: fine-tuning at a
  longer context is how a model's context is extended.
  """
  from lm import hf  # pylint: disable=g-import-not-at-top (only its key lists)

  keys = dict.fromkeys(hf.RUNTIME_KEYS + hf.TRAINING_KEYS + lm_config.INFERENCE_KEYS + ('lora',))
  keys.pop('scan_layers')
  if saved.pos_emb == 'learned':  # a learned table's length is a parameter shape
    keys.pop('max_seq_len')
  for key in lm_config.INFERENCE_KEYS:
    if key in keys and getattr(given, key) != getattr(saved, key):
      logging.warning('Fine-tuning with model.%s=%r (the checkpoint was trained with %r).', key,
                      getattr(given, key), getattr(saved, key))
  return dataclasses.replace(saved, **{k: getattr(given, k) for k in keys})


parse_init_from = ckpt_lib.parse_init_from


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Timer:
  """Wall time per step over a log interval, excluding evaluation and checkpoint time."""

  start: float = 0.0
  steps: int = 0
  excluded: float = 0.0

  def reset(self) -> None:
    self.start, self.steps, self.excluded = time.perf_counter(), 0, 0.0

  def seconds_per_step(self) -> float | None:
    if not self.steps:
      return None
    return (time.perf_counter() - self.start - self.excluded) / self.steps


class _Silent:
  """Stands in for the progress bar and the metrics writer on processes other than 0."""

  def __getattr__(self, name: str) -> Callable[..., None]:
    return lambda *args, **kwargs: None


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between calls (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def agreed(self) -> bool:
    """Whether any process got SIGTERM; every process must call this at the same step, so
    that all of them save (a collective write) and stop together."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_fn: Callable, state: TrainState, data: Any, config: lm_config.Config,
             strategy: parallel.Strategy, max_batches: int = 0) -> dict[str, float]:
  """Validation loss over the split (or its first max_batches batches), token-weighted (DPO:
  the mean over pairs, with reward accuracy and margin)."""
  totals: dict[str, float] = {}
  index, count = strategy.host_share(config.eval.batch_size)
  batches = data.eval_batches(config.eval.batch_size, process_index=index, process_count=count)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    sums = strategy.first(eval_fn(state, strategy.shard(batch)))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  weight_sum = totals.pop('weight_sum', 0.0)
  loss = totals.pop('loss_sum', 0.0) / max(weight_sum, 1e-9)
  result = {'eval/loss': loss, 'eval/tokens': weight_sum}
  result.update({f'eval/{k[:-len("_sum")]}': v / max(weight_sum, 1e-9)
                 for k, v in totals.items()})
  if getattr(data, 'bytes_per_token', 0):
    result['eval/bits_per_byte'] = loss / math.log(2) / data.bytes_per_token
  return result


def _stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _is_multiple(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _banner(config: lm_config.Config, start: int, devices: int, resumed: bool,
            params: int) -> str:
  return (f'{"Resuming" if resumed else "Training"} at step {start}/{config.train.steps} on '
          f'{devices} device(s), global batch {config.train.batch_size} x '
          f'{config.data.seq_len} tokens, {params:,} parameters.')


@dataclasses.dataclass(frozen=True)
class _Due:
  """What happens after the call that ends at a step."""

  log: bool
  eval: bool
  save: bool


def _due(config: lm_config.Config, step: int) -> _Due:
  """Logs, evaluations (also at checkpoints that compete for best-k) and saves due at `step`."""
  last = step == config.train.steps
  save = _is_multiple(step, config.checkpoint.every) or last
  return _Due(
      log=_is_multiple(step, config.train.log_every) or last,
      eval=_is_multiple(step, config.eval.every) or last or (
          config.checkpoint.keep_best > 0 and save),
      save=save)


class _Monitor:
  """Reads calls' metrics on the host, times steps, counts skips, and stops a NaN run."""

  def __init__(self, config: lm_config.Config, strategy: parallel.Strategy, bar: Any,
               flops_per_token: float, peak_flops: float, checkpoint_dir: str):
    self._config, self._strategy, self._bar = config, strategy, bar
    pair = 2 if config.data.format == 'preference' else 1  # DPO's batch_size counts pairs
    self._tokens_per_step = pair * config.train.batch_size * config.data.seq_len
    self._flops_per_token, self._peak = flops_per_token, peak_flops
    self._checkpoint_dir = checkpoint_dir
    self.timer = _Timer()
    self.last: dict[str, float] = {}
    self.nan_run = self.skipped = 0

  def throughput(self) -> tuple[float | None, float | None, float | None]:
    """(ms per step, tokens/s, MFU) over the current interval; None before any timed step."""
    seconds = self.timer.seconds_per_step()
    if seconds is None:
      return None, None, None
    tokens_per_sec = self._tokens_per_step / seconds
    return 1e3 * seconds, tokens_per_sec, self._flops_per_token * tokens_per_sec / self._peak

  def read(self, first_step: int, device_metrics: Any) -> None:
    """Host copy of a call's per-step metrics; raises after max_nan_steps skips in a row."""
    host = self._strategy.first(device_metrics)
    for i, skipped in enumerate(host['skipped']):
      self.nan_run = self.nan_run + 1 if skipped else 0
      if skipped:
        self.skipped += 1
        self._bar.write(f'Step {first_step + i}: non-finite loss or gradient (loss '
                        f'{host["loss"][i]}, gradient norm {host["grad_norm"][i]}); update '
                        f'skipped ({self.nan_run} in a row).')
      if self.nan_run >= self._config.train.max_nan_steps:
        raise NonFiniteLossError(
            f'Stopping at step {first_step + i + 1}: {self.nan_run} consecutive steps had a NaN '
            f'or Inf loss or gradient (train.max_nan_steps={self._config.train.max_nan_steps}). '
            f'The last good checkpoint is in {self._checkpoint_dir}. Lower optim.lr, raise '
            'optim.warmup_steps or set optim.grad_clip, and run again to resume.')
    self.last = {k: float(v[-1]) for k, v in host.items() if k != 'skipped'}
    _, tokens_per_sec, mfu = self.throughput()
    self._bar.update(len(host['loss']), self.last['loss'], tokens_per_sec, mfu)

  def scalars(self, throughput: tuple[float | None, ...]) -> dict[str, Any]:
    """The train/ entries of a metrics.jsonl line."""
    step_time_ms, tokens_per_sec, mfu = throughput
    return {**{f'train/{k}': v for k, v in self.last.items()},
            'train/skipped_steps': self.skipped, 'train/step_time_ms': step_time_ms,
            'train/tokens_per_sec': tokens_per_sec, 'train/mfu': mfu}


def train(config: lm_config.Config, workdir: str, *,
          devices: Sequence[jax.Device] | None = None, data: Any = None,
          progress: bool = True) -> dict[str, float]:
  """Trains (resuming from DIR/checkpoints if any) and returns the last metrics logged.

  Validation runs every eval.every steps on eval.max_batches batches, and on the whole split
  after the last step. SIGTERM saves a checkpoint at the current step and returns early, with
  'preempted': True in the result (callers that go on after training must not).

  Args:
    config: the validated config; model.vocab_size may still be 0 (fitted to the tokenizer).
    workdir: the run directory (created).
    devices: default all local devices.
    data: a prepared lm.data.Data; default lm.data.prepare(config, workdir).
    progress: show a tqdm bar.
  """
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy, train-only)

  if missing := parallel.missing_xla_flags(config.parallel.xla_flags):
    logging.warning('parallel.xla_flags %s are not in this process\'s $XLA_FLAGS, so they '
                    'have no effect: run.py sets them before JAX starts; from Python, set '
                    'XLA_FLAGS before the first JAX computation.', ' '.join(missing))
  parallel.initialize(config.parallel)  # multi-host: before anything touches a device
  chief = jax.process_index() == 0  # the one process that writes logs and metrics
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  hf_path, hf_step = parse_init_from(config.train.init_from)
  if hf_step == 'hf':  # the checkpoint's model and tokenizer, not the config's
    from lm import hf  # pylint: disable=g-import-not-at-top (fine-tuning only)
    config = hf.finetune_config(config, hf_path, workdir)
  elif config.train.init_from:  # the same for another lm run
    config = finetune_config(config, hf_path, workdir)
  if data is None:
    data = lm_data.prepare(config, workdir)
  config = dataclasses.replace(
      config, model=lm_config.with_vocab_size(config.model, data.tokenizer.vocab_size))
  model_info = info_lib.model_info(config)
  config = lm_config.with_budget(config, model_info['flops_per_token'])
  strategy = parallel.make(config, devices)
  t, total = config.train, config.train.steps

  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint)
  config = _pin_lora_base(config, checkpointer)
  state, resumed = _initial_state(config, checkpointer, strategy)
  if chief:  # after the resume fits: a mismatched config must not replace the run's config.json
    ckpt_lib.save_config(workdir, config)
  start = int(strategy.first(state.step))
  train_fn = strategy.compile(train_steps, donate_argnums=(0,), state=state)
  eval_fn = strategy.compile(eval_step)

  if chief:
    writer = metrics_lib.Writer(workdir, resume_step=start if resumed else None)
    bar = metrics_lib.Progress(start, total, enabled=progress)
  else:
    writer = bar = _Silent()
  monitor = _Monitor(config, strategy, bar, model_info['flops_per_token'],
                     metrics_lib.peak_flops(strategy.devices, t.peak_flops,
                                            config.model.matmul_precision),
                     ckpt_lib.checkpoint_dir(workdir))
  banner = _banner(config, start, strategy.num_devices, resumed, model_info['params_total'])
  logging.info(banner)
  bar.write(banner)
  if start >= total:
    bar.write(f'Already trained to step {start} (train.steps={total}); nothing to do. Raise '
              '--config.train.steps to train further.')

  batches = data.train_iterator(start, t.batch_size, *strategy.host_share(t.batch_size))
  # A call's metrics are read after the next call is dispatched, so the host never stalls
  # the device, except where a log, evaluation or checkpoint needs them at once.
  pending: tuple[int, Any] | None = None
  step, eval_loss, preempted = start, None, False
  try:
    with _Preemption() as preemption:
      while step < total:
        k = min(t.steps_per_call, total - step)
        host_batch = _stack([next(batches) for _ in range(k)])
        state, device_metrics = train_fn(state, strategy.shard(host_batch, batch_axis=1))
        if pending is not None:
          monitor.read(*pending)
        pending = (step, device_metrics)
        if step == start:  # the first call compiles: time from its end
          monitor.read(*pending)
          pending = None
          monitor.timer.reset()
        else:
          monitor.timer.steps += k
        step += k

        due = _due(config, step)
        if pending is not None and (due.log or due.eval or due.save or preemption.requested):
          monitor.read(*pending)
          pending = None
        paused = time.perf_counter()
        throughput = monitor.throughput()  # before evaluation and saving, which it excludes
        scalars = {}
        if due.eval:
          max_batches = 0 if step == total else config.eval.max_batches
          scalars.update(evaluate(eval_fn, state, data, config, strategy, max_batches))
          eval_loss = scalars['eval/loss']
          bar.write(f'Step {step}: validation loss {eval_loss:.4f}')
        if due.log:
          scalars.update(monitor.scalars(throughput))
        if scalars:
          writer.write(step, scalars)
        preempted = preemption.agreed()
        if due.save or preempted:
          _save(checkpointer, strategy, state, step, config, eval_loss if due.eval else None)
        if preempted:
          checkpointer.wait()
          bar.write(f'SIGTERM: saved a checkpoint at step {step}; exiting. Run the same '
                    'command again to resume.')
          break
        if due.log:
          monitor.timer.reset()
        else:
          monitor.timer.excluded += time.perf_counter() - paused
      if pending is not None:
        monitor.read(*pending)
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
    if hasattr(batches, 'close'):
      batches.close()
  if eval_loss is not None:
    logging.info('Final validation loss: %.4f', eval_loss)
  result = dict(monitor.last, **({'eval/loss': eval_loss} if eval_loss is not None else {}))
  return dict(result, preempted=True) if preempted else result


def _save(checkpointer: ckpt_lib.Checkpointer, strategy: parallel.Strategy,
          state: TrainState, step: int, config: lm_config.Config,
          eval_loss: float | None) -> None:
  """Every process calls this: orbax writes each process's shards (pmap: one host copy)."""
  params, opt_state = strategy.for_checkpoint((saved_params(config, state.params),
                                               state.opt_state))
  rng = strategy.first(state.rng)
  meta = {'rng': [int(x) for x in np.asarray(rng).reshape(-1)], 'data_step': step,
          'config': config.to_dict()}
  if config.model.lora.rank:
    meta[ckpt_lib.BASE_KEY] = config.train.init_from  # pinned by _pin_lora_base
  checkpointer.save(step, params, opt_state, meta, eval_loss)


def _pin_lora_base(config: lm_config.Config,
                   checkpointer: ckpt_lib.Checkpointer) -> lm_config.Config:
  """LoRA: train.init_from made the exact base the adapters belong to (saved with each step).

  A new run pins 'DIR' or 'DIR:best' to '/abs/DIR:STEP'; a resumed run keeps its checkpoints'
  base, whatever the base run's latest step has become since.
  """
  if not config.model.lora.rank:
    return config
  latest = checkpointer.latest_step()
  if latest is None:
    if not config.train.init_from:
      raise ValueError(
          f'model.lora.rank={config.model.lora.rank} trains adapters on a base model, but '
          'train.init_from is empty: LoRA on random weights would adapt noise, and its '
          'checkpoints would name no base to restore. Set --config.train.init_from=DIR[:step] '
          '(an lm run) or hf:PATH (a Hugging Face checkpoint).')
    base = ckpt_lib.pin_init_from(config.train.init_from)
  else:
    base = checkpointer.meta(latest).get(ckpt_lib.BASE_KEY)
    if base is None:
      raise ValueError(
          f'model.lora.rank={config.model.lora.rank}, but the checkpoints in '
          f'{ckpt_lib.checkpoint_dir(checkpointer.workdir)} are a run without LoRA. Resume it '
          'without LoRA, or train the adapters in a new workdir with --config.train.init_from='
          f'{checkpointer.workdir}.')
    if base != config.train.init_from:
      logging.info('Resuming on the base the checkpoints were trained on, %s.', base)
  return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=base))


def _initial_state(config: lm_config.Config, checkpointer: ckpt_lib.Checkpointer,
                   strategy: parallel.Strategy | None = None) -> tuple[TrainState, bool]:
  """Resumes from this run's latest checkpoint, else starts (from train.init_from if set).

  The state comes back placed by `strategy` (default: the first local device): replicated
  under pmap; under a mesh created sharded, and restored straight into its shardings, whatever
  mesh or device count saved the checkpoint.
  """
  if strategy is None:
    strategy = parallel.DataParallel(tuple(jax.local_devices()[:1]))
  init = functools.partial(create_state, config, axis_name=strategy.axis_name)
  latest = checkpointer.latest_step()
  if latest is None:
    params = _starting_params(config)
    if config.data.format == 'preference':
      if params is None:
        logging.warning('DPO without train.init_from: the reference model is the random '
                        'initialisation. Set train.init_from to the SFT run to start from.')
      else:
        dpo.check_reference_start(params)
    return strategy.init(init, params), False
  abstract = jax.eval_shape(init)
  target = strategy.target(abstract)
  params, opt_state, meta = checkpointer.restore(latest, saved_params(config, target.params),
                                                 target.opt_state)
  if config.model.lora.rank:  # the checkpoint holds what trains; the rest is its base's
    base, _ = ckpt_lib.restore_params(checkpointer.workdir, latest, config.model)
    params = ckpt_lib.overlay(base, params)
  rng = np.asarray(meta['rng'], np.uint32).reshape(abstract.rng.shape)
  ref_params = None
  if abstract.ref_params is not None:  # DPO's reference is not saved: it is the starting model
    ref_params = _starting_params(config)
    if ref_params is None:
      ref_params = init_params(config.model, config.seed)
  return strategy.put(abstract.replace(step=np.asarray(latest, np.int32), params=params,
                                       opt_state=opt_state, rng=rng, ref_params=ref_params)), True


def _starting_params(config: lm_config.Config) -> Any | None:
  """The parameters of train.init_from as host arrays, or None for a random initialisation.
  With LoRA, the base model's alone: create_state adds the adapters."""
  if not config.train.init_from:
    return None
  params, source = ckpt_lib.load_init_from(config.train.init_from,
                                           lora_lib.without_lora(config.model))
  logging.info('Initialised from %s.', source)
  return params


def main(config: lm_config.Config, workdir: str) -> None:
  """CLI entry: python run.py --mode=train --config=... --workdir=DIR."""
  # orbax logs every save at INFO; keep the console for the progress bar.
  logging.set_verbosity(logging.WARNING)
  try:
    result = train(config, workdir)
  except (NonFiniteLossError, ckpt_lib.CheckpointWriteError) as e:
    raise SystemExit(str(e)) from None
  if 'eval/loss' in result:
    print(f'Final validation loss: {result["eval/loss"]:.4f}')
