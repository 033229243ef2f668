"""Checkpoints with orbax: asynchronous atomic saves, latest-k plus best-k retention, restore.

Layout of DIR/checkpoints/<step>/ (one orbax step directory, renamed into place only when
complete, so a half-written step is never listed or restored):

  params/     the parameters (orbax StandardSave: global arrays, whatever saved them); a LoRA
              run's hold only those that train (the adapters), see BASE_KEY
  opt_state/  the optimizer state (trainable parameters only)
  meta/       JSON: step, rng (raw key data), data_step, eval_loss, config (resolved), and a
              LoRA run's BASE_KEY
  metrics/    JSON {'eval_loss': x} when a validation loss was known (ranks the best)

Under parallel.strategy=mesh the arrays are saved sharded, every process writing its own shards
(orbax coordinates the processes and renames the step into place once all are done). A
checkpoint holds global shapes only, so it restores on any device count or mesh: pass
ShapeDtypeStructs with the target shardings (lm.parallel's `target`) and orbax reads each device's
slice straight into place.

Other modes restore through `restore_params(workdir, step)`, `available_steps(workdir)`,
`best_step(workdir)` and `load_config(workdir)`; `restore_params` lays a LoRA run's adapters
over their base, so no caller needs to know.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from lm import config as lm_config

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
_ITEMS = ('params', 'opt_state', 'meta')
_METRIC = 'eval_loss'
# meta key of a LoRA run's steps: the base model their adapters were trained on, as an exact
# train.init_from ('/abs/DIR:STEP' or 'hf:/abs/PATH', see pin_init_from).
BASE_KEY = 'lora_base'


class _QuietMissingMetrics(logging.Filter):
  """Steps saved without a validation loss (preemption saves) are expected, not a warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietMissingMetrics())


def _handlers(items: tuple[str, ...] = _ITEMS) -> dict[str, ocp.CheckpointHandler]:
  make = {'params': ocp.StandardCheckpointHandler, 'opt_state': ocp.StandardCheckpointHandler,
          'meta': ocp.JsonCheckpointHandler}
  return {name: make[name]() for name in items}


def _manager(directory: str, keep: int = 1, keep_best: int = 0, async_save: bool = False,
             create: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` and the `keep_best` lowest validation losses.

  The newest steps are never deleted, whatever their loss (LatestN is always part of the
  policy); steps saved without a validation loss compete only as newest.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[_METRIC], reverse=True, n=keep_best,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda metrics: metrics[_METRIC],  # set so that metrics are written
      best_mode='min',
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      create=create,
      cleanup_tmp_directories=create)
  return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only, over quota)."""


class Checkpointer:
  """The training run's checkpoints: save (async), resume, retention."""

  def __init__(self, workdir: str, config: lm_config.CheckpointConfig):
    self.workdir = os.path.abspath(workdir)
    self._manager = _manager(checkpoint_dir(workdir), keep=config.keep, keep_best=config.keep_best,
                             async_save=config.async_save, create=True)
    self._saving: int | None = None  # the step of the save in flight, for error messages

  @contextlib.contextmanager
  def _write_errors(self):
    """orbax's bare OSError (e.g. [Errno 28]) -> one naming the step, the folder and the fix."""
    try:
      yield
    except OSError as e:
      latest = self._manager.latest_step()
      resume = f'it resumes from step {latest}' if latest is not None else 'it starts over'
      raise CheckpointWriteError(
          f'Could not write checkpoint step {self._saving} into {self._manager.directory}: {e}. '
          'The disk is probably full or read-only. Free space there (or point --workdir at '
          f'another disk) and run the same command again: {resume}; the half-written step is '
          'never restored.') from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any],
           eval_loss: float | None = None) -> bool:
    """Starts saving; returns False if `step` is already saved. Every process calls it.

    Trees are host (numpy) copies (pmap) or sharded jax.Arrays (mesh); orbax copies device
    arrays to host before returning, so buffer donation by the steps that follow is safe.
    opt_state None saves weights that nothing resumes from (lm.lora's merged steps).
    """
    if step in self._manager.all_steps():
      return False
    self.wait()  # orbax would wait too; this way a failed earlier save is named as itself
    self._saving = step
    metrics = {_METRIC: float(eval_loss)} if eval_loss is not None and math.isfinite(
        eval_loss) else None
    with self._write_errors():
      _check_writable(str(self._manager.directory))
      items = dict(params=ocp.args.StandardSave(params),
                   meta=ocp.args.JsonSave(dict(meta, step=step, eval_loss=eval_loss)))
      if opt_state is not None:
        items['opt_state'] = ocp.args.StandardSave(opt_state)
      return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=True)

  def meta(self, step: int) -> dict[str, Any]:
    """The meta item of `step` alone (e.g. a LoRA run's BASE_KEY, before restoring)."""
    return _read_meta(self._manager, step)

  def restore(self, step: int, abstract_params: Any,
              abstract_opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(params, opt_state, meta) of `step`, checked against the shapes given.

    Targets with a `sharding` (jax.ShapeDtypeStruct) restore straight into it, on any mesh;
    without one, arrays come back unsharded.
    """
    with _reading(self._manager, step):
      saved = _saved_shapes(self._manager, step)
    check_fit(saved, abstract_params, f'step {step}')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except (orbax wraps tensorstore's in Exception)
      _check_optimizer_fit(self._manager, step, abstract_opt_state)
      raise _damaged(self._manager, step, e) from e
    return restored['params'], restored['opt_state'], dict(restored['meta'])

  def wait(self) -> None:
    """Blocks until every pending save is on disk (and old steps are cleaned up)."""
    with self._write_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      with contextlib.suppress(OSError):  # orbax re-raises a failed save, which wait() named
        self._manager.close()


# ---------------------------------------------------------------------------------------------
# Restore API for the eval, sample and inspect modes.


def available_steps(workdir: str) -> list[int]:
  """Saved steps in DIR/checkpoints, oldest first ([] if none)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(_manager(directory).all_steps())


def eval_losses(workdir: str) -> dict[int, float]:
  """{step: validation loss} for the saved steps that have one."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return {}
  manager = _manager(directory)
  losses = {}
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics and _METRIC in metrics:
      losses[step] = float(metrics[_METRIC])
  return losses


def best_step(workdir: str) -> int | None:
  """The saved step with the lowest validation loss (the newest among ties); None if none."""
  losses = eval_losses(workdir)
  if not losses:
    return None
  return min(losses, key=lambda step: (losses[step], -step))


def resolve_step(workdir: str, step: int | str = 'latest') -> int:
  """A concrete saved step from N, 'latest' or 'best', with errors that list what exists."""
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f'No checkpoints in {checkpoint_dir(workdir)}. Train first (python run.py '
        f'--mode=train --workdir={workdir} ...) or point --workdir at a run that has them.')
  if step == 'latest':
    return steps[-1]
  if step == 'best':
    best = best_step(workdir)
    if best is None:
      raise ValueError(
          f'No checkpoint in {checkpoint_dir(workdir)} has a validation loss, so none is '
          f'"best". Available steps: {_list(steps)}; pass one of them or "latest".')
    return best
  try:
    number = int(step)
  except (TypeError, ValueError):
    raise ValueError(f'Checkpoint step {step!r} is not a number, "latest" or "best". '
                     f'Available steps: {_list(steps)}.') from None
  if number not in steps:
    raise ValueError(f'Step {number} is not saved in {checkpoint_dir(workdir)}. Available '
                     f'steps: {_list(steps)}.')
  return number


def restore_params(workdir: str, step: int | str = 'latest',
                   model_config: lm_config.ModelConfig | None = None) -> tuple[Any, int]:
  """(params, step): the parameters of a saved step as a nested dict of host arrays.

  A LoRA run's step holds only its adapters: they come back laid over the base model they were
  trained on (meta's BASE_KEY), the whole adapted model; folded into the base
  (lm.model.lora.merge) if `model_config` has LoRA off.

  Args:
    workdir: a training run's directory.
    step: N, 'latest' or 'best' (lowest validation loss).
    model_config: if given (vocab_size resolved), the checkpoint must fit this model: a
      missing, extra or differently shaped parameter is a ValueError naming it and both
      shapes; arrays are cast to model_config.param_dtype.
  """
  number = resolve_step(workdir, step)
  manager = _manager(checkpoint_dir(workdir))
  source = f'{workdir} step {number}'
  with _reading(manager, number):
    meta = _read_meta(manager, number)
    metadata = manager.item_metadata(number)['params']
  saved_tree = dict(getattr(metadata, 'tree', metadata))
  adapters_only = BASE_KEY in meta
  target = None
  if model_config is not None:
    from lm import info  # pylint: disable=g-import-not-at-top (info imports the model)
    target = info.param_shapes(model_config)
    if not adapters_only:
      check_fit(_shapes(saved_tree), target, source)
  tree = saved_tree if target is None or adapters_only else target
  with _reading(manager, number):
    restored = manager.restore(number, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(on_one_device(tree))))
  params = flax.core.unfreeze(jax.tree.map(np.asarray, restored['params']))
  if adapters_only:
    params = _over_base(params, meta, source, model_config)
    if target is not None:
      check_fit(_shapes(params), target, source)
  if target is not None:
    params = jax.tree.map(lambda x, t: x.astype(t.dtype), params, target)
  return params, number


def _over_base(saved: Any, meta: Mapping[str, Any], source: str,
               model_config: lm_config.ModelConfig | None) -> Any:
  """A LoRA step's saved parameters laid over its base; folded in if model_config says so."""
  from lm.model import lora  # pylint: disable=g-import-not-at-top (the model, only for LoRA)
  adapted = lm_config.Config.from_saved(meta['config']).model
  base = meta[BASE_KEY]
  try:
    base_params, _ = load_init_from(base, lora.without_lora(adapted))
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(
        f'Checkpoint {source} holds LoRA adapters only, trained on the base model {base}, '
        f'which cannot be loaded: {e} Put that base checkpoint back where it was (the adapters '
        'fit no other), then merge them into it for good with --mode=merge.') from e
  params = overlay(base_params, saved)
  if model_config is not None and not model_config.lora.rank:
    params = lora.merge(adapted, params)
  return params


def overlay(params: Any, part: Any) -> Any:
  """`params` with every leaf that `part` (a partial tree) has replaced or added."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(part)))
  return flax.traverse_util.unflatten_dict(flat)


def parse_init_from(value: str) -> tuple[str, int | str]:
  """'DIR' -> (DIR, 'latest'); 'DIR:1000' or 'DIR:best' -> (DIR, 1000 | 'best');
  'hf:PATH' (a Hugging Face checkpoint directory) -> (PATH, 'hf')."""
  if value.startswith('hf:'):
    return value[len('hf:'):], 'hf'
  directory, sep, step = value.rpartition(':')
  if sep and (step.isdigit() or step in ('best', 'latest')):
    return directory, int(step) if step.isdigit() else step
  return value, 'latest'


def pin_init_from(value: str) -> str:
  """train.init_from made exact, so that it names the same weights for good: 'DIR' or
  'DIR:best' -> '/abs/DIR:STEP', 'hf:PATH' -> 'hf:/abs/PATH'."""
  directory, step = parse_init_from(value)
  if step == 'hf':
    return 'hf:' + os.path.abspath(os.path.expanduser(directory))
  directory = os.path.abspath(os.path.expanduser(directory))
  return f'{directory}:{resolve_step(directory, step)}'


def load_init_from(value: str, model_config: lm_config.ModelConfig) -> tuple[Any, str]:
  """(params, where from): the weights a train.init_from value names, fitted to the model."""
  directory, step = parse_init_from(value)
  if step == 'hf':
    from lm import hf  # pylint: disable=g-import-not-at-top (safetensors, only for imports)
    return hf.load_params(directory, model_config), f'the Hugging Face checkpoint {directory}'
  params, found = restore_params(directory, step, model_config)
  return params, f'{directory} step {found}'


def on_one_device(tree: Any) -> Any:
  """Restore targets on this process's first device, whatever devices or hosts saved the
  checkpoint (orbax would otherwise reuse the saved shardings, which need that topology)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def load_config(workdir: str) -> lm_config.Config:
  """The resolved config a run saved in DIR/config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a training run '
                            '(python run.py --mode=train writes it).')
  with open(path, encoding='utf-8') as f:
    return lm_config.Config.from_saved(json.load(f))


def save_config(workdir: str, config: lm_config.Config) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=2)
    f.write('\n')


# ---------------------------------------------------------------------------------------------
# Shape checks.


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
  metadata = manager.item_metadata(step)['params']
  return _shapes(dict(getattr(metadata, 'tree', metadata)))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'path' -> shape of every leaf (arrays, ShapeDtypeStructs or orbax metadata)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def check_fit(saved: Mapping[str, tuple[int, ...]], target: Any, source: str) -> None:
  """Raises ValueError naming the first parameter whose presence or shape differs."""
  expected = {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(target), sep='/').items()}
  for path, shape in expected.items():
    if path not in saved:
      raise ValueError(
          f'Checkpoint {source} does not fit the model: parameter {path} {shape} is missing '
          f'from the checkpoint (it has {_list(sorted(saved))}). Check the model config '
          '(e.g. tie_embeddings, pos_emb, ffn, scan_layers) against the run\'s config.json.')
    if saved[path] != shape:
      raise ValueError(
          f'Checkpoint {source} does not fit the model: parameter {path} has shape '
          f'{saved[path]} in the checkpoint but {shape} in the model. Use the model config the '
          'checkpoint was trained with (its config.json).')
  extra = sorted(set(saved) - set(expected))
  if extra:
    raise ValueError(
        f'Checkpoint {source} does not fit the model: parameter {extra[0]} '
        f'{saved[extra[0]]} is in the checkpoint but not in the model. Use the model config '
        'the checkpoint was trained with (its config.json).')


def _check_writable(directory: str) -> None:
  """Writes and removes a small file. A full or read-only disk fails here at once; in orbax's
  asynchronous save the step folder's creation would fail only after its coordination timeout."""
  path = os.path.join(directory, f'.write_check.{jax.process_index()}')
  try:
    with open(path, 'wb') as f:
      f.write(bytes(4096))
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)


def _check_optimizer_fit(manager: ocp.CheckpointManager, step: int,
                         abstract_opt_state: Any) -> None:
  """After a failed restore: a ValueError if the saved optimizer state is another optimizer's."""
  run = os.path.dirname(str(manager.directory))
  with _reading(manager, step):
    items = manager.item_metadata(step)
  if 'opt_state' not in items.keys():
    raise ValueError(
        f'Checkpoint step {step} in {manager.directory} holds weights only, no optimizer state '
        '(a merged LoRA step), so no training resumes from it. Start a new run from these '
        f'weights with --config.train.init_from={run}:{step}.')
  metadata = items['opt_state']
  shapes = lambda tree: {'/'.join(map(str, path)): tuple(leaf.shape)
                         for path, leaf in ocp.tree.to_flat_dict(tree).items()}
  saved, expected = shapes(getattr(metadata, 'tree', metadata)), shapes(abstract_opt_state)
  differing = sorted(set(saved) ^ set(expected)) or sorted(
      path for path in expected if saved[path] != expected[path])
  if differing:
    path = differing[0]
    raise ValueError(
        f'Checkpoint step {step} in {manager.directory} does not fit the optimizer: its state '
        f'{path} is {saved.get(path, "absent")} in the checkpoint but '
        f'{expected.get(path, "absent")} for this config. Resume with the optimizer settings '
        'the run was trained with (optim.*, train.trainable and model.lora in its '
        'config.json), or start a new run from these weights with '
        f'--config.train.init_from={run}:{step}.')


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int):
  """Turns orbax's and tensorstore's errors on a damaged step into `_damaged`'s."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except (orbax wraps tensorstore's in Exception)
    raise _damaged(manager, step, e) from e


def _damaged(manager: ocp.CheckpointManager, step: int, error: Exception) -> ValueError:
  """The error for a step that cannot be read: which folder, and which others to use."""
  others = [s for s in sorted(manager.all_steps()) if s != step]
  fallback = (f'Delete that folder to use the previous checkpoint (saved steps besides: '
              f'{_list(others)}), or pass --step with one of them.' if others else
              'No other checkpoint is saved: delete the folder and train again.')
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return ValueError(f'Checkpoint {os.path.join(str(manager.directory), str(step))} cannot be '
                    f'read: it is damaged or truncated ({first_line}). {fallback}')


def _list(items: list[Any], limit: int = 20) -> str:
  shown = ', '.join(str(x) for x in items[:limit])
  return shown + (f', ... ({len(items)} in all)' if len(items) > limit else '')
