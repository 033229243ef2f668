"""`--mode=sample`: text generation with a KV cache.

One prefill pass writes the (left-padded) prompts into a cache pre-allocated for prompt plus
new tokens; a jitted `lax.while_loop` then feeds one token per step. The loop runs in chunks
of steps between which the host streams text and checks stop strings; the random key of step
i is fold_in(seed key, i), so the text does not depend on the chunking. Padding is masked by
segment ids (0 for padding, 1 for text) and every row keeps its own positions, which is how
the model's attention cache masks keys, so batched prompts of different lengths generate what
each would alone. Prompts start after an EOS, the document boundary the model saw in training.

Prompts on the command line: `--prompt=TEXT` (repeatable: batched), or `--prompt=@FILE` for
one prompt per line of FILE (blank lines skipped). No `--prompt` samples from an empty prompt.

MoE with capacity_factor > 0: a decode step routes one token per sequence, which is never
dropped, while a full forward pass may drop tokens (and prompt padding takes capacity); pass
`--config.model.capacity_factor=0` (dropless) for generation that matches a full pass exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import os
import sys
from typing import Any, Callable, Sequence

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import evaluate as eval_lib
from lm import model as lm_model
from lm.data import chat


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is drawn from logits (static: each setting compiles its own loop)."""

  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # keep the k most likely tokens; 0: all
  top_p: float = 1.0  # keep the smallest set of tokens with this much probability; 1: all


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [B] (int32): temperature, then top-k, then top-p (the usual order)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  masked = jnp.finfo(jnp.float32).min
  if 0 < sampling.top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, masked, logits_BxV)
  if sampling.top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
    # The nucleus: tokens whose more likely predecessors hold < top_p (the first always).
    cutoff_Bx1 = jnp.min(jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf), axis=-1,
                         keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, masked, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The decode loop (pure, jitted).


class DecodeState(struct.PyTreeNode):
  """Everything the decode loop carries; `last_B` is sampled but not yet fed to the model."""

  cache: Any
  last_B: jax.Array  # int32
  positions_B: jax.Array  # int32, the position of last_B
  tokens_BxN: jax.Array  # int32, generated so far (pad after EOS and past `step`)
  step: jax.Array  # int32 [], tokens generated
  done_B: jax.Array  # bool, EOS generated
  rng: jax.Array


def _step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(rng, step)


def prefill(model: lm_model.Transformer, sampling: Sampling, eos_id: int, pad_id: int,
            max_new_tokens: int, params: Any, prompts_BxP: jax.Array, lengths_B: jax.Array,
            rng: jax.Array) -> DecodeState:
  """Runs the left-padded prompts through the model into a fresh cache; samples token 0."""
  batch, prompt_len = prompts_BxP.shape
  index_P = jnp.arange(prompt_len, dtype=jnp.int32)
  pad_B = prompt_len - lengths_B
  positions_BxP = jnp.maximum(index_P[None] - pad_B[:, None], 0)
  segment_ids_BxP = (index_P[None] >= pad_B[:, None]).astype(jnp.int32)
  shapes = jax.eval_shape(
      functools.partial(model.init, decode=True), jax.random.key(0),
      jax.ShapeDtypeStruct((batch, cache_length(model.config, prompt_len + max_new_tokens)),
                           jnp.int32))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  logits_BxPxV, variables = model.apply(
      {'params': params, 'cache': cache}, prompts_BxP, positions_BxP, segment_ids_BxP,
      decode=True, mutable=['cache'])
  first_B = sample_logits(logits_BxPxV[:, -1], _step_key(rng, 0), sampling)
  tokens_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  return DecodeState(cache=variables['cache'], last_B=first_B, positions_B=lengths_B,
                     tokens_BxN=tokens_BxN, step=jnp.array(1, jnp.int32),
                     done_B=first_B == eos_id, rng=rng)


def decode_step(model: lm_model.Transformer, sampling: Sampling, eos_id: int, pad_id: int,
                params: Any, state: DecodeState) -> DecodeState:
  """Feeds last_B at its position (one cache slot) and samples the next token."""
  tokens_Bx1 = state.last_B[:, None]
  logits_Bx1xV, variables = model.apply(
      {'params': params, 'cache': state.cache}, tokens_Bx1, state.positions_B[:, None],
      jnp.ones_like(tokens_Bx1), decode=True, mutable=['cache'])
  next_B = sample_logits(logits_Bx1xV[:, 0], _step_key(state.rng, state.step), sampling)
  next_B = jnp.where(state.done_B, pad_id, next_B)
  tokens_BxN = jax.lax.dynamic_update_slice(state.tokens_BxN, next_B[:, None], (0, state.step))
  return state.replace(cache=variables['cache'], last_B=next_B,
                       positions_B=state.positions_B + 1, tokens_BxN=tokens_BxN,
                       step=state.step + 1, done_B=state.done_B | (next_B == eos_id))


def decode_until(model: lm_model.Transformer, sampling: Sampling, eos_id: int, pad_id: int,
                 params: Any, state: DecodeState, until: jax.Array) -> DecodeState:
  """Decode steps while step < until and some row has not reached EOS (lax.while_loop)."""
  step_fn = functools.partial(decode_step, model, sampling, eos_id, pad_id, params)
  return jax.lax.while_loop(
      lambda s: (s.step < until) & ~jnp.all(s.done_B), step_fn, state)


@functools.lru_cache(maxsize=16)
def compiled(model_config: lm_config.ModelConfig, sampling: Sampling, eos_id: int,
             pad_id: int) -> tuple[Callable[..., DecodeState], Callable[..., DecodeState]]:
  """(prefill, decode_until) jitted for one model and sampling; the state is donated."""
  model = lm_model.Transformer(model_config)
  prefill_fn = jax.jit(functools.partial(prefill, model, sampling, eos_id, pad_id),
                       static_argnums=(0,))
  decode_fn = jax.jit(functools.partial(decode_until, model, sampling, eos_id, pad_id),
                      donate_argnums=(1,))
  return prefill_fn, decode_fn


# ---------------------------------------------------------------------------------------------
# Host side.


def cache_length(model_config: lm_config.ModelConfig, tokens: int) -> int:
  """KV-cache slots for `tokens` prompt and new tokens: a sliding-window model's cache rolls
  over its window, so it needs no more than that however long it generates."""
  return min(tokens, model_config.attention_window or tokens)


def context_length(model_config: lm_config.ModelConfig) -> int | None:
  """Prompt plus new tokens a model can take: unbounded (None) with a rolling cache, unless
  learned positions end at max_seq_len."""
  if model_config.attention_window and model_config.pos_emb != 'learned':
    return None
  return model_config.max_seq_len


def fit_prompt(ids: Sequence[int], max_new_tokens: int, context: int | None) -> list[int]:
  """Cuts a prompt from the left so that it and the new tokens fit the model's context."""
  if context is None:
    return list(ids)
  room = context - max_new_tokens
  if room < 1:
    raise ValueError(
        f'sample.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model\'s '
        f'context of {context} tokens (model.max_seq_len). Lower max_new_tokens, or (for '
        'positions other than learned) raise --config.model.max_seq_len.')
  if len(ids) > room:
    logging.warning('A prompt of %d tokens is cut from the left to its last %d, so that it and '
                    '%d new tokens fit the context of %d (model.max_seq_len).', len(ids), room,
                    max_new_tokens, context)
    return list(ids[-room:])
  return list(ids)


def generate_tokens(model: lm_model.Transformer, params: Any, prompts: Sequence[Sequence[int]],
                    *, max_new_tokens: int, eos_id: int, pad_id: int | None = None,
                    sampling: Sampling = Sampling(), seed: int = 0, chunk: int = 0,
                    on_chunk: Callable[[np.ndarray], bool] | None = None) -> list[list[int]]:
  """New token ids per prompt (up to EOS, which is left out); prompts are non-empty id lists.

  Args:
    chunk: decode steps per compiled call between host checks; 0: all at once.
    on_chunk: called with the tokens so far [B, steps] after each chunk; True stops early.
  """
  if max_new_tokens <= 0:
    return [[] for _ in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ValueError('Every prompt needs at least one token (generate() starts each with EOS).')
  pad_id = eos_id if pad_id is None else pad_id
  context = context_length(model.config)
  prompts = [fit_prompt(p, max_new_tokens, context) for p in prompts]
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  prompts_BxP = np.full((len(prompts), lengths_B.max()), pad_id, np.int32)
  for row, ids in zip(prompts_BxP, prompts):
    row[len(row) - len(ids):] = ids
  model_config, params = lm_model.unroll_layers(model.config, jax.device_put(params))
  prefill_fn, decode_fn = compiled(model_config, sampling, eos_id, pad_id)
  state = prefill_fn(max_new_tokens, params, prompts_BxP, lengths_B,
                     jax.random.key(seed))
  chunk = chunk or max_new_tokens
  while int(state.step) < max_new_tokens and not bool(np.all(state.done_B)):
    if on_chunk is not None and on_chunk(np.asarray(state.tokens_BxN[:, :int(state.step)])):
      break
    until = min(int(state.step) + chunk, max_new_tokens)
    state = decode_fn(params, state, jnp.asarray(until, jnp.int32))
  tokens_BxN = np.asarray(state.tokens_BxN[:, :int(state.step)])
  return [_until_eos(row, eos_id) for row in tokens_BxN]


def _until_eos(tokens_N: np.ndarray, eos_id: int) -> list[int]:
  ends = np.flatnonzero(tokens_N == eos_id)
  return tokens_N[:ends[0] if len(ends) else len(tokens_N)].tolist()


class Continuation:
  """Decodes one row's continuation: the text after the prompt, cut at a stop string."""

  def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: str):
    self.tokenizer, self.prompt_ids, self.stop = tokenizer, list(prompt_ids), stop
    self.prefix = tokenizer.decode(self.prompt_ids)
    self.stopped = False

  def text(self, new_ids: Sequence[int]) -> str:
    # Decoded with the prompt: sentencepiece drops a leading space from a lone continuation.
    text = self.tokenizer.decode(self.prompt_ids + list(new_ids))[len(self.prefix):]
    if self.stop and self.stop in text:
      self.stopped = True
      return text[:text.index(self.stop)]
    return text


class _Streamer:
  """Writes text as it grows, holding back what may still change (a stop-string prefix, or an
  unfinished multi-byte character shown as U+FFFD)."""

  def __init__(self, write: Callable[[str], None], stop: str):
    self.write, self.stop, self.shown = write, stop, 0

  def update(self, text: str, final: bool = False) -> None:
    end = len(text)
    if not final:
      end = len(text.rstrip('\ufffd'))
      for k in range(min(len(self.stop) - 1, end), 0, -1):
        if text[:end].endswith(self.stop[:k]):
          end -= k
          break
    if end > self.shown:
      self.write(text[self.shown:end])
      self.shown = end


def prompt_ids(tokenizer: Any, prompt: str, template: chat.Template | None = None) -> list[int]:
  """A prompt's token ids: EOS (a document's start) and the text; with a chat template, the
  text as a user turn and what cues the assistant's answer, as fine-tuning rendered it."""
  if template is None:
    return [tokenizer.eos_id] + tokenizer.encode(prompt)
  return chat.prompt_ids(tokenizer, template, [{'role': 'user', 'content': prompt}])


def generate(model: lm_model.Transformer, params: Any, tokenizer: Any, prompts: Sequence[str],
             *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop: str = '',
             stream: Callable[[str], None] | None = None,
             template: chat.Template | None = None) -> list[str]:
  """Continuations of `prompts` (text after each prompt, without EOS or stop string).

  Args:
    model: a Transformer with a concrete vocab_size.
    params: its parameters (host or device arrays).
    tokenizer: the run's tokenizer (lm.data.load_tokenizer(workdir)).
    prompts: texts; several are decoded as one left-padded batch.
    stream: for a single prompt, called with each new piece of text as it is generated.
    template: a chat template (chat.load_template) to render each prompt as a user turn;
      None continues the raw text.
  """
  if stream is not None and len(prompts) != 1:
    raise ValueError('Streaming needs exactly one prompt; batched prompts return at the end.')
  eos = tokenizer.eos_id
  ids = [fit_prompt(prompt_ids(tokenizer, p, template), max_new_tokens,
                    context_length(model.config)) for p in prompts]
  rows = [Continuation(tokenizer, row[1:] if row[0] == eos else row, stop) for row in ids]
  streamer = _Streamer(stream, stop) if stream is not None else None

  def on_chunk(tokens_BxS: np.ndarray) -> bool:
    finished = True
    for row, tokens_S in zip(rows, tokens_BxS):
      text = row.text(_until_eos(tokens_S, eos))
      if streamer is not None:
        streamer.update(text, final=row.stopped)
      finished &= row.stopped or bool(np.any(tokens_S == eos))
    return finished

  chunk = 1 if stream is not None else (16 if stop else 0)
  sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  new = generate_tokens(model, params, ids, max_new_tokens=max_new_tokens, eos_id=eos,
                        pad_id=tokenizer.pad_id, sampling=sampling, seed=seed, chunk=chunk,
                        on_chunk=on_chunk if (stream is not None or stop) else None)
  texts = [row.text(tokens) for row, tokens in zip(rows, new)]
  if streamer is not None:
    streamer.update(texts[0], final=True)
  return texts


def read_prompts(prompt: Sequence[str] | None) -> list[str]:
  """--prompt values: texts, or @FILE for one prompt per non-blank line; none: one empty."""
  prompts = []
  for value in prompt or ['']:
    if value.startswith('@'):
      path = os.path.expanduser(value[1:])
      if not os.path.isfile(path):
        raise FileNotFoundError(f'--prompt={value}: no such file {path} (@FILE reads one '
                                'prompt per line).')
      with open(path, encoding='utf-8') as f:
        lines = [line.rstrip('\r\n') for line in f]
      prompts += [line for line in lines if line.strip()]
    else:
      prompts.append(value)
  if not prompts:
    raise ValueError(f'--prompt={prompt}: no prompts found (the files are empty).')
  return prompts


def main(config: lm_config.Config, workdir: str, step: str | None = None,
         prompt: Sequence[str] | None = None, hf: str | None = None) -> None:
  """CLI entry: python run.py --mode=sample --config=... --workdir=DIR [--prompt=...].

  --hf=PATH samples from a Hugging Face checkpoint directory (model, weights and tokenizer).
  """
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)  # orbax logs every restore
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
  try:
    if step == 'all':
      raise ValueError('--step=all is for --mode=eval; sample from one step (N, best, or '
                       'leave --step out for the latest).')
    if hf and step:
      raise ValueError(f'--step={step} picks a checkpoint of a training run; --hf samples from '
                       'the Hugging Face checkpoint as it is. Drop --step.')
    prompts = read_prompts(prompt)
    if hf:
      from lm import hf as hf_lib  # pylint: disable=g-import-not-at-top (safetensors reading)
      config = hf_lib.run_config(config, hf)
      params = hf_lib.load_params(hf, config.model)
      tokenizer, source = lm_data.tokenizers.load_hf_tokenizer(hf), hf
    else:
      config = eval_lib.run_config(workdir, config)
      params, number = ckpt_lib.restore_params(workdir, step or 'latest', config.model)
      tokenizer, source = lm_data.load_tokenizer(workdir), f'{workdir} step {number}'
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise SystemExit(str(e)) from None
  print(f'Sampling from {source}.', file=sys.stderr)
  template = None
  if config.data.format != 'text':  # a chat model: prompts are user turns, as in fine-tuning
    try:
      template = chat.load_template(config.data.chat_template, tokenizer)
    except (FileNotFoundError, ImportError, ValueError) as e:
      raise SystemExit(str(e)) from None
    print(f'Prompts are user turns of chat template {config.data.chat_template!r} '
          f'(data.format={config.data.format}); --config.data.format=text continues raw text.',
          file=sys.stderr)
  s = config.sample
  options = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                 top_p=s.top_p, seed=config.seed, stop=s.stop, template=template)
  model = lm_model.Transformer(config.model)
  try:
    if len(prompts) == 1:
      sys.stdout.write(prompts[0])
      sys.stdout.flush()
      write = lambda text: (sys.stdout.write(text), sys.stdout.flush())
      generate(model, params, tokenizer, prompts, stream=write, **options)
      sys.stdout.write('\n')
      return
    texts = generate(model, params, tokenizer, prompts, **options)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  for i, (p, text) in enumerate(zip(prompts, texts)):
    print(f'--- sample {i + 1}/{len(prompts)} ---\n{p}{text}')
