"""Sweeps: one command from "does RoPE beat learned positions here?" to a table with error bars.

A config file may define `get_sweep(arg=None)` next to `get_config`, returning a dict:

  grid:    {'model.pos_emb': ['rope', 'learned'], 'model.num_kv_heads': [1, 6]}  (product)
  runs:    [{'model.ffn': 'mlp'}, {'name': 'moe', 'model.ffn': 'moe', ...}]    (a list instead)
  seeds:   [0, 1, 2]               every point repeated with `seed` set (optional)
  measure: ['decode', 'expert_load'] extra per-run measurements (optional, see MEASURES)

Each run trains in DIR/<name>/, e.g. DIR/pos_emb=rope,num_kv_heads=1,seed=0/, and is then
evaluated on the whole validation split (at every `eval.seq_lens`). DIR/<name>/run.json records
what the run is and, once it finished, `status: done`; a sweep started again with the same
command skips finished runs and resumes the others from their checkpoints. Results are
DIR/results.csv (one row per run), DIR/results.md (variants grouped over seeds, mean ± standard
error) and DIR/plots/*.png; `--mode=report` rebuilds them from the run folders at any time.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import difflib
import functools
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import time
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from lm import config as lm_config
from lm import info as info_lib
from lm import parallel

RUN_FILE = 'run.json'
PLOTS_DIR = 'plots'
_SPEC_KEYS = ('grid', 'runs', 'seeds', 'measure')


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep: its folder name, its variant (the name without the seed), and the
  config overrides (dotted keys, `seed` included when the sweep repeats seeds)."""

  name: str
  variant: str
  overrides: Mapping[str, Any]

  @property
  def seed(self) -> int | None:
    return self.overrides.get('seed')


# ---------------------------------------------------------------------------------------------
# Expansion.


def load_sweep(config_file: str) -> dict[str, Any]:
  """Calls `get_sweep(arg)` of a config file given as FILE[:ARG], as --config takes it."""
  path, *arg = config_file.split(':', 1)
  spec = importlib.util.spec_from_file_location('lm_sweep_config', path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'Sweep config {path} does not exist.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} defines no get_sweep(arg=None); add one returning e.g. '
                     "dict(grid={'model.pos_emb': ['rope', 'learned']}, seeds=[0, 1]).")
  return module.get_sweep(*arg)


def expand(spec: Mapping[str, Any]) -> list[Run]:
  """The runs of a sweep spec, in order: each grid point or list entry, then each seed."""
  _check_spec(spec)
  if 'grid' in spec:
    keys = list(spec['grid'])
    points = [dict(zip(keys, values))
              for values in itertools.product(*(spec['grid'][k] for k in keys))]
  else:
    points = [dict(point) for point in spec['runs']]
  names = [point.pop('name', None) for point in points]
  short = _short_keys([k for point in points for k in point])
  runs = []
  for name, point in zip(names, points):
    variant = name or ','.join(f'{short[k]}={_format(v)}' for k, v in point.items()) or 'base'
    for seed in spec.get('seeds') or [None]:
      overrides = dict(point) if seed is None else dict(point, seed=seed)
      runs.append(Run(variant if seed is None else f'{variant},seed={seed}', variant, overrides))
  duplicates = sorted({r.name for r in runs if [s.name for s in runs].count(r.name) > 1})
  if duplicates:
    raise ValueError(f'get_sweep: several runs are named {", ".join(duplicates)}; give each '
                     "entry of 'runs' a distinct 'name' or distinct overrides.")
  return runs


def _check_spec(spec: Any) -> None:
  if not isinstance(spec, Mapping):
    raise ValueError(f'get_sweep must return a dict with "grid" or "runs", got {spec!r}.')
  for key in spec:
    if key not in _SPEC_KEYS:
      raise ValueError(f'get_sweep: unknown key {key!r}{_suggest(key, _SPEC_KEYS)}; the keys '
                       f'are {", ".join(_SPEC_KEYS)}.')
  if ('grid' in spec) == ('runs' in spec):
    raise ValueError('get_sweep must return exactly one of "grid" (a dict of key -> list of '
                     'values, crossed) or "runs" (a list of override dicts).')
  if 'grid' in spec:
    grid = spec['grid']
    if not isinstance(grid, Mapping) or not grid:
      raise ValueError(f'get_sweep: "grid" must be a non-empty dict of key -> values, got {grid!r}.')
    for key, values in grid.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f'get_sweep: grid[{key!r}] must be a non-empty list of values, got '
                         f'{values!r}.')
  else:
    runs = spec['runs']
    if not isinstance(runs, (list, tuple)) or not runs or not all(
        isinstance(r, Mapping) for r in runs):
      raise ValueError(f'get_sweep: "runs" must be a non-empty list of dicts, got {runs!r}.')
  seeds = spec.get('seeds') or []
  if not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f'get_sweep: "seeds" must be distinct integers, got {seeds!r}.')
  for name in spec.get('measure') or []:
    if name not in MEASURES:
      raise ValueError(f'get_sweep: unknown measure {name!r}{_suggest(name, MEASURES)}; the '
                       f'measures are {", ".join(MEASURES)}.')


def _short_keys(keys: Iterable[str]) -> dict[str, str]:
  """Each dotted key by its last part, unless two keys share it (then the whole key)."""
  keys = list(dict.fromkeys(keys))
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: (part if last.count(part) == 1 else k) for k, part in zip(keys, last)}


def _format(value: Any) -> str:
  """A value as it reads in a folder name: no path separators, commas or spaces."""
  if isinstance(value, float):
    text = f'{value:g}'
  elif isinstance(value, (list, tuple)):
    text = '-'.join(_format(v) for v in value) or 'none'
  else:
    text = str(value)
  for bad in (os.sep, ',', ' ', '='):
    text = text.replace(bad, '_')
  return text or 'none'


def _suggest(key: str, choices: Iterable[str]) -> str:
  """The likeliest intended name: one that starts the typed one (or is started by it), else
  the closest spelling."""
  choices = list(choices)
  close = sorted((c for c in choices if key.startswith(c) or c.startswith(key)),
                 key=lambda c: abs(len(c) - len(key)))[:1]
  close = close or difflib.get_close_matches(key, choices, n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def apply_overrides(config_dict: Any, overrides: Mapping[str, Any]) -> Any:
  """A copy of the ConfigDict with dotted-key overrides; unknown keys and wrong types raise."""
  config_dict = copy.deepcopy(config_dict)
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config_dict
    for part in parents:
      node = node[part] if part in node else None
      if node is None or not hasattr(node, 'keys'):
        break
    if node is None or not hasattr(node, 'keys') or leaf not in node:
      raise ValueError(f'Sweep override {key}={value!r}: no such config key'
                       f'{_suggest(key, _flat_keys(config_dict))}.')
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f'Sweep override {key}={value!r}: {e}') from None
  return config_dict


def _flat_keys(config_dict: Any, prefix: str = '') -> list[str]:
  keys = []
  for key in config_dict.keys():
    value = config_dict[key]
    if hasattr(value, 'keys'):
      keys += _flat_keys(value, f'{prefix}{key}.')
    else:
      keys.append(f'{prefix}{key}')
  return keys


def plan(config_dict: Any, runs: Sequence[Run]) -> list[lm_config.Config]:
  """Every run's validated config, so a bad override fails before the first run trains."""
  configs = []
  for run in runs:
    try:
      configs.append(lm_config.Config.from_config_dict(apply_overrides(config_dict,
                                                                       run.overrides)))
    except ValueError as e:
      raise ValueError(f'run {run.name}: {e}') from None
  return configs


# ---------------------------------------------------------------------------------------------
# Costs and budgets.


@functools.lru_cache(maxsize=64)
def _vocab_resolved(config: lm_config.Config) -> lm_config.Config:
  return info_lib.resolve_vocab(config)


def costs(config: lm_config.Config) -> dict[str, Any]:
  """Parameters, FLOPs per token and the budget-resolved steps and tokens of one run."""
  config = _vocab_resolved(config)
  model = info_lib.model_info(config)
  steps = lm_config.with_budget(config, model['flops_per_token']).train.steps
  tokens = steps * config.train.batch_size * config.data.seq_len
  keys = ('params_total', 'params_non_embedding', 'params_active', 'flops_per_token',
          'kv_cache_bytes_per_token')
  return {**{k: model[k] for k in keys}, 'steps': steps, 'train_tokens': tokens,
          'train_flops': model['flops_per_token'] * tokens}


def dry_run_table(runs: Sequence[Run], configs: Sequence[lm_config.Config]) -> str:
  header = ('run', 'params', 'non-emb params', 'active params', 'FLOPs/token', 'steps', 'tokens',
            'train FLOPs')
  rows = []
  for run, config in zip(runs, configs):
    c = costs(config)
    rows.append((run.name, f'{c["params_total"]:,}', f'{c["params_non_embedding"]:,}',
                 f'{c["params_active"]:,}', f'{c["flops_per_token"]:.3g}', str(c['steps']), f'{c["train_tokens"]:,}',
                 f'{c["train_flops"]:.3g}'))
  widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
  line = lambda row: '  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
  return '\n'.join([line(header), line(['-' * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# Extra measurements (get_sweep's `measure`), taken from the finished run's latest checkpoint.


def _restore(run_dir: str) -> tuple[lm_config.Config, Any, Any]:
  from lm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top (heavy)
  from lm import model as lm_model  # pylint: disable=g-import-not-at-top
  config = ckpt_lib.load_config(run_dir)
  params, _ = ckpt_lib.restore_params(run_dir, 'latest', config.model)
  return config, lm_model.Transformer(config.model), params


def measure_decode(run_dir: str, new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
  """Greedy KV-cache decoding speed of one sequence (tokens/s, the best of a few calls)."""
  from lm import sample as sample_lib  # pylint: disable=g-import-not-at-top (heavy)
  config, model, params = _restore(run_dir)
  new_tokens = min(new_tokens, config.model.max_seq_len - 8)
  prompt = [[1] * 8]
  generate = functools.partial(sample_lib.generate_tokens, model, params, prompt,
                               max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
  generate()  # compiles
  seconds = []
  for _ in range(repeats):
    started = time.perf_counter()
    generate()
    seconds.append(time.perf_counter() - started)
  return {'decode_tokens_per_sec': new_tokens / min(seconds)}


def measure_expert_load(run_dir: str, max_batches: int = 8) -> dict[str, Any]:
  """How evenly the router spreads validation tokens: the busiest expert's share x experts
  (1 = perfectly even), averaged over layers, and each layer's shares."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
  from lm import model as lm_model  # pylint: disable=g-import-not-at-top
  config, model, params = _restore(run_dir)
  if config.model.ffn != 'moe':
    return {}
  data = lm_data.prepare(config, run_dir)

  @jax.jit
  def load(params, inputs_BxT):
    _, state = model.apply({'params': params}, inputs_BxT, mutable=['losses', 'intermediates'])
    return lm_model.expert_load(state), lm_model.dropped_tokens(state)

  loads, dropped = [], 0
  for batch in itertools.islice(data.eval_batches(config.eval.batch_size), max_batches):
    load_LxE, drops = load(params, batch['inputs'])
    loads.append(np.asarray(load_LxE))
    dropped += int(drops)
  load_LxE = np.mean(loads, axis=0)
  experts = load_LxE.shape[-1]
  return {'expert_load_max': float(np.mean(load_LxE.max(axis=-1) * experts)),
          'expert_dropped': dropped, 'expert_load_per_layer': load_LxE.round(4).tolist()}


MEASURES: dict[str, Callable[[str], dict[str, Any]]] = {
    'decode': measure_decode,
    'expert_load': measure_expert_load,
}


# ---------------------------------------------------------------------------------------------
# Running.


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError:
    return None  # a record cut short by a kill: the run is simply not finished


def _write_json(path: str, record: Mapping[str, Any]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def _first_difference(a: Any, b: Any, prefix: str = '') -> str | None:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f'{prefix}{key}.')
      if found:
        return found
    return None
  return None if a == b else f'{prefix[:-1]}: {a!r} then, {b!r} now'


def run_status(run_dir: str, run: Run, config: lm_config.Config) -> str:
  """'new', 'done' or 'resume'; a folder that holds a different run is an error, never reused."""
  record = _read_json(os.path.join(run_dir, RUN_FILE))
  if record is None:
    if os.path.exists(os.path.join(run_dir, 'checkpoints')):
      raise ValueError(f'{run_dir} holds a run without {RUN_FILE}; it was not started by this '
                       'sweep. Move it away or use another --workdir.')
    return 'new'
  now = json.loads(json.dumps(config.to_dict()))
  saved = record.get('config')
  changed = _first_difference(
      lm_config.with_added_keys(saved) if isinstance(saved, dict) else saved, now)
  if changed:
    raise ValueError(f'{run_dir} was started with another config ({changed}). Use a new '
                     '--workdir for the changed sweep, or delete that run folder to redo it.')
  return 'done' if record.get('status') == 'done' else 'resume'


def execute(run: Run, config: lm_config.Config, run_dir: str, measure: Sequence[str] = (),
            progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) one run, evaluates its last checkpoint, measures, records it done."""
  from lm import evaluate as eval_lib  # pylint: disable=g-import-not-at-top (heavy)
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, RUN_FILE)
  record = {'name': run.name, 'variant': run.variant, 'overrides': dict(run.overrides),
            'status': 'running', 'config': config.to_dict()}
  _write_json(path, record)
  started = time.perf_counter()
  try:
    if train_lib.train(config, run_dir, progress=progress).get('preempted'):
      # Not a failure and not done: the run stays 'running', and so resumes next time. The
      # sweep stops too (SystemExit passes the runner's per-run error handling).
      raise SystemExit(f'{run.name}: stopped by SIGTERM with a checkpoint saved. Run the same '
                       'command again to resume the sweep.')
    (evaluation,) = eval_lib.evaluate(run_dir, 'latest', write=True)
    measurements = {}
    for name in measure:
      measurements.update(MEASURES[name](run_dir))
  except Exception as e:  # recorded so the report says why; the sweep goes on with the rest
    _write_json(path, dict(record, status='failed', error=f'{type(e).__name__}: {e}'))
    raise
  record.update(status='done', step=evaluation['step'], wall_seconds=time.perf_counter() - started,
                measurements=measurements)
  _write_json(path, record)
  return record


def _execute_in_child(run: Run, config: lm_config.Config, run_dir: str,
                      measure: Sequence[str]) -> str:
  logging.set_verbosity(logging.WARNING)
  parallel.use_xla_flags(config.parallel.xla_flags)  # a fresh process: JAX has not started
  try:
    execute(run, config, run_dir, measure, progress=False)
  except Exception:  # pylint: disable=broad-except
    return traceback.format_exc(limit=3)
  return ''


def run_all(runs: Sequence[Run], configs: Sequence[lm_config.Config], workdir: str,
            measure: Sequence[str] = (), workers: int = 1,
            printer: Callable[[str], None] = print) -> dict[str, str]:
  """Runs what is not done yet; returns {run name: error} for the runs that failed."""
  todo = []
  for run, config in zip(runs, configs):
    run_dir = os.path.join(workdir, run.name)
    status = run_status(run_dir, run, config)
    if status == 'done':
      printer(f'{run.name}: done already, skipped.')
    else:
      todo.append((run, config, run_dir, status))
  failures = {}
  if workers <= 1:
    for i, (run, config, run_dir, status) in enumerate(todo):
      printer(f'[{i + 1}/{len(todo)}] {run.name}' + (' (resuming)' if status == 'resume' else ''))
      try:
        record = execute(run, config, run_dir, measure)
        printer(f'{run.name}: done in {record["wall_seconds"]:.0f} s.')
      except Exception as e:  # pylint: disable=broad-except
        failures[run.name] = f'{type(e).__name__}: {e}'
        printer(f'{run.name}: FAILED: {failures[run.name]}')
    return failures
  context = multiprocessing.get_context('spawn')  # fork would copy JAX's threads and state
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = {pool.submit(_execute_in_child, run, config, run_dir, tuple(measure)): run
               for run, config, run_dir, _ in todo}
    for future in concurrent.futures.as_completed(futures):
      run, error = futures[future], future.result()
      if error:
        failures[run.name] = error.strip().splitlines()[-1]
      printer(f'{run.name}: ' + (f'FAILED: {failures[run.name]}' if error else 'done.'))
  return failures


# ---------------------------------------------------------------------------------------------
# Results.


def mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and standard error of the mean (sample std / sqrt(n)); no error for one value."""
  values = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
  if not len(values):
    return math.nan, None
  if len(values) == 1:
    return float(values[0]), None
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def _eval_result(run_dir: str, step: int | None) -> dict[str, Any]:
  return _read_json(os.path.join(run_dir, 'eval', f'{step}.json')) or {}


def _eval_curve(run_dir: str) -> list[tuple[int, float]]:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [(r['step'], r['eval/loss']) for r in records if r.get('eval/loss') is not None]


def _tokens_per_sec(run_dir: str) -> float | None:
  with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    speeds = [json.loads(line).get('train/tokens_per_sec') for line in f if line.strip()]
  speeds = [s for s in speeds if s]
  return float(np.median(speeds)) if speeds else None


def collect(workdir: str, runs: Sequence[Run] | None = None) -> list[dict[str, Any]]:
  """One row per run folder (and per expected run not started yet, as 'pending')."""
  found = {}
  for entry in sorted(os.listdir(workdir)):
    record = _read_json(os.path.join(workdir, entry, RUN_FILE))
    if record is not None:
      found[entry] = record
  names = [r.name for r in runs] if runs else list(found)
  names += [n for n in found if n not in names]
  rows = []
  for name in names:
    record = found.get(name)
    if record is None:
      run = next(r for r in runs if r.name == name)
      rows.append({'run': name, 'variant': run.variant, 'status': 'pending',
                   'overrides': dict(run.overrides)})
      continue
    rows.append(_row(os.path.join(workdir, name), record))
  return rows


def _row(run_dir: str, record: Mapping[str, Any]) -> dict[str, Any]:
  row = {'run': record['name'], 'variant': record['variant'], 'status': record['status'],
         'overrides': record['overrides']}
  if record['status'] != 'done':
    row['error'] = record.get('error', '')
    return row
  config = lm_config.Config.from_saved(_saved_config(run_dir))
  row.update(costs(config))
  curve = _eval_curve(run_dir)
  final = _eval_result(run_dir, record['step'])
  row.update(final_val_loss=final.get('loss'), final_val_loss_stderr=final.get('loss_stderr'),
             best_val_loss=min([loss for _, loss in curve] + [final.get('loss', math.inf)]),
             bits_per_byte=final.get('bits_per_byte'), tokens_per_sec=_tokens_per_sec(run_dir),
             wall_seconds=record.get('wall_seconds'), curve=curve)
  if 'exact_match' in final:  # eval.task
    row['exact_match'] = final['exact_match']
  for seq_len, result in sorted(final.get('seq_lens', {}).items(), key=lambda kv: int(kv[0])):
    row[f'loss@{seq_len}'] = result['loss']
  row.update({k: v for k, v in record.get('measurements', {}).items() if not isinstance(v, list)})
  return row


def _saved_config(run_dir: str) -> dict[str, Any]:
  with open(os.path.join(run_dir, 'config.json'), encoding='utf-8') as f:
    return json.load(f)


_FIRST_COLUMNS = ('run', 'variant', 'seed', 'status')
_METRIC_COLUMNS = ('params_total', 'params_non_embedding', 'params_active', 'flops_per_token',
                   'kv_cache_bytes_per_token', 'steps', 'train_tokens', 'train_flops',
                   'final_val_loss', 'final_val_loss_stderr', 'best_val_loss', 'bits_per_byte',
                   'tokens_per_sec', 'wall_seconds')


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """CSV columns: names, each override key, the standard metrics, then any extra ones."""
  override_keys = list(dict.fromkeys(k for r in rows for k in r.get('overrides', {})
                                     if k != 'seed'))
  extra = list(dict.fromkeys(k for r in rows for k in r if k not in (
      *_FIRST_COLUMNS, *_METRIC_COLUMNS, 'overrides', 'curve', 'error')))
  return [*_FIRST_COLUMNS, *override_keys, *_METRIC_COLUMNS, *extra, 'error']


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  names = columns(rows)
  with open(path + '.tmp', 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, names)
    writer.writeheader()
    for row in rows:
      flat = {**row.get('overrides', {}), **row}
      writer.writerow({k: _cell(flat.get(k)) for k in names})
  os.replace(path + '.tmp', path)


def _cell(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return '-'.join(map(str, value))
  return '' if value is None else value


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Finished runs grouped by variant: for every numeric metric its mean and standard error."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    if row['status'] == 'done':
      groups.setdefault(row['variant'], []).append(row)
  numeric = [c for c in columns(rows) if c not in (*_FIRST_COLUMNS, 'error')]
  out = []
  for variant, group in groups.items():
    summary = {'variant': variant, 'n': len(group), 'overrides': {
        k: v for k, v in group[0]['overrides'].items() if k != 'seed'}}
    for key in numeric:
      values = [r.get(key) for r in group]
      if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        summary[key] = mean_sem(values)
    summary['curve'] = _mean_curve([r['curve'] for r in group])
    out.append(summary)
  return out


def _mean_curve(curves: Sequence[Sequence[tuple[int, float]]]
                ) -> list[tuple[int, float, float | None]]:
  """(step, mean, sem) at the steps every seed evaluated."""
  by_step = [dict(c) for c in curves]
  steps = sorted(set.intersection(*(set(c) for c in by_step))) if by_step else []
  return [(s, *mean_sem([c[s] for c in by_step])) for s in steps]


def _pm(value: tuple[float, float | None] | None, digits: int) -> str:
  """'mean ± sem' with `digits` decimals (3 significant digits for very large numbers)."""
  if value is None or math.isnan(value[0]):
    return ''
  mean, sem = value
  fmt = (lambda x: f'{x:.3g}') if abs(mean) >= 1e7 else (lambda x: f'{x:,.{digits}f}')
  return fmt(mean) if sem is None else f'{fmt(mean)} ± {fmt(sem)}'


# (column, header, decimals) of the grouped table; columns no variant has are left out.
# Sizes and costs are the same for every seed, so they get no error bar.
_TABLE = (('params_non_embedding', 'non-emb params', 0), ('params_active', 'active params', 0),
          ('train_flops', 'train FLOPs', 0),
          ('final_val_loss', 'val loss', 4), ('best_val_loss', 'best val loss', 4),
          ('bits_per_byte', 'bits/byte', 4), ('exact_match', 'task exact match', 3),
          ('tokens_per_sec', 'tokens/s', 0),
          ('kv_cache_bytes_per_token', 'KV-cache bytes/token', 0),
          ('decode_tokens_per_sec', 'decode tokens/s', 0),
          ('expert_load_max', 'busiest expert load (1 = even)', 3),
          ('expert_dropped', 'dropped assignments', 0))
_EXACT = ('params_non_embedding', 'params_active', 'train_flops', 'kv_cache_bytes_per_token')


def markdown(rows: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]],
             plots: Sequence[str]) -> str:
  done = sum(r['status'] == 'done' for r in rows)
  lines = [f'# Sweep results\n\n{done} of {len(rows)} runs done. Values are the mean ± standard '
           'error over seeds (n runs); validation loss is on the whole validation split.\n']
  contexts = [c for c in columns(rows) if c.startswith('loss@')]
  table = [*_TABLE[:6], *((c, f'loss at {c[5:]} tokens', 4) for c in contexts), *_TABLE[6:]]
  table = [t for t in table if any(t[0] in g for g in groups)]
  if all(g.get('params_active') == g.get('params_total') for g in groups):
    table = [t for t in table if t[0] != 'params_active']  # dense models only: the same
  lines.append('| variant | n | ' + ' | '.join(header for _, header, _ in table) + ' |')
  lines.append('|---|---:|' + '---:|' * len(table))
  for g in groups:
    cells = [_pm(g[key][:1] + (None,) if key in _EXACT else g.get(key), digits)
             for key, _, digits in table]
    lines.append(f'| {g["variant"]} | {g["n"]} | ' + ' | '.join(cells) + ' |')
  unfinished = [r for r in rows if r['status'] != 'done']
  if unfinished:
    lines.append('\nNot finished: ' + ', '.join(
        f'{r["run"]} ({r["status"]}{": " + r["error"] if r.get("error") else ""})'
        for r in unfinished))
  lines += ['', *(f'![{os.path.splitext(os.path.basename(p))[0]}]({p})' for p in plots)]
  return '\n'.join(lines) + '\n'


def plot(groups: Sequence[Mapping[str, Any]], directory: str) -> list[str]:
  """PNG plots of the grouped results; returns their paths relative to the sweep folder."""
  import matplotlib  # pylint: disable=g-import-not-at-top (optional at import time)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(directory, name), dpi=120)
    plt.close(fig)
    written.append(f'{PLOTS_DIR}/{name}')

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for g in groups:
    if g['curve']:
      steps, means, sems = zip(*g['curve'])
      means = np.asarray(means)
      sems = np.asarray([s or 0.0 for s in sems])
      (line,) = ax.plot(steps, means, label=g['variant'])
      ax.fill_between(steps, means - sems, means + sems, color=line.get_color(), alpha=0.2)
  ax.set(xlabel='step', ylabel='validation loss', title='Validation loss (mean ± SEM over seeds)')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  save(fig, 'loss_curves.png')

  for key, label, name in (('params_non_embedding', 'non-embedding parameters',
                            'loss_vs_params.png'),
                           ('train_flops', 'training FLOPs', 'loss_vs_flops.png')):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
      if key in g and 'final_val_loss' in g:
        mean, sem = g['final_val_loss']
        ax.errorbar([g[key][0]], [mean], yerr=[sem or 0.0], fmt='o', capsize=3,
                    label=g['variant'])
    ax.set(xscale='log', xlabel=label, ylabel='final validation loss',
           title=f'Final validation loss vs {label}')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which='both')
    save(fig, name)

  context_keys = sorted({k for g in groups for k in g if k.startswith('loss@')},
                        key=lambda k: int(k[5:]))
  if len(context_keys) > 1:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = [int(k[5:]) for k in context_keys]
    for g in groups:
      points = [(t, g[k]) for t, k in zip(lengths, context_keys) if k in g]
      ax.errorbar([t for t, _ in points], [m for _, (m, _) in points],
                  yerr=[s or 0.0 for _, (_, s) in points], marker='o', capsize=3,
                  label=g['variant'])
    ax.set(xlabel='evaluation context length (tokens)', ylabel='validation loss',
           title='Loss vs evaluation context (trained at the first length)')
    ax.set_xscale('log', base=2)
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, 'loss_vs_context.png')
  return written


def report(workdir: str, runs: Sequence[Run] | None = None) -> list[dict[str, Any]]:
  """Writes results.csv, results.md and the plots from the run folders; returns the groups."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir} does not exist; run --mode=sweep with this --workdir '
                            'first.')
  rows = collect(workdir, runs)
  if not rows:
    raise FileNotFoundError(f'{workdir} holds no sweep runs (no */{RUN_FILE}); run '
                            '--mode=sweep with this --workdir first.')
  for row in rows:
    row['seed'] = row['overrides'].get('seed')
  groups = aggregate(rows)
  write_csv(os.path.join(workdir, 'results.csv'), rows)
  plots = plot(groups, os.path.join(workdir, PLOTS_DIR)) if groups else []
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(rows, groups, plots))
  return groups


# ---------------------------------------------------------------------------------------------
# CLI.


def main(config: lm_config.Config, workdir: str, *, config_dict: Any, config_file: str,
         sweep_dry_run: bool = False, sweep_workers: int = 1, report_only: bool = False) -> None:
  """CLI entry for --mode=sweep and --mode=report."""
  del config  # each run builds its own from config_dict and its overrides
  logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  workdir = os.path.abspath(workdir)
  try:
    spec = load_sweep(config_file)
    runs = expand(spec)
    if report_only:
      report(workdir, runs)
      print(f'Wrote {os.path.join(workdir, "results.md")}.')
      return
    configs = plan(config_dict, runs)
    if sweep_dry_run:
      print(f'{len(runs)} runs into {workdir}:\n{dry_run_table(runs, configs)}')
      return
    os.makedirs(workdir, exist_ok=True)
    for run, run_config in zip(runs, configs):  # every folder checked before anything trains
      run_status(os.path.join(workdir, run.name), run, run_config)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(str(e)) from None
  if sweep_workers < 1:
    raise SystemExit(f'--sweep_workers={sweep_workers}: use 1 or more processes.')
  failures = run_all(runs, configs, workdir, spec.get('measure') or (), sweep_workers)
  report(workdir, runs)
  print(f'Results: {os.path.join(workdir, "results.md")}')
  if failures:
    raise SystemExit(f'{len(failures)} of {len(runs)} runs failed: '
                     + '; '.join(f'{name}: {error}' for name, error in failures.items())
                     + '. Fix the cause and run the same command again: finished runs are '
                     'skipped, the others resume.')
