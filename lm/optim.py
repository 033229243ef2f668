"""Optimizers, learning-rate schedules and the parameter masks they use (optax only).

Masks are functions of '/'-joined parameter paths ('layers/attn/query/kernel'), never of
ranks: under nn.scan every leaf gains a leading layer axis, so a norm scale is 2-D too.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from lm import config as lm_config
from lm.model import lora as lora_lib

# Leaf names of token and position tables (nn.Embed); they decay only if decay_embeddings.
EMBEDDING_LEAVES = ('embedding',)
# Leaf names of the matmul weights that decay.
KERNEL_LEAVES = ('kernel',)
# Muon orthogonalises the hidden matrices only; these stay with AdamW (modded-nanogpt).
_MUON_EXCLUDED = ('embed', 'pos_embed', 'lm_head', 'router')
# Logical axes that are stacks of independent matrices, not matrix dimensions.
_STACK_AXES = ('layers', 'expert')
# Muon update RMS matched to AdamW's, so one optim.lr serves both groups (Liu et al., 2025).
MUON_CONSISTENT_RMS = 0.2


def path_str(path: tuple[Any, ...]) -> str:
  """'layers/attn/query/kernel' from a jax tree path or a tuple of names."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return '/'.join(parts)


def map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
  """Maps every leaf of `tree` to fn(its path string); masked (empty) nodes stay as they are."""
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_str(path)), tree)


def param_paths(params: Any) -> list[str]:
  return [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


# ---------------------------------------------------------------------------------------------
# Schedules.


def schedule(config: lm_config.Config) -> optax.Schedule:
  """Learning rate per optimizer step: linear warmup from 0, then cosine/linear/constant/wsd.

  Every schedule ends at lr * min_lr_ratio on the last step except `constant`; `wsd` holds the
  peak until the last decay_fraction of the steps and then decays linearly.
  """
  o, steps = config.optim, config.train.steps
  peak, end = o.lr, o.lr * o.min_lr_ratio
  warmup = o.warmup_steps
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  if o.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  if o.schedule == 'linear':
    decay_start, decay_steps = warmup, steps - warmup
  elif o.schedule == 'wsd':
    decay_steps = round(steps * o.decay_fraction)
    decay_start = max(warmup, steps - decay_steps)
    decay_steps = steps - decay_start
  else:
    raise ValueError(f'optim.schedule: {o.schedule!r} is not one of '
                     f'{", ".join(lm_config.SCHEDULES)}.')
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak, warmup),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, end, max(decay_steps, 1)),
  ], [warmup, decay_start])


# ---------------------------------------------------------------------------------------------
# Masks.


def decays(path: str, decay_embeddings: bool) -> bool:
  """Weight decay on matmul kernels and LoRA matrices (pulled towards the base model), and
  embeddings if asked; never on norms or biases."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf in EMBEDDING_LEAVES:
    return decay_embeddings
  return leaf in KERNEL_LEAVES + lora_lib.LEAVES


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
  return map_paths(lambda p: decays(p, decay_embeddings), params)


def trainable_fn(patterns: tuple[str, ...], paths: list[str]) -> Callable[[str], bool]:
  """A path predicate: trains if any regex finds a match in the path (all if no patterns).

  A pattern that matches no parameter is an error, so a typo cannot silently freeze the model.
  """
  if not patterns:
    return lambda path: True
  compiled = []
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'train.trainable: {pattern!r} is not a valid regex ({e}).') from None
    if not any(regex.search(p) for p in paths):
      raise ValueError(
          f'train.trainable: {pattern!r} matches no parameter. Parameter paths are: '
          f'{", ".join(paths)}.')
    compiled.append(regex)
  return lambda path: any(regex.search(path) for regex in compiled)


def _muon_dims(names: tuple[str | None, ...] | None,
               path: str) -> optax_contrib.MuonDimensionNumbers | None:
  """How Muon sees a hidden kernel as (stacked) matrices, from its logical axis names.

  The 'embed' axis is the matrix input if it comes first (x @ W: query, fc_in) and its output
  otherwise (out, fc_out); 'layers' and 'expert' axes are stacks of independent matrices.
  """
  parts = path.split('/')
  if parts[-1] not in KERNEL_LEAVES or any(p in _MUON_EXCLUDED for p in parts) or not names:
    return None
  matrix_axes = [i for i, n in enumerate(names) if n not in _STACK_AXES]
  embed_axes = [i for i in matrix_axes if names[i] == 'embed']
  if len(matrix_axes) < 2 or len(embed_axes) != 1:
    return None
  if matrix_axes[0] == embed_axes[0]:
    reduction, output = (embed_axes[0],), tuple(matrix_axes[1:])
  else:
    reduction, output = tuple(i for i in matrix_axes if i != embed_axes[0]), (embed_axes[0],)
  return optax_contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def logical_names(boxed_params: Any) -> dict[str, tuple[str | None, ...]]:
  """'path' -> logical axis names, from params still in their nn.Partitioned boxes."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed_params))
  return {'/'.join(path): tuple(leaf.names) for path, leaf in flat.items()
          if isinstance(leaf, nn.Partitioned)}


# ---------------------------------------------------------------------------------------------
# Skipping a step.
#
# Every optimizer make_optimizer builds takes `apply` (a traced bool) in its update: where it is
# false the update is zero and the state stays as it was. train_step passes whether the step's
# loss and gradient are finite, so a bad batch is skipped inside a compiled multi-step scan.


def _choose(apply: jax.Array | bool, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)


def _zero_unless(apply: jax.Array | bool, updates: Any) -> Any:
  return _choose(apply, updates, jax.tree.map(jnp.zeros_like, updates))


def skippable(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Any optimizer with the skip: its new state and updates are chosen after they are computed."""
  inner = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, *, apply=True, **extra_args):
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    return _zero_unless(apply, new_updates), _choose(apply, new_state, state)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def adamw(learning_rate: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
          mask: Callable[[Any], Any]) -> optax.GradientTransformationExtraArgs:
  """optax.adamw (its state and arithmetic) with the skip built in before the step direction.

  What make_optimizer needs of optax's options: a schedule for the learning rate, a scalar
  weight decay and a mask function; no eps_root, mu_dtype or Nesterov momentum.

  `skippable(optax.adamw(...))` would take the direction from the new moments and choose
  afterwards. XLA:CPU then recomputes the new moments from the old ones inside each parameter's
  update, so the old moments are still live when the new ones are written, and it copies every
  parameter and moment at each step of a multi-step scan. Here the moments are chosen first and
  the direction comes from the chosen ones, which lets XLA update them in place
  (benchmarks/BENCHMARKS.md, session 7).
  """
  reference = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                          mask=mask)

  def update(grads, state, params, *, apply=True, **extra_args):
    del extra_args
    adam, decay_state, lr_state = state
    mu = _choose(apply, optax.tree.update_moment(grads, adam.mu, b1, 1), adam.mu)
    nu = _choose(apply, optax.tree.update_moment_per_elem_norm(grads, adam.nu, b2, 2), adam.nu)
    count = optax.safe_increment(adam.count)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps),
                             optax.tree.bias_correction(mu, b1, count),
                             optax.tree.bias_correction(nu, b2, count))
    if weight_decay:  # optax adds nothing at 0, not even 0 * params
      direction = jax.tree.map(lambda d, p, decays: d + weight_decay * p if decays else d,
                               direction, params, mask(params))
    step_size = -learning_rate(lr_state.count)
    updates = _zero_unless(apply, jax.tree.map(lambda d: jnp.asarray(step_size, d.dtype) * d,
                                               direction))
    adam = adam._replace(count=jnp.where(apply, count, adam.count), mu=mu, nu=nu)
    lr_state = lr_state._replace(
        count=jnp.where(apply, optax.safe_increment(lr_state.count), lr_state.count))
    return updates, (adam, decay_state, lr_state)

  return optax.GradientTransformationExtraArgs(reference.init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm, scaling by one factor: g * (max_norm / norm) when norm > max_norm.

  optax divides every element by the norm instead. XLA:CPU will not repeat a division in each
  consumer, so it writes the clipped gradients out and reads them back; a multiplication it
  fuses into the optimizer's update.
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------
# Optimizers.

# What train_step needs to know of each optimizer's update for XLA to update in place: whether it
# is cheap elementwise work, computed again rather than kept (not Muon's Newton-Schulz matmuls),
# and whether its step direction reads the old state (skippable's Lion and Adafactor; AdamW's
# reads the new moments; Muon's too, but ordering its state write was no faster).
ELEMENTWISE_UPDATE = ('adamw', 'adafactor', 'lion')
STATE_READ_BY_UPDATE = ('adafactor', 'lion')


def make_optimizer(config: lm_config.Config, boxed_params: Any,
                   lr_schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """The configured optimizer, with clipping, over the trainable parameters only.

  Its update takes `apply` (see skippable): false skips the step.

  `boxed_params` (e.g. from jax.eval_shape of model.init) supplies paths and logical names.
  Frozen parameters (train.trainable) get optax.set_to_zero and hold no optimizer state.
  """
  o = config.optim
  lr = lr_schedule or schedule(config)
  names = logical_names(boxed_params)
  params = nn.meta.unbox(boxed_params)
  wd_mask = lambda tree: decay_mask(tree, o.decay_embeddings)
  if o.name == 'adamw':
    tx = adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=wd_mask)
  elif o.name == 'lion':
    tx = skippable(optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=wd_mask))
  elif o.name == 'adafactor':
    # Absolute step sizes (no parameter scaling), so optim.lr means what it means for AdamW.
    tx = skippable(optax.adafactor(lr, multiply_by_parameter_scale=False,
                                   weight_decay_rate=o.weight_decay or None,
                                   weight_decay_mask=wd_mask))
  elif o.name == 'muon':
    dims = lambda tree: map_paths(lambda p: _muon_dims(names.get(p), p), tree)
    if not any(d is not None for d in jax.tree.leaves(
        dims(params), is_leaf=lambda x: x is None or isinstance(
            x, optax_contrib.MuonDimensionNumbers))):
      raise ValueError('optim.name=muon: the model has no hidden matrices for Muon.')
    # Muon decays its matrices; the AdamW group (embeddings, head, norms) does not decay.
    tx = skippable(optax_contrib.muon(
        lr, eps=o.eps, weight_decay=o.weight_decay, adam_b1=o.b1, adam_b2=o.b2,
        adam_weight_decay=0.0, muon_weight_dimension_numbers=dims,
        consistent_rms=MUON_CONSISTENT_RMS))
  else:
    raise ValueError(f'optim.name: {o.name!r} is not one of {", ".join(lm_config.OPTIMIZERS)}.')
  if o.grad_clip > 0:
    tx = optax.chain(clip_by_global_norm(o.grad_clip), tx)
  trains = trains_fn(config, param_paths(params))
  if trains is None:
    return tx
  labels = lambda tree: map_paths(lambda p: 'train' if trains(p) else 'freeze', tree)
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def trains_fn(config: lm_config.Config, paths: list[str]) -> Callable[[str], bool] | None:
  """Which parameters train: with LoRA (model.lora.rank > 0) the adapters, plus whatever
  train.trainable matches; else train.trainable's matches. None: every parameter trains."""
  patterns = config.train.trainable
  if not config.model.lora.rank:
    return trainable_fn(patterns, paths) if patterns else None
  if not patterns:
    return lora_lib.is_adapter
  also = trainable_fn(patterns, paths)
  return lambda path: lora_lib.is_adapter(path) or also(path)


def trainable_mask(config: lm_config.Config, params: Any) -> Any:
  """Tree of bools: which parameters train."""
  trains = trains_fn(config, param_paths(params)) or (lambda path: True)
  return map_paths(trains, params)


def select(params: Any, keep: Callable[[str], bool]) -> dict[str, Any]:
  """The sub-tree of the leaves whose path `keep` accepts (a nested dict; empty nodes go)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return flax.traverse_util.unflatten_dict(
      {path: leaf for path, leaf in flat.items() if keep(path)}, sep='/')


def describe(params: Any, fn: Callable[[str], Any]) -> Mapping[str, Any]:
  """{path: fn(path)} for every parameter: what tests and logs print."""
  return {p: fn(p) for p in param_paths(params)}
