"""`--mode=eval`: scores saved checkpoints on the whole validation split.

Which config counts: the run's own DIR/config.json fixes the model (the checkpoint was trained
with it); the config given on the command line supplies the data, eval and sample sections, so
`--config.data.corpus=other.txt` evaluates on other text with the run's tokenizer. A
command-line model section that disagrees with the saved one is an error naming the key, except
for keys that change no parameter and are legitimately varied at inference (`INFERENCE_KEYS`:
RoPE scaling, max_seq_len for non-learned positions, attention window and implementation,
compute dtype, MoE capacity), which are used with a warning; keys that only matter for training
(dropout, init, remat, router loss weights) are ignored.

For each step, DIR/eval/<step>.json holds:

  step, corpus, tokenizer, seq_len       what was scored, and at which context length
  loss, perplexity, bits_per_byte        token-weighted over every validation target
  tokens, windows                        targets scored (weight 1), windows that held them
  seconds                                scoring time of the step (all context lengths)
  loss_stderr                            standard error of the loss over windows
  seq_lens                               {"T": {the same keys}} per eval.seq_lens entry (if any)

`--hf=PATH` evaluates a Hugging Face checkpoint directory instead: model, weights and tokenizer
all come from PATH (lm.hf.run_config), and the result, with step "hf" and checkpoint PATH, goes
to DIR/eval/hf.json; use one workdir per checkpoint.

`eval.task=PATH.jsonl` scores a task instead of the validation split: each {"prompt", "answer"}
line's prompt is rendered by data.chat_template as a user turn that cues the assistant (as SFT
rendered its training examples), answered greedily with the KV cache (eval.task_max_new_tokens
new tokens at most, up to EOS or sample.stop), and the answer counts if it equals the expected
one after stripping surrounding whitespace. DIR/eval/<step>.json then holds

  step, task, chat_template              what was asked, and how it was rendered
  exact_match, correct, examples         the share and number of exact answers
  outputs                                per example: prompt, answer, output, correct
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import model as lm_model
from lm import parallel
from lm import train as train_lib
from lm.data import chat

EVAL_DIR = 'eval'

INFERENCE_KEYS = lm_config.INFERENCE_KEYS
# Model keys that only matter for training (the saved values are kept, silently).
TRAINING_KEYS = ('embed_dropout', 'attn_dropout', 'resid_dropout', 'init_std', 'remat',
                 'router_aux_loss_weight', 'router_z_loss_weight')


# ---------------------------------------------------------------------------------------------
# Which config.


def merge_model(saved: lm_config.ModelConfig,
                given: lm_config.ModelConfig) -> lm_config.ModelConfig:
  """The saved model with the given config's inference-time keys; any other difference fails."""
  changes = {}
  for field in dataclasses.fields(lm_config.ModelConfig):
    key = field.name
    old, new = getattr(saved, key), getattr(given, key)
    if old == new or key in TRAINING_KEYS or (key == 'vocab_size' and new == 0):
      continue
    if key == 'lora' and old.signature == new.signature:  # dropout, or settings of LoRA off
      continue
    if key == 'max_seq_len' and saved.pos_emb == 'learned':
      raise ValueError(
          f'model.max_seq_len: the checkpoint has learned positions for {old} tokens, the config '
          f'asks for {new}; a learned table cannot be resized. Drop the override (or pass the '
          'config the run was trained with).')
    if key in INFERENCE_KEYS:
      changes[key] = new
      continue
    raise ValueError(
        f'model.{key}: the run was trained with {old!r} (its config.json) but the config given '
        f'says {new!r}. Pass the config the run was trained with, or drop the override; only '
        f'{", ".join(INFERENCE_KEYS)} may differ at inference.')
  for key, value in changes.items():
    logging.warning('Using model.%s=%r at inference (trained with %r).', key, value,
                    getattr(saved, key))
  return dataclasses.replace(saved, **changes)


def run_config(workdir: str, config: lm_config.Config | None = None) -> lm_config.Config:
  """The config to evaluate or sample a run with: its saved model, the given data/eval/sample.

  A fine-tuning config (train.init_from set) gives only how to run the model, as in training.
  """
  saved = ckpt_lib.load_config(workdir)
  if config is None:
    return saved
  given = config.model
  if config.train.init_from:  # a fine-tuning config: its run's model came from init_from
    given = train_lib.finetune_model(saved.model, given)
  merged = dataclasses.replace(config, model=merge_model(saved.model, given))
  check_seq_len(merged.model, merged.data.seq_len, 'data.seq_len')
  lm_config.validate(merged)
  return merged


def parse_steps(workdir: str, step: int | str | None) -> list[int]:
  """Concrete steps for N, 'latest' (None), 'best' or 'all' (oldest first)."""
  step = 'latest' if step is None else step
  if step == 'all':
    steps = ckpt_lib.available_steps(workdir)
    return steps or [ckpt_lib.resolve_step(workdir, 'latest')]  # the latter raises
  return [ckpt_lib.resolve_step(workdir, step)]


# ---------------------------------------------------------------------------------------------
# Scoring (pure, compiled once per shape).


def score_batch(model: lm_model.Transformer, params: Any,
                batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-window weighted loss sums and weights, [B] each: the standard error needs windows."""
  logits_BxTxV = model.apply({'params': params}, batch['inputs'],
                             positions_BxT=batch.get('positions'),
                             segment_ids_BxT=batch.get('segment_ids'), deterministic=True)
  row_loss = lambda logits, targets, weights: train_lib.weighted_cross_entropy(
      logits[None], targets[None], weights[None])
  loss_sum_B = jax.vmap(row_loss)(logits_BxTxV, batch['targets'], batch['weights'])
  weight_B = batch['weights'].astype(np.float32).sum(axis=-1)
  return {'loss_sum': loss_sum_B, 'weight': weight_B}


def eval_strategy(config: lm_config.Config,
                  devices: Sequence[jax.Device] | None = None) -> parallel.Strategy:
  """Data parallel over `devices` (default: the local ones), or the run's own mesh.

  A model sharded to train (parallel.strategy=mesh) is scored on the same mesh, each device
  holding its shards only; the checkpoint restores onto it whatever saved it.
  """
  if config.parallel.strategy == 'mesh':
    return parallel.MeshParallel.build(config, tuple(devices or jax.devices()))
  return parallel.DataParallel(tuple(devices or jax.local_devices()))


def compiled_score(model_config: lm_config.ModelConfig,
                   strategy: parallel.Strategy) -> Callable[..., Any]:
  """score_batch compiled for `strategy` (once per evaluation, reused for every step)."""
  return strategy.compile(functools.partial(score_batch, lm_model.Transformer(model_config)))


def summarize(loss_sum_W: np.ndarray, weight_W: np.ndarray,
              bytes_per_token: float) -> dict[str, float]:
  """Token-weighted loss over windows W, and its standard error.

  The loss is a ratio of sums over windows, L = sum(s_w) / sum(n_w); its standard error is
  the usual ratio (delta-method) estimate sqrt(sum n_w^2 (l_w - L)^2 / (W - 1) * W) / sum(n_w),
  which reduces to std / sqrt(W) when all windows hold the same number of tokens.
  """
  keep = weight_W > 0
  loss_sum_W = np.asarray(loss_sum_W, np.float64)[keep]
  weight_W = np.asarray(weight_W, np.float64)[keep]
  tokens = float(weight_W.sum())
  loss = float(loss_sum_W.sum() / max(tokens, 1e-9))
  windows = int(keep.sum())
  stderr = 0.0
  if windows > 1:
    residual_W = loss_sum_W - loss * weight_W  # = n_w (l_w - L)
    stderr = math.sqrt(windows / (windows - 1) * float(np.sum(residual_W ** 2))) / tokens
  return {
      'loss': loss,
      'perplexity': math.exp(min(loss, 700.0)),
      'bits_per_byte': loss / math.log(2) / bytes_per_token if bytes_per_token else None,
      'tokens': int(round(tokens)),
      'windows': windows,
      'loss_stderr': stderr,
  }


def eval_batch_size(batch_size: int, seq_len: int, base_seq_len: int, num_devices: int) -> int:
  """eval.batch_size at data.seq_len; longer contexts keep the tokens per batch (memory) flat.

  Always a multiple of the devices, so every device gets the same number of rows.
  """
  rows = max(1, batch_size * base_seq_len // seq_len)
  return -(-rows // num_devices) * num_devices


def score(params: Any, score_fn: Callable[..., Any], data: Any, batch_size: int,
          seq_len: int, strategy: parallel.Strategy) -> dict[str, float]:
  """Scores the whole validation split at `seq_len` (data-parallel; the padded tail weighs 0)."""
  pending = [score_fn(params, strategy.shard(batch))
             for batch in data.eval_batches(batch_size, seq_len)]  # dispatched asynchronously
  loss_sum_W = np.concatenate([np.asarray(p['loss_sum']).reshape(-1) for p in pending])
  weight_W = np.concatenate([np.asarray(p['weight']).reshape(-1) for p in pending])
  return dict(summarize(loss_sum_W, weight_W, data.bytes_per_token), seq_len=seq_len)


def check_seq_len(model_config: lm_config.ModelConfig, seq_len: int,
                  key: str = 'eval.seq_lens') -> None:
  """Learned positions end with their table: no row exists for position max_seq_len on."""
  if model_config.pos_emb == 'learned' and seq_len > model_config.max_seq_len:
    raise ValueError(
        f'{key}: cannot evaluate at seq_len={seq_len}: the model has learned positions for '
        f'{model_config.max_seq_len} tokens (model.max_seq_len) and no embedding for position '
        f'{model_config.max_seq_len} or later, so it cannot extrapolate. Use {key} <= '
        f'{model_config.max_seq_len}, or compare a model with sinusoidal, rope, alibi, relative '
        'or no positions.')


# ---------------------------------------------------------------------------------------------
# The API.


def evaluate(workdir: str, step: int | str | None = 'latest', *,
             config: lm_config.Config | None = None, data: Any = None,
             devices: Sequence[jax.Device] | None = None, write: bool = True,
             printer: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """Evaluates saved checkpoints of a run; one result per step, oldest first.

  Args:
    workdir: a training run's directory.
    step: N, 'latest', 'best' or 'all'.
    config: supplies data, eval (and inference-time model keys, see the module docstring);
      None: the run's saved config.
    data: a prepared lm.data.Data; default lm.data.prepare(config, workdir), which uses the
      tokenizer saved in the run.
    devices: default all local devices (data parallel), or all devices for a mesh run.
    write: write DIR/eval/<step>.json.
    printer: called with a one-line summary per step (e.g. print).
  """
  workdir = os.path.abspath(workdir)
  steps = parse_steps(workdir, step)
  config = run_config(workdir, config)
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
  if config.eval.task:
    tokenizer = lm_data.load_tokenizer(workdir)
    score_step = lambda params, number: evaluate_task(config, params, tokenizer, number)
  else:
    _check_scorable(config)
    for seq_len in _seq_lens(config):
      check_seq_len(config.model, seq_len)
    if data is None:
      data = lm_data.prepare(config, workdir)
    strategy = eval_strategy(config, devices)
    score_fn = compiled_score(config.model, strategy)
    score_step = lambda params, number: _evaluate_params(params, number, config, data, strategy,
                                                         score_fn)
  results = []
  for number in steps:
    params, number = ckpt_lib.restore_params(workdir, number, config.model)
    results.append(_report(score_step(params, number), workdir if write else None, printer))
  return results


def evaluate_hf(path: str, *, config: lm_config.Config, workdir: str | None = None,
                data: Any = None, devices: Sequence[jax.Device] | None = None,
                printer: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Evaluates a Hugging Face checkpoint directory as it is; the result's step is 'hf'.

  The model, weights and tokenizer all come from `path` (see lm.hf.run_config for the few model
  keys `config` may still set); `config` supplies data and eval. With a `workdir`, the result
  goes to DIR/eval/hf.json (with the checkpoint's path); the workdir's own tokenizer and
  checkpoints are not used.
  """
  from lm import hf  # pylint: disable=g-import-not-at-top (safetensors reading)

  path = os.path.abspath(os.path.expanduser(path))
  config = hf.run_config(config, path)
  if config.eval.task:
    from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
    result = evaluate_task(config, hf.load_params(path, config.model),
                           lm_data.tokenizers.load_hf_tokenizer(path), 'hf')
    return _report(dict(result, checkpoint=path), workdir, printer)
  _check_scorable(config)
  for seq_len in _seq_lens(config):
    check_seq_len(config.model, seq_len)
  if data is None:
    from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
    data = lm_data.prepare(config, tokenizer=lm_data.tokenizers.load_hf_tokenizer(path))
  strategy = eval_strategy(config, devices)
  result = _evaluate_params(hf.load_params(path, config.model), 'hf', config, data, strategy,
                            compiled_score(config.model, strategy))
  return _report(dict(result, checkpoint=path), workdir, printer)


def _evaluate_params(params: Any, step: int | str, config: lm_config.Config, data: Any,
                     strategy: parallel.Strategy,
                     score_fn: Callable[..., Any]) -> dict[str, Any]:
  """The result of one checkpoint: every context length of _seq_lens, timed."""
  params = strategy.put(params)
  started = time.perf_counter()
  seq_lens = _seq_lens(config)
  per_len = {}
  for seq_len in seq_lens:
    batch_size = eval_batch_size(config.eval.batch_size, seq_len, config.data.seq_len,
                                 strategy.num_devices)
    per_len[seq_len] = score(params, score_fn, data, batch_size, seq_len, strategy)
  result = dict(step=step, corpus=config.data.corpus,
                tokenizer=getattr(data.tokenizer, 'name', ''), **per_len[config.data.seq_len])
  if len(seq_lens) > 1:
    result['seq_lens'] = {str(t): per_len[t] for t in sorted(seq_lens)}
  result['seconds'] = time.perf_counter() - started
  return result


def _report(result: dict[str, Any], workdir: str | None,
            printer: Callable[[str], None] | None) -> dict[str, Any]:
  if workdir:
    write_result(workdir, result)
  if printer:
    printer(summary_line(result))
  return result


def _check_scorable(config: lm_config.Config) -> None:
  if config.data.format == 'preference':
    raise ValueError(
        'data.format=preference: --mode=eval scores text or SFT examples, or a task; '
        'preference pairs are scored by training\'s own validation (eval/loss, '
        'eval/reward_accuracy in metrics.jsonl). Set --config.eval.task=TASK.jsonl, or '
        'point data at SFT examples (--config.data.format=sft --config.data.corpus=X.jsonl).')


# ---------------------------------------------------------------------------------------------
# Task evaluation.


def evaluate_task(config: lm_config.Config, params: Any, tokenizer: Any,
                  step: int | str) -> dict[str, Any]:
  """Greedy answers to eval.task's prompts and their exact match (see the module docstring)."""
  from lm import sample  # pylint: disable=g-import-not-at-top (sample imports this module)

  e = config.eval
  started = time.perf_counter()
  template = chat.load_template(config.data.chat_template, tokenizer)
  examples = [(record['prompt'], *chat.task_example(record, where))
              for where, record in chat.read_jsonl(e.task)]
  if not examples:
    raise ValueError(f'eval.task={e.task!r} holds no examples. Write one {{"prompt", "answer"}} '
                     'object per line.')
  prompts = [chat.prompt_ids(tokenizer, template, messages)
             for _, messages, _ in examples]
  model = lm_model.Transformer(config.model)
  texts = []
  for i in range(0, len(prompts), e.batch_size):
    batch = prompts[i:i + e.batch_size]
    new = sample.generate_tokens(model, params, batch, max_new_tokens=e.task_max_new_tokens,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    texts += [sample.Continuation(tokenizer, ids, config.sample.stop).text(tokens)
              for ids, tokens in zip(batch, new)]
  outputs = [dict(prompt=prompt, answer=answer, output=text,
                  correct=exact_match(text, answer))
             for (prompt, _, answer), text in zip(examples, texts)]
  correct = sum(o['correct'] for o in outputs)
  return dict(step=step, task=e.task, chat_template=config.data.chat_template,
              exact_match=correct / len(outputs), correct=correct, examples=len(outputs),
              max_new_tokens=e.task_max_new_tokens, seconds=time.perf_counter() - started,
              outputs=outputs)


def exact_match(output: str, answer: str) -> bool:
  """Equal up to whitespace around them (generation often ends with a newline)."""
  return output.strip() == answer.strip()


def _seq_lens(config: lm_config.Config) -> list[int]:
  """data.seq_len first, then eval.seq_lens (without repeats)."""
  return list(dict.fromkeys([config.data.seq_len, *config.eval.seq_lens]))


def write_result(workdir: str, result: Mapping[str, Any]) -> str:
  directory = os.path.join(workdir, EVAL_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{result["step"]}.json')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
  return path


def summary_line(result: Mapping[str, Any]) -> str:
  if 'exact_match' in result:
    return (f'step {result["step"]}: exact match {result["exact_match"]:.4f} '
            f'({result["correct"]}/{result["examples"]}) on {result["task"]}')
  def one(r: Mapping[str, Any]) -> str:
    bpb = '' if r['bits_per_byte'] is None else f', {r["bits_per_byte"]:.4f} bits/byte'
    return (f'loss {r["loss"]:.4f} ± {r["loss_stderr"]:.4f}, perplexity {r["perplexity"]:.3f}'
            f'{bpb} over {r["tokens"]:,} tokens at seq_len {r["seq_len"]}')
  line = f'step {result["step"]}: {one(result)} ({result["corpus"]})'
  for r in result.get('seq_lens', {}).values():
    line += f'\n  {one(r)}'
  return line


def main(config: lm_config.Config, workdir: str, step: str | None = None,
         hf: str | None = None) -> None:
  """CLI entry: python run.py --mode=eval --config=... --workdir=DIR [--step=N|best|all].

  --hf=PATH evaluates a Hugging Face checkpoint directory instead and writes DIR/eval/hf.json.
  """
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)  # orbax logs every restore
  try:
    if hf and step:
      raise ValueError(f'--step={step} picks a checkpoint of a training run; --hf evaluates the '
                       'Hugging Face checkpoint as it is. Drop --step.')
    if hf:
      evaluate_hf(hf, config=config, workdir=workdir, printer=print)
    else:
      evaluate(workdir, step, config=config, printer=print)
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise SystemExit(str(e)) from None
