"""`prepare(config, workdir) -> Data`: corpus, tokenizer, cached tokens and batches.

Order matters for "nothing written half": everything is loaded, built and checked first; the
tokenizer goes into the workdir last, and cache entries appear only when complete.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from lm import config as lm_config
from lm.data import batches
from lm.data import cache
from lm.data import corpus as corpus_lib
from lm.data import examples
from lm.data import tokenizers

TOKENIZER_DIR = 'tokenizer'  # inside the workdir
_TOKENS_FORMAT = 1  # bump when the token cache's layout or meaning changes
_SP_FORMAT = 1  # bump when the sentencepiece training recipe changes
_ENCODE_BATCH_BYTES = 8 << 20  # text handed to the tokenizer per call (threads share it)
_BYTES_SAMPLE_TOKENS = 1 << 18  # .bin corpora: validation tokens decoded to count bytes


class Data:
  """A tokenized corpus and the batches drawn from it.

  Attributes:
    tokenizer: the tokenizer the ids belong to.
    train_tokens, val_tokens: 1-D int arrays (memory-mapped), every document followed by EOS.
    bytes_per_token: UTF-8 bytes of validation text per validation token, for bits per byte.
    stats: sizes and timings of `prepare`, for logs and benchmarks.
  """

  def __init__(self, config: lm_config.DataConfig, seed: int, tokenizer: tokenizers.Tokenizer,
               train_tokens: np.ndarray, val_tokens: np.ndarray, val_bytes: float,
               stats: dict[str, Any] | None = None):
    self.config, self.seed, self.tokenizer = config, seed, tokenizer
    self.train_tokens, self.val_tokens = train_tokens, val_tokens
    if len(train_tokens) < config.seq_len + 1:
      raise ValueError(
          f'The training split of data.corpus={config.corpus!r} has {len(train_tokens)} tokens, '
          f'fewer than one window of data.seq_len + 1 = {config.seq_len + 1}. Use a longer '
          'corpus or a shorter --config.data.seq_len.')
    if len(val_tokens) < 2:
      raise ValueError(
          f'The validation split of data.corpus={config.corpus!r} has {len(val_tokens)} '
          'token(s), too few to score. Raise --config.data.val_fraction or use a longer corpus.')
    self.bytes_per_token = float(val_bytes) / len(val_tokens)
    self.stats = dict(stats or {}, train_tokens=len(train_tokens), val_tokens=len(val_tokens),
                      bytes_per_token=self.bytes_per_token)
    self._packer = None
    if config.packing:
      documents = batches.Documents.from_tokens(train_tokens, tokenizer.eos_id)
      self._packer = batches.Packer(documents, seed, config.seq_len)

  # Training.

  def train_batch(self, step: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> batches.Batch:
    """The batch of `step`: a pure function of (seed, step); this host's rows of it."""
    rows = batches.host_rows(batch_size, process_index, process_count)
    if self._packer is not None:
      return batches.packed_batch(self.train_tokens, self._packer, step, batch_size, rows)
    return batches.window_batch(self.train_tokens, self.seed, step, batch_size,
                                self.config.seq_len, rows)

  def train_iterator(self, start_step: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[batches.Batch]:
    """Host-local batches of steps start_step, start_step + 1, ..., prepared ahead.

    `batch_size` is global; each of the `process_count` hosts gets its share of the rows.
    """
    return batches.train_iterator(self.train_batch, start_step, batch_size, process_index,
                                  process_count, self.config.prefetch)

  # Evaluation.

  def eval_stride(self, seq_len: int | None = None) -> int:
    seq_len = seq_len or self.config.seq_len
    return min(self.config.eval_stride or seq_len, seq_len)

  def num_eval_batches(self, batch_size: int, seq_len: int | None = None) -> int:
    seq_len = seq_len or self.config.seq_len
    windows = batches.num_eval_windows(len(self.val_tokens), seq_len, self.eval_stride(seq_len))
    return -(-windows // batch_size)

  def eval_batches(self, batch_size: int, seq_len: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> Iterator[batches.Batch]:
    """The whole validation split in sequential windows; the last batch is padded (weight 0).

    `seq_len` overrides data.seq_len (context-length evaluation). Every validation target is
    scored exactly once; with data.eval_stride < seq_len, windows overlap for context.
    """
    seq_len = seq_len or self.config.seq_len
    stride = self.eval_stride(seq_len)
    rows = batches.host_rows(batch_size, process_index, process_count)
    for i in range(self.num_eval_batches(batch_size, seq_len)):
      windows_B = (i * batch_size + np.arange(batch_size))[rows]
      yield batches.eval_batch(self.val_tokens, windows_B, seq_len, stride,
                               self.tokenizer.pad_id, self.tokenizer.eos_id, self.config.packing)

  def num_eval_tokens(self, seq_len: int | None = None) -> int:
    """Targets with weight 1 in a full `eval_batches` pass (the same for every seq_len)."""
    del seq_len  # every window layout scores each target once
    if self.config.packing:  # an EOS's next token starts another document: not scored
      return len(self.val_tokens) - 1 - self._val_eos_before_last
    return len(self.val_tokens) - 1

  @functools.cached_property
  def _val_eos_before_last(self) -> int:
    return int(np.count_nonzero(np.asarray(self.val_tokens[:-1]) == self.tokenizer.eos_id))


# ---------------------------------------------------------------------------------------------
# prepare.


def prepare(config: lm_config.Config, workdir: str | None = None,
            tokenizer: tokenizers.Tokenizer | None = None
            ) -> Data | examples.SFTData | examples.PreferenceData:
  """Loads the corpus, builds or loads the tokenizer, tokenizes (cached) and checks the ids.

  A tokenizer saved in `workdir/tokenizer/` is always the one used, so a resumed or evaluated
  run sees exactly the ids it was trained on; otherwise the tokenizer is built per config and
  saved there. A `tokenizer` passed in (a Hugging Face checkpoint's) is used instead of both,
  and saved nowhere. data.format=sft or preference reads JSONL examples instead (lm.data.examples).
  """
  d = config.data
  given = tokenizer
  saved_dir = os.path.join(workdir, TOKENIZER_DIR) if workdir and given is None else None
  if d.format != 'text':  # JSONL examples: SFT or preference pairs
    return examples.prepare(config, saved_dir, given)
  started = time.perf_counter()
  root = cache.root(d.cache_dir)
  corpus = corpus_lib.load(d.corpus, d.val_fraction)
  saved = saved_dir is not None and os.path.isdir(saved_dir)
  stats: dict[str, Any] = {'corpus': d.corpus}
  if isinstance(corpus, corpus_lib.TokenCorpus):
    tokenizer = _bin_tokenizer(corpus, saved_dir if saved else None, given)
    lm_config.with_vocab_size(config.model, tokenizer.vocab_size)
    fix = (f'The ids do not belong to the tokenizer named in {corpus.meta_path}: fix its '
           '"tokenizer"/"vocab_size", or re-tokenize. Ids are never clamped.')
    corpus_lib.check_token_ids(corpus.train_tokens, tokenizer.vocab_size, corpus.train_path, fix)
    corpus_lib.check_token_ids(corpus.val_tokens, tokenizer.vocab_size, corpus.val_path, fix)
    train, val = corpus.train_tokens, corpus.val_tokens
    val_bytes = _estimate_bytes(tokenizer, val)
  else:
    stats.update(train_documents=len(corpus.train), val_documents=len(corpus.val),
                 train_bytes=sum(x.size for x in corpus.train),
                 val_bytes=sum(x.size for x in corpus.val))
    train_hash = corpus_lib.content_hash(corpus.train)
    val_hash = corpus_lib.content_hash(corpus.val)
    t0 = time.perf_counter()
    if given is not None:
      stats['tokenizer_source'] = 'given'
    elif saved:
      tokenizer, stats['tokenizer_source'] = tokenizers.load_tokenizer(saved_dir), 'workdir'
      if tokenizer.kind != d.tokenizer:
        logging.warning('Using the %s tokenizer saved in %s, not data.tokenizer=%s: a run keeps '
                        'the tokenizer it started with.', tokenizer.name, saved_dir, d.tokenizer)
    else:
      tokenizer, stats['tokenizer_source'] = _build_tokenizer(d, corpus, root, train_hash)
    stats['tokenizer_seconds'] = time.perf_counter() - t0
    lm_config.with_vocab_size(config.model, tokenizer.vocab_size)
    t0 = time.perf_counter()
    train, val, val_bytes, stats['tokens_cached'] = _cached_tokens(
        corpus, tokenizer, root, train_hash, val_hash)
    stats['tokenize_seconds'] = time.perf_counter() - t0
  stats['tokenizer'] = tokenizer.name
  data = Data(d, config.seed, tokenizer, train, val, val_bytes, stats)
  if saved_dir and not saved:
    tokenizer.save(saved_dir)
  data.stats['prepare_seconds'] = time.perf_counter() - started
  logging.info('Data: %s', json.dumps(data.stats, default=str))
  return data


def tokenizer_vocab_size(config: lm_config.Config) -> int:
  """The vocabulary `prepare` would produce, cheaply where possible (char reads the corpus)."""
  d = config.data
  if corpus_lib.is_token_corpus(d.corpus):
    path = os.path.expanduser(d.corpus)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'data.corpus={d.corpus!r}: no such file.')
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'meta.json')
    return corpus_lib.read_bin_meta(meta_path, path)['vocab_size']
  if d.tokenizer == 'byte':
    return tokenizers.ByteTokenizer().vocab_size
  if d.tokenizer == 'sentencepiece':
    if d.tokenizer_path:
      return _sentencepiece_file(d.tokenizer_path).vocab_size
    return d.vocab_size
  corpus = corpus_lib.load(d.corpus, d.val_fraction)
  return _char_tokenizer(corpus.train + corpus.val).vocab_size


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def _build_tokenizer(d: lm_config.DataConfig, corpus: corpus_lib.TextCorpus, root: str,
                     train_hash: str) -> tuple[tokenizers.Tokenizer, str]:
  if d.tokenizer == 'byte':
    return tokenizers.ByteTokenizer(), 'built'
  if d.tokenizer == 'char':
    return _char_tokenizer(corpus.train + corpus.val), 'built'
  if d.tokenizer_path:
    return _sentencepiece_file(d.tokenizer_path), 'file'
  return _trained_sentencepiece(d, corpus, root, train_hash)


def _char_tokenizer(documents: Sequence[corpus_lib.Document]) -> tokenizers.CharTokenizer:
  """Characters of the whole corpus (both splits), so validation has no unknown character."""
  return tokenizers.CharTokenizer.from_texts(
      text for document in documents for text in corpus_lib.iter_text(document))


def _sentencepiece_file(path: str) -> tokenizers.Tokenizer:
  if not os.path.exists(os.path.expanduser(path)):
    raise FileNotFoundError(
        f'data.tokenizer_path={path!r}: no such file. Point it at a sentencepiece .model, or '
        'set it to \'\' to train one on the corpus.')
  return tokenizers.load_tokenizer(path)


def _trained_sentencepiece(d: lm_config.DataConfig, corpus: corpus_lib.TextCorpus, root: str,
                           train_hash: str) -> tuple[tokenizers.Tokenizer, str]:
  """Trains on the training split, or reuses the identical model trained before."""
  key = cache.key('sentencepiece', _SP_FORMAT, spm.__version__, train_hash, d.vocab_size,
                  d.sp_model_type, d.sp_train_chars)
  entry = os.path.join(root, 'tokenizers', key)
  if os.path.isdir(entry):
    try:
      return tokenizers.load_tokenizer(entry), 'cache'
    except (OSError, ValueError) as e:
      logging.warning('Retraining the tokenizer: cached %s is unreadable (%s).', entry, e)
  texts = (chunk.decode('utf-8', 'replace')
           for document in corpus.train for chunk in corpus_lib.iter_chunks(document))
  total = sum(document.size for document in corpus.train)
  t0 = time.perf_counter()
  tokenizer = tokenizers.train_sentencepiece(
      tokenizers.sample_text(texts, total, d.sp_train_chars), d.vocab_size, d.sp_model_type,
      f'the training split of data.corpus={d.corpus!r}')
  logging.info('Trained %s on up to %d of %d bytes in %.1f s.', tokenizer.name,
               d.sp_train_chars, total, time.perf_counter() - t0)
  tokenizer.save(entry)
  return tokenizer, 'trained'


def _bin_tokenizer(corpus: corpus_lib.TokenCorpus, saved_dir: str | None,
                   given: tokenizers.Tokenizer | None = None) -> tokenizers.Tokenizer:
  """The tokenizer meta.json names (or the given or workdir's one), checked against meta.json's
  vocab size."""
  if given is not None:
    tokenizer, source = given, f'the given tokenizer {given.name}'
  elif saved_dir:
    tokenizer, source = tokenizers.load_tokenizer(saved_dir), f'the tokenizer in {saved_dir}'
  elif corpus.tokenizer == 'byte':
    tokenizer, source = tokenizers.ByteTokenizer(), 'the byte tokenizer'
  else:
    path = os.path.join(os.path.dirname(corpus.meta_path), os.path.expanduser(corpus.tokenizer))
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{corpus.meta_path}: "tokenizer" is {corpus.tokenizer!r}, which is neither "byte" nor '
          f'an existing path ({path}). Point it at a sentencepiece .model or a tokenizer folder '
          'saved by lm (relative to meta.json).')
    tokenizer, source = tokenizers.load_tokenizer(path), f'its tokenizer {path}'
  if tokenizer.vocab_size != corpus.vocab_size:
    raise ValueError(
        f'{corpus.meta_path} says vocab_size={corpus.vocab_size}, but {source} has '
        f'{tokenizer.vocab_size} ids. Make meta.json agree with the tokenizer that wrote '
        f'{corpus.path}.')
  return tokenizer


# ---------------------------------------------------------------------------------------------
# Token cache.


def _cached_tokens(corpus: corpus_lib.TextCorpus, tokenizer: tokenizers.Tokenizer, root: str,
                   train_hash: str, val_hash: str) -> tuple[np.ndarray, np.ndarray, int, bool]:
  """Memory-maps the tokenized splits, tokenizing into the cache first if needed."""
  key = cache.key('tokens', _TOKENS_FORMAT, tokenizer.fingerprint, train_hash, val_hash)
  entry = os.path.join(root, 'tokens', key)
  if os.path.isdir(entry):
    try:
      return (*_open_tokens(entry), True)
    except (OSError, ValueError, KeyError) as e:
      logging.warning('Re-tokenizing: cache entry %s is unreadable (%s).', entry, e)
  t0 = time.perf_counter()
  with cache.atomic_directory(entry, replace=True) as tmp:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    meta = {'format': _TOKENS_FORMAT, 'tokenizer': tokenizer.name,
            'tokenizer_fingerprint': tokenizer.fingerprint, 'corpus': corpus.description,
            'dtype': np.dtype(dtype).name}
    for split, documents in (('train', corpus.train), ('val', corpus.val)):
      meta[f'{split}_tokens'] = _write_tokens(documents, tokenizer,
                                              os.path.join(tmp, f'{split}.bin'), dtype)
      meta[f'{split}_bytes'] = sum(document.size for document in documents)
      meta[f'{split}_documents'] = len(documents)
    cache.write_json(os.path.join(tmp, 'meta.json'), meta)
  logging.info('Tokenized %s with %s in %.1f s into %s.', corpus.description, tokenizer.name,
               time.perf_counter() - t0, entry)
  return (*_open_tokens(entry), False)


def _open_tokens(entry: str) -> tuple[np.ndarray, np.ndarray, int]:
  with open(os.path.join(entry, 'meta.json')) as f:
    meta = json.load(f)
  if meta['format'] != _TOKENS_FORMAT:
    raise ValueError(f'format {meta["format"]} is not {_TOKENS_FORMAT}')
  dtype = np.dtype(meta['dtype'])
  splits = []
  for split in ('train', 'val'):
    path, count = os.path.join(entry, f'{split}.bin'), meta[f'{split}_tokens']
    if os.path.getsize(path) != count * dtype.itemsize:
      raise ValueError(f'{path} does not hold the {count} tokens its meta.json promises')
    splits.append(np.memmap(path, dtype=dtype, mode='r'))
  return splits[0], splits[1], meta['val_bytes']


def _write_tokens(documents: Sequence[corpus_lib.Document], tokenizer: tokenizers.Tokenizer,
                  path: str, dtype: type) -> int:
  """Streams the documents' tokens, an EOS after each, into `path`; returns the count."""
  count = 0
  pending: list[tuple[corpus_lib.Document, int, bytes, bool]] = []
  with open(path, 'wb') as f:

    def flush() -> None:
      nonlocal count
      ids = _encode(tokenizer, pending)
      eos = np.array([tokenizer.eos_id], np.int64)
      parts = [p for (*_, last), i in zip(pending, ids) for p in ((i, eos) if last else (i,))]
      tokens = np.concatenate(parts).astype(dtype)
      tokens.tofile(f)
      count += len(tokens)
      pending.clear()

    size = 0
    for document in documents:
      offset, previous = document.start, None
      for chunk in corpus_lib.iter_chunks(document):
        if previous is not None:
          pending.append((document, offset - len(previous), previous, False))
        previous, offset = chunk, offset + len(chunk)
        size += len(chunk)
        if size >= _ENCODE_BATCH_BYTES:
          flush()
          size = 0
      pending.append((document, offset - len(previous), previous, True))
    if pending:
      flush()
  return count


def _encode(tokenizer: tokenizers.Tokenizer,
            pending: Sequence[tuple[corpus_lib.Document, int, bytes, bool]]) -> list[np.ndarray]:
  """Encodes chunks; an error names the file (and byte) it came from."""
  try:
    return tokenizer.encode_batch([chunk for _, _, chunk, _ in pending])
  except ValueError:
    pass
  for document, offset, chunk, _ in pending:  # find the culprit
    try:
      tokenizer.encode_batch([chunk])
    except UnicodeDecodeError as e:
      raise corpus_lib.not_utf8_error(document, offset + e.start, e.reason) from None
    except ValueError as e:
      raise ValueError(f'{document.path}: {e}') from None
  raise AssertionError('unreachable: the batch failed but no chunk did')


def _estimate_bytes(tokenizer: tokenizers.Tokenizer, tokens_N: np.ndarray) -> float:
  """Bytes the tokens decode to, from a prefix (decoding a large split would be slow)."""
  sample = np.asarray(tokens_N[:_BYTES_SAMPLE_TOKENS])
  return len(tokenizer.decode_bytes(sample.tolist())) * len(tokens_N) / len(sample)
