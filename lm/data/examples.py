"""SFT examples and preference pairs from JSONL, batched as pure functions of (seed, step).

data.format=sft: every example (a conversation rendered by data.chat_template, see chat.py)
becomes one token sequence whose response tokens alone carry loss weight. With data.packing,
whole examples are packed into rows (segment ids and restarted positions keep attention inside
each example); without, each example has a row of its own, padded. The rows are fixed once
(packing order from the seed), and epoch e visits them in a permutation drawn from (seed, e),
so the batch of step s needs no replay to find.

data.format=preference: every {"prompt", "chosen", "rejected"} line becomes a pair of padded
sequences, prompt + chosen and prompt + rejected, laid out as [B, 2, T] so that no split of
the batch (devices, hosts, micro-batches: all along B) can part a pair.

An example longer than data.seq_len + 1 tokens is dropped, never cut (a cut response would
teach the model to stop mid-sentence, a cut pair would compare unequal things); how many were
dropped is logged and kept in `stats['too_long']`.

Validation is val.jsonl beside a train.jsonl, else a fixed share (data.val_fraction) of the
examples chosen by a hash of their content, so it does not change with the seed.

Shapes: B batch rows (pairs for preference), T tokens per row, N tokens, S sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import numpy as np

from lm import config as lm_config
from lm.data import batches
from lm.data import chat
from lm.data import tokenizers

_ROW_STREAM = 0x534654  # the random stream of example rows, apart from the text streams
_PACK_STREAM = 0x5041434B53


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Token sequences with a response mask, stored flat: sequence s is [starts[s], +lengths[s])."""

  tokens_N: np.ndarray  # int32
  response_N: np.ndarray  # bool: a response token, whose prediction the loss counts
  starts_S: np.ndarray  # int64
  lengths_S: np.ndarray  # int64

  @classmethod
  def build(cls, encoded: Sequence[tuple[list[int], list[bool]]]) -> Sequences:
    lengths_S = np.array([len(ids) for ids, _ in encoded], np.int64)
    starts_S = np.concatenate([[0], np.cumsum(lengths_S)[:-1]]).astype(np.int64)
    tokens_N = np.array([i for ids, _ in encoded for i in ids], np.int32)
    response_N = np.array([r for _, mask in encoded for r in mask], bool)
    return cls(tokens_N, response_N, starts_S, lengths_S)

  def __len__(self) -> int:
    return len(self.lengths_S)

  def get(self, s: int) -> tuple[np.ndarray, np.ndarray]:
    window = slice(self.starts_S[s], self.starts_S[s] + self.lengths_S[s])
    return self.tokens_N[window], self.response_N[window]


def fill_row(sequences: Sequences, indices: Iterable[int], seq_len: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """One row [T] of whole sequences: inputs, targets, weights (1 on response targets only),
  segment ids (1, 2, ... per sequence, 0 on padding) and positions restarting per sequence."""
  row = {'inputs': np.full(seq_len, pad_id, np.int32),
         'targets': np.full(seq_len, pad_id, np.int32),
         'weights': np.zeros(seq_len, np.float32),
         'segment_ids': np.zeros(seq_len, np.int32),
         'positions': np.zeros(seq_len, np.int32)}
  at = 0
  for segment, s in enumerate(indices, 1):
    tokens, response = sequences.get(s)
    n = len(tokens) - 1
    if at + n > seq_len:
      raise AssertionError(f'sequence {s} of {n + 1} tokens overflows a row of {seq_len}')
    row['inputs'][at:at + n] = tokens[:-1]
    row['targets'][at:at + n] = tokens[1:]
    row['weights'][at:at + n] = response[1:]
    row['segment_ids'][at:at + n] = segment
    row['positions'][at:at + n] = np.arange(n)
    at += n
  return row


def pack(lengths_S: np.ndarray, seq_len: int, order_S: np.ndarray) -> list[np.ndarray]:
  """Rows of sequence indices, filled in `order_S` until the next one would not fit (next-fit).

  A sequence of L tokens takes L - 1 positions (inputs and targets are shifted by one).
  """
  rows, current, used = [], [], 0
  for s in order_S:
    n = int(lengths_S[s]) - 1
    if current and used + n > seq_len:
      rows.append(np.array(current, np.int64))
      current, used = [], 0
    current.append(int(s))
    used += n
  if current:
    rows.append(np.array(current, np.int64))
  return rows


def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  return np.random.default_rng([_ROW_STREAM, seed % (1 << 64), epoch]).permutation(size)


def _run_rows(seed: int, rows_R: np.ndarray, per_epoch: int) -> np.ndarray:
  """Which of `per_epoch` items rows r of the whole run take: epoch r // E, shuffled."""
  epoch_R, index_R = np.divmod(rows_R, per_epoch)
  out_R = np.empty_like(rows_R)
  for epoch in np.unique(epoch_R):
    mine = epoch_R == epoch
    out_R[mine] = _epoch_order(seed, int(epoch), per_epoch)[index_R[mine]]
  return out_R


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], keys: Sequence[str]) -> batches.Batch:
  return {k: np.stack([r[k] for r in rows]) for k in keys}


class _Examples:
  """What SFT and preference data share with lm.data.Data: the interface the loop uses."""

  bytes_per_token = 0.0  # responses only: no bits per byte of a text

  def __init__(self, config: lm_config.DataConfig, seed: int, tokenizer: tokenizers.Tokenizer,
               stats: dict[str, Any]):
    self.config, self.seed, self.tokenizer, self.stats = config, seed, tokenizer, stats

  def train_batch(self, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> batches.Batch:
    raise NotImplementedError

  def train_iterator(self, start_step: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[batches.Batch]:
    return batches.train_iterator(self.train_batch, start_step, batch_size, process_index,
                                  process_count, self.config.prefetch)

  def _check_seq_len(self, seq_len: int | None) -> None:
    if seq_len not in (None, self.config.seq_len):
      raise ValueError(f'eval.seq_lens: data.format={self.config.format} examples are scored '
                       f'whole at data.seq_len={self.config.seq_len}; other context lengths '
                       'are for text corpora. Set --config.eval.seq_lens=[].')

  def _rows(self, step: int, batch_size: int, process_index: int, process_count: int,
            per_epoch: int) -> np.ndarray:
    if step < 0:
      raise ValueError(f'Steps start at 0, got {step}.')
    rows = batches.host_rows(batch_size, process_index, process_count)
    return _run_rows(self.seed, (step * batch_size + np.arange(batch_size))[rows], per_epoch)


class SFTData(_Examples):
  """Examples whose response tokens weigh 1 and everything else 0 (see the module doc)."""

  def __init__(self, config: lm_config.DataConfig, seed: int, tokenizer: tokenizers.Tokenizer,
               train: Sequences, val: Sequences, stats: dict[str, Any]):
    super().__init__(config, seed, tokenizer, stats)
    self.train, self.val = train, val
    T = config.seq_len  # pylint: disable=invalid-name
    if config.packing:
      order_S = np.random.default_rng([_PACK_STREAM, seed % (1 << 64)]).permutation(len(train))
      self._train_rows = pack(train.lengths_S, T, order_S)
      self._val_rows = pack(val.lengths_S, T, np.arange(len(val)))
    else:
      self._train_rows = [np.array([s]) for s in range(len(train))]
      self._val_rows = [np.array([s]) for s in range(len(val))]
    self._keys = ('inputs', 'targets', 'weights') + (
        ('segment_ids', 'positions') if config.packing else ())
    used = float(np.sum(train.lengths_S - 1))
    self.stats.update(train_rows=len(self._train_rows), val_rows=len(self._val_rows),
                      train_fill=used / (len(self._train_rows) * T),
                      train_response_tokens=int(np.sum(train.response_N)))

  def _row(self, sequences: Sequences, indices: np.ndarray) -> dict[str, np.ndarray]:
    return fill_row(sequences, indices, self.config.seq_len, self.tokenizer.pad_id)

  def train_batch(self, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> batches.Batch:
    """Rows of step `step` (this host's share): a pure function of (seed, step)."""
    rows_B = self._rows(step, batch_size, process_index, process_count, len(self._train_rows))
    return _stack_rows([self._row(self.train, self._train_rows[r]) for r in rows_B], self._keys)

  def num_eval_batches(self, batch_size: int, seq_len: int | None = None) -> int:
    self._check_seq_len(seq_len)
    return -(-len(self._val_rows) // batch_size)

  def eval_batches(self, batch_size: int, seq_len: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> Iterator[batches.Batch]:
    """Every validation example once, in order; the last batch padded with weight-0 rows."""
    rows = batches.host_rows(batch_size, process_index, process_count)
    empty = self._row(self.val, [])
    for i in range(self.num_eval_batches(batch_size, seq_len)):
      index_B = (i * batch_size + np.arange(batch_size))[rows]
      yield _stack_rows([self._row(self.val, self._val_rows[r]) if r < len(self._val_rows)
                         else empty for r in index_B], self._keys)

  def num_eval_tokens(self, seq_len: int | None = None) -> int:
    """Response targets a full validation pass scores."""
    self._check_seq_len(seq_len)
    return int(sum(self.val.get(s)[1][1:].sum() for s in range(len(self.val))))


class PreferenceData(_Examples):
  """Pairs as [B, 2, T] rows: index 0 the chosen sequence, 1 the rejected one."""

  def __init__(self, config: lm_config.DataConfig, seed: int, tokenizer: tokenizers.Tokenizer,
               train: Sequences, val: Sequences, stats: dict[str, Any]):
    super().__init__(config, seed, tokenizer, stats)
    self.train, self.val = train, val  # sequences 2p (chosen) and 2p + 1 (rejected)
    self.stats.update(train_pairs=len(train) // 2, val_pairs=len(val) // 2)

  def _pair(self, sequences: Sequences, p: int | None) -> dict[str, np.ndarray]:
    rows = [fill_row(sequences, [] if p is None else [2 * p + k], self.config.seq_len,
                     self.tokenizer.pad_id) for k in (0, 1)]
    return _stack_rows(rows, ('inputs', 'targets', 'weights'))

  def train_batch(self, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> batches.Batch:
    """`batch_size` pairs of step `step` (this host's share): [B, 2, T] per key."""
    pairs_B = self._rows(step, batch_size, process_index, process_count, len(self.train) // 2)
    return _stack_rows([self._pair(self.train, p) for p in pairs_B],
                       ('inputs', 'targets', 'weights'))

  def num_eval_batches(self, batch_size: int, seq_len: int | None = None) -> int:
    self._check_seq_len(seq_len)
    return -(-(len(self.val) // 2) // batch_size)

  def eval_batches(self, batch_size: int, seq_len: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> Iterator[batches.Batch]:
    """Every validation pair once, in order; the last batch padded with weight-0 pairs."""
    rows = batches.host_rows(batch_size, process_index, process_count)
    pairs = len(self.val) // 2
    for i in range(self.num_eval_batches(batch_size, seq_len)):
      index_B = (i * batch_size + np.arange(batch_size))[rows]
      yield _stack_rows([self._pair(self.val, p if p < pairs else None) for p in index_B],
                        ('inputs', 'targets', 'weights'))


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing.


def final_response_only(pieces: Sequence[chat.Piece]) -> list[chat.Piece]:
  """The pieces with only the last response (the last assistant turn) marked as response."""
  last = max((i for i, p in enumerate(pieces) if p.response), default=-1)
  start = last
  while start > 0 and pieces[start - 1].response:
    start -= 1
  return [p if i >= start else dataclasses.replace(p, response=False)
          for i, p in enumerate(pieces)]


def _conversations(config: lm_config.DataConfig,
                   records: Iterable[tuple[str, dict[str, Any]]]) -> list[tuple[str, list]]:
  """(where, conversations) per example: one conversation for SFT, chosen and rejected for
  preference (each the prompt plus that response)."""
  out = []
  for where, record in records:
    if config.format == 'sft':
      out.append((where, [chat.sft_messages(record, where)]))
    else:
      prompt, chosen, rejected = chat.preference_example(record, where)
      out.append((where, [prompt + [{'role': 'assistant', 'content': text}]
                          for text in (chosen, rejected)]))
  return out


def _encode_examples(config: lm_config.DataConfig, template: chat.Template,
                     tokenizer: tokenizers.Tokenizer,
                     examples: Sequence[tuple[str, list]]) -> tuple[Sequences, int]:
  """(sequences of the examples that fit, how many did not). Preference pairs stay together."""
  special = chat.special_tokens(template, tokenizer)
  encoded, too_long = [], 0
  for where, conversations in examples:
    sequences = []
    for messages in conversations:
      pieces = template.conversation(messages)
      if config.format == 'preference':
        pieces = final_response_only(pieces)
      try:
        sequences.append(chat.encode(tokenizer, pieces, special))
      except ValueError as e:  # a character the char tokenizer does not know
        raise ValueError(f'{where}: {e} With data.chat_template={template.name}, the markers '
                         'must be spellable too: data.chat_template=none adds none.') from None
    if any(len(ids) > config.seq_len + 1 for ids, _ in sequences):
      too_long += 1
      continue
    encoded += sequences
  return Sequences.build(encoded), too_long


def _split(config: lm_config.DataConfig) -> tuple[list, list, str]:
  """Records of the train and validation split, and where validation came from."""
  path = os.path.expanduser(config.corpus)
  val_path = os.path.join(os.path.dirname(path), 'val.jsonl')
  train = list(chat.read_jsonl(path))
  if os.path.basename(path) == 'train.jsonl' and os.path.isfile(val_path):
    return train, list(chat.read_jsonl(val_path)), val_path
  if len(train) < 2:
    raise ValueError(f'data.corpus={config.corpus!r} holds {len(train)} example(s), too few to '
                     'hold out a validation one. Add examples, or put a val.jsonl beside a '
                     'train.jsonl.')
  digest = lambda record: hashlib.sha1(json.dumps(record[1], sort_keys=True).encode()).digest()
  order = sorted(range(len(train)), key=lambda i: (digest(train[i]), i))
  held = set(order[:max(1, round(config.val_fraction * len(train)))])
  return ([r for i, r in enumerate(train) if i not in held],
          [r for i, r in enumerate(train) if i in held], f'{config.val_fraction:g} of the file')


def _tokenizer(config: lm_config.DataConfig, saved_dir: str | None,
               examples: Sequence[tuple[str, list]]) -> tuple[tokenizers.Tokenizer, str]:
  """The workdir's tokenizer (a resumed run or a copied init_from), else one built here."""
  if saved_dir and os.path.isdir(saved_dir):
    return tokenizers.load_tokenizer(saved_dir), 'workdir'
  if config.tokenizer == 'byte':
    return tokenizers.ByteTokenizer(), 'built'
  if config.tokenizer == 'sentencepiece' and config.tokenizer_path:
    return tokenizers.load_tokenizer(config.tokenizer_path), 'file'
  template = chat.load_template(config.chat_template, tokenizers.ByteTokenizer())
  texts = [p.text for _, conversations in examples for messages in conversations
           for p in template.conversation(messages)]
  if config.tokenizer == 'char':
    return tokenizers.CharTokenizer.from_texts(texts), 'built'
  return tokenizers.train_sentencepiece(
      tokenizers.sample_text(texts, sum(map(len, texts)), config.sp_train_chars),
      config.vocab_size, config.sp_model_type, f'the examples of data.corpus={config.corpus!r}'
  ), 'trained'


def prepare(config: lm_config.Config, saved_dir: str | None,
            tokenizer: tokenizers.Tokenizer | None = None) -> SFTData | PreferenceData:
  """Reads, renders and tokenizes the examples (lm.data.prepare for data.format != text).

  The tokenizer: `tokenizer` if given (a Hugging Face checkpoint's), else the one saved in
  `saved_dir` (DIR/tokenizer), else built per data.tokenizer and saved there at the end.
  """
  d = config.data
  started = time.perf_counter()
  train_records, val_records, val_source = _split(d)
  train_examples = _conversations(d, train_records)
  val_examples = _conversations(d, val_records)
  source = 'given'
  if tokenizer is None:
    tokenizer, source = _tokenizer(d, saved_dir, train_examples + val_examples)
  lm_config.with_vocab_size(config.model, tokenizer.vocab_size)
  template = chat.load_template(d.chat_template, tokenizer)
  train, train_too_long = _encode_examples(d, template, tokenizer, train_examples)
  val, val_too_long = _encode_examples(d, template, tokenizer, val_examples)
  per_example = 2 if d.format == 'preference' else 1
  for split, kept, dropped in (('train', train, train_too_long), ('val', val, val_too_long)):
    total = len(kept) // per_example + dropped
    if dropped:
      logging.warning('%d of %d %s examples are longer than data.seq_len + 1 = %d tokens and '
                      'were dropped, not cut. Raise --config.data.seq_len to keep them.',
                      dropped, total, split, d.seq_len + 1)
    if not len(kept):
      raise ValueError(f'data.corpus={d.corpus!r}: none of the {total} {split} examples fits in '
                       f'data.seq_len + 1 = {d.seq_len + 1} tokens. Raise --config.data.seq_len.')
  stats = {'corpus': d.corpus, 'format': d.format, 'chat_template': d.chat_template,
           'tokenizer': tokenizer.name, 'tokenizer_source': source, 'val_source': val_source,
           'train_examples': len(train) // per_example, 'val_examples': len(val) // per_example,
           'too_long': {'train': train_too_long, 'val': val_too_long}}
  cls = SFTData if d.format == 'sft' else PreferenceData
  data = cls(d, config.seed, tokenizer, train, val, stats)
  if saved_dir and source not in ('workdir', 'given'):
    tokenizer.save(saved_dir)
  data.stats['prepare_seconds'] = time.perf_counter() - started
  logging.info('Data: %s', json.dumps(data.stats, default=str))
  return data
