"""Tests for lm.data: tokenizers, corpora, the token cache, batches and bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import base
from lm import config as lm_config
from lm import data
from lm.data import batches
from lm.data import cache
from lm.data import corpus as corpus_lib
from lm.data import pipeline
from lm.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_SAMPLE = ('textwrap.py', 'heapq.py', 'bisect.py', 'copy.py', 'keyword.py', 'colorsys.py')


def make_config(tmp_path, model=None, seed=0, **data_overrides) -> lm_config.Config:
  cd = base.get_config()
  cd.seed = seed
  cd.data.cache_dir = str(tmp_path / 'cache')
  cd.data.tokenizer = 'byte'
  cd.data.seq_len = 16
  cd.data.prefetch = 2
  for key, value in data_overrides.items():
    setattr(cd.data, key, value)
  for key, value in (model or {}).items():
    setattr(cd.model, key, value)
  return lm_config.Config.from_config_dict(cd)


def write_documents(folder, texts) -> str:
  os.makedirs(folder, exist_ok=True)
  for i, text in enumerate(texts):
    with open(os.path.join(folder, f'doc{i:03d}.txt'), 'w') as f:
      f.write(text)
  return str(folder)


def cache_entries(tmp_path, kind='tokens'):
  folder = tmp_path / 'cache' / kind
  if not folder.exists():
    return [], []
  names = sorted(os.listdir(folder))
  return ([n for n in names if not n.startswith(cache.TMP_PREFIX)],
          [n for n in names if n.startswith(cache.TMP_PREFIX)])


@pytest.fixture(scope='module')
def doc_corpus(tmp_path_factory):
  """40 documents of varied length: enough for splits, windows and packing."""
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'x', 'return', 'def', '(', ')', ':']
  texts = [' '.join(rng.choice(words, size=rng.integers(5, 120))) + '\n' for _ in range(40)]
  return write_documents(tmp_path_factory.mktemp('docs'), texts)


@pytest.fixture(scope='module')
def python_corpus(tmp_path_factory):
  """A few standard-library files: real text for a small sentencepiece model."""
  folder = tmp_path_factory.mktemp('python')
  for name in STDLIB_SAMPLE:
    with open(os.path.join(corpus_lib.stdlib_root(), name), 'rb') as src:
      (folder / name).write_bytes(src.read())
  return str(folder)


@pytest.fixture(scope='module')
def sp_tokenizer(python_corpus):
  texts = [open(os.path.join(python_corpus, n)).read() for n in STDLIB_SAMPLE]
  return tokenizers.train_sentencepiece(texts, vocab_size=512, model_type='bpe',
                                        description='test')


# ---------------------------------------------------------------------------------------------
# Tokenizers.

TRICKY_TEXT = ('def f(x):\n\treturn  x  # trailing   \r\n\n\n    indented\u00a0nbsp  '
               'caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \x00\x07 end')


def random_bytes(seed=0, size=3000) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8).tobytes()


def test_byte_tokenizer_round_trips_text_and_any_bytes():
  tok = tokenizers.ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (257, 256, None)
  ids = tok.encode(TRICKY_TEXT)
  assert tok.decode(ids) == TRICKY_TEXT and max(ids) < 256
  raw = random_bytes()
  assert tok.decode_bytes(tok.encode_bytes(raw)) == raw
  assert tok.decode_bytes(np.concatenate(tok.encode_batch([raw, b'ab']))) == raw + b'ab'
  assert tok.bytes_per_token('\u00e9') == 1.0


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
  tok = tokenizers.CharTokenizer.from_texts([TRICKY_TEXT, 'more'])
  assert tok.vocab_size == 1 + len(set(TRICKY_TEXT + 'more'))
  ids = tok.encode(TRICKY_TEXT)
  assert tok.eos_id not in ids and tok.decode(ids) == TRICKY_TEXT
  assert tok.decode(ids + [tok.eos_id]) == TRICKY_TEXT
  assert tok.bytes_per_token('caf\u00e9') == 5 / 4
  with pytest.raises(ValueError, match="'Z' is not in the char"):
    tok.encode('Z')
  with pytest.raises(UnicodeDecodeError):
    tok.encode_bytes(b'\xff\xfe')


def test_sentencepiece_round_trips_text_unseen_characters_and_any_bytes(sp_tokenizer):
  tok = sp_tokenizer
  assert tok.vocab_size == 512 and tok.byte_fallback
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)
  ids = tok.encode(TRICKY_TEXT)
  assert tok.decode(ids) == TRICKY_TEXT
  assert tok.eos_id not in ids
  for seed in range(3):
    raw = random_bytes(seed)
    assert tok.decode_bytes(tok.encode_bytes(raw)) == raw
    [batched] = tok.encode_batch([raw])
    assert batched.tolist() == tok.encode_bytes(raw)
  code = open(os.path.join(corpus_lib.stdlib_root(), 'bisect.py')).read()
  assert tok.decode(tok.encode(code)) == code
  assert tok.bytes_per_token(code) > 1.5  # BPE merges something, even at 512


@pytest.mark.parametrize('make', [
    tokenizers.ByteTokenizer,
    lambda: tokenizers.CharTokenizer.from_texts([TRICKY_TEXT]),
    'sp'])
def test_saved_tokenizer_loads_identically(make, sp_tokenizer, tmp_path):
  tok = sp_tokenizer if make == 'sp' else make()
  tok.save(str(tmp_path / 'run' / 'tokenizer'))
  tok.save(str(tmp_path / 'run' / 'tokenizer'))  # overwriting is atomic too
  loaded = data.load_tokenizer(str(tmp_path / 'run'))  # a workdir works as well as the folder
  assert type(loaded) is type(tok)
  assert (loaded.name, loaded.vocab_size, loaded.fingerprint) == (tok.name, tok.vocab_size,
                                                                  tok.fingerprint)
  assert loaded.encode(TRICKY_TEXT) == tok.encode(TRICKY_TEXT)
  assert not [n for n in os.listdir(tmp_path / 'run') if n != 'tokenizer']


@pytest.mark.parametrize('make', [
    tokenizers.ByteTokenizer, lambda: tokenizers.CharTokenizer.from_texts(['ab']), 'sp'])
def test_ids_past_the_vocabulary_decode_to_a_replacement(make, sp_tokenizer):
  """A model's vocabulary is padded past the tokenizer's; sampling such an id must not crash."""
  tok = sp_tokenizer if make == 'sp' else make()
  ids = tok.encode('ab')
  assert tok.decode(ids + [tok.vocab_size + 3] + ids) == 'ab\ufffdab'
  assert tok.decode_bytes([-1] + ids) == '\ufffdab'.encode()


def test_load_tokenizer_errors_name_the_file(sp_tokenizer, tmp_path):
  with pytest.raises(FileNotFoundError, match='No tokenizer at'):
    data.load_tokenizer(str(tmp_path / 'nothing'))
  folder = tmp_path / 'tokenizer'
  sp_tokenizer.save(str(folder))
  (folder / tokenizers.SP_MODEL).write_bytes(b'not a model')
  with pytest.raises(ValueError, match='sentencepiece.model is not a valid sentencepiece model'):
    data.load_tokenizer(str(folder))
  os.remove(folder / tokenizers.SP_MODEL)
  with pytest.raises(FileNotFoundError, match='sentencepiece.model is missing'):
    data.load_tokenizer(str(folder))
  (folder / tokenizers.TOKENIZER_JSON).write_text('{"kind": ')
  with pytest.raises(ValueError, match='tokenizer.json is corrupt'):
    data.load_tokenizer(str(folder))


# ---------------------------------------------------------------------------------------------
# Corpora.


def test_stdlib_is_found_and_split_the_same_way_twice():
  first, second = corpus_lib.stdlib_documents(), corpus_lib.stdlib_documents()
  assert first == second and len(first) > 300
  names = [d.name for d in first]
  assert names == sorted(names)
  assert 'textwrap.py' in names and 'json/decoder.py' in names
  for name in names:
    parts = name.split('/')
    assert name.endswith('.py')
    assert not {'test', 'tests', 'idle_test', 'site-packages'} & set(parts), name
  split1 = corpus_lib.split(first, 0.05)
  split2 = corpus_lib.load('stdlib', 0.05)
  assert split1 == (list(split2.train), list(split2.val))
  train_bytes = sum(d.size for d in split2.train)
  val_bytes = sum(d.size for d in split2.val)
  assert 0.04 < val_bytes / (train_bytes + val_bytes) < 0.07
  assert not {d.name for d in split2.train} & {d.name for d in split2.val}


def test_stdlib_prepares_end_to_end_with_bytes(tmp_path):
  config = make_config(tmp_path, corpus='stdlib')
  d = data.prepare(config, str(tmp_path / 'run'))
  corpus = corpus_lib.load('stdlib', config.data.val_fraction)
  # Bytes plus one EOS per document, in file order.
  assert len(d.train_tokens) == sum(x.size for x in corpus.train) + len(corpus.train)
  assert len(d.val_tokens) == sum(x.size for x in corpus.val) + len(corpus.val)
  first = corpus.train[0]
  with open(first.path, 'rb') as f:
    assert bytes(d.train_tokens[:first.size].astype(np.uint8)) == f.read()
  assert d.train_tokens[first.size] == d.tokenizer.eos_id
  assert isinstance(d.train_tokens, np.memmap)
  assert 0.99 < d.bytes_per_token < 1.0


def test_single_text_file_splits_at_a_line_and_keeps_every_byte(tmp_path):
  path = tmp_path / 'book.txt'
  text = ''.join(f'line {i} \u00e9\n' for i in range(500))
  path.write_text(text)
  corpus = corpus_lib.load(str(path), 0.1)
  [train], [val] = corpus.train, corpus.val
  assert train.end == val.start and train.start == 0 and val.end == len(text.encode())
  data_bytes = path.read_bytes()
  assert data_bytes[val.start - 1:val.start] == b'\n'
  assert 0.08 < val.size / len(data_bytes) < 0.12


def test_glob_and_directory_corpora(doc_corpus, tmp_path):
  documents, _ = corpus_lib.find_documents(os.path.join(doc_corpus, 'doc00*.txt'))
  assert [d.name for d in documents] == sorted(d.name for d in documents)
  assert len(documents) == 10
  (tmp_path / 'nested' / '.hidden').mkdir(parents=True)
  (tmp_path / 'nested' / 'a.txt').write_text('a')
  (tmp_path / 'nested' / '.hidden' / 'b.txt').write_text('b')
  (tmp_path / 'nested' / 'empty.txt').write_text('')
  documents, _ = corpus_lib.find_documents(str(tmp_path / 'nested'))
  assert [d.name for d in documents] == ['a.txt']


def test_chunks_end_at_lines_or_character_starts(tmp_path):
  path = tmp_path / 'long.txt'
  text = 'ab\n' * 50 + '\u00e9' * 300 + '\n' + '\U0001F600' * 100
  path.write_text(text)
  document = corpus_lib.find_documents(str(path))[0][0]
  chunks = list(corpus_lib.iter_chunks(document, chunk_bytes=64))
  assert b''.join(chunks) == text.encode()
  assert all(len(c) <= 2 * 64 for c in chunks) and len(chunks) > 10
  for chunk in chunks:
    chunk.decode('utf-8')  # never cuts a character in two


# ---------------------------------------------------------------------------------------------
# Cache.


def test_second_run_reuses_the_token_cache(doc_corpus, tmp_path, monkeypatch):
  config = make_config(tmp_path, corpus=doc_corpus)
  first = data.prepare(config, None)
  assert not first.stats['tokens_cached']

  def fail(*args):
    raise AssertionError('tokenized again')

  monkeypatch.setattr(tokenizers.ByteTokenizer, 'encode_batch', fail)
  second = data.prepare(config, None)
  assert second.stats['tokens_cached']
  assert second.train_tokens.filename == first.train_tokens.filename
  np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
  assert len(cache_entries(tmp_path)[0]) == 1


def test_changed_content_or_tokenizer_gets_a_new_cache_entry(tmp_path):
  folder = write_documents(tmp_path / 'docs', ['hello world\n' * 20, 'second doc\n' * 20])
  config = make_config(tmp_path, corpus=folder)
  data.prepare(config, None)
  data.prepare(make_config(tmp_path, corpus=folder, tokenizer='char'), None)
  assert len(cache_entries(tmp_path)[0]) == 2
  with open(os.path.join(folder, 'doc001.txt'), 'a') as f:
    f.write('changed\n')
  assert not data.prepare(config, None).stats['tokens_cached']
  assert len(cache_entries(tmp_path)[0]) == 3


def test_error_mid_write_leaves_no_cache_behind(doc_corpus, tmp_path, monkeypatch):
  config = make_config(tmp_path, corpus=doc_corpus)
  original = pipeline._write_tokens

  def write_then_fail(documents, tokenizer, path, dtype):
    original(documents[:3], tokenizer, path, dtype)
    raise KeyboardInterrupt

  monkeypatch.setattr(pipeline, '_write_tokens', write_then_fail)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(config, str(tmp_path / 'run'))
  assert cache_entries(tmp_path) == ([], [])
  assert not (tmp_path / 'run' / 'tokenizer').exists()


def test_crash_mid_write_leaves_nothing_a_later_run_trusts(doc_corpus, tmp_path):
  """A process killed while writing (os._exit, no clean-up) leaves only a .tmp folder."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      from configs import base
      from lm import config as lm_config, data
      from lm.data import pipeline
      original = pipeline._write_tokens
      def write_then_die(documents, tokenizer, path, dtype):
        original(documents[:3], tokenizer, path, dtype)
        os._exit(3)
      pipeline._write_tokens = write_then_die
      cd = base.get_config()
      cd.data.corpus, cd.data.tokenizer = {doc_corpus!r}, 'byte'
      cd.data.cache_dir, cd.data.seq_len = {str(tmp_path / 'cache')!r}, 16
      data.prepare(lm_config.Config.from_config_dict(cd), None)
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 3, result.stderr
  entries, temporaries = cache_entries(tmp_path)
  assert entries == [] and len(temporaries) == 1
  config = make_config(tmp_path, corpus=doc_corpus)
  d = data.prepare(config, None)
  assert not d.stats['tokens_cached']
  clean = data.prepare(make_config(tmp_path / 'clean', corpus=doc_corpus), None)
  np.testing.assert_array_equal(d.train_tokens, clean.train_tokens)
  np.testing.assert_array_equal(d.val_tokens, clean.val_tokens)


# ---------------------------------------------------------------------------------------------
# Tokenizer choice and saving.


def test_workdir_tokenizer_wins_over_the_config(doc_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  first = data.prepare(make_config(tmp_path, corpus=doc_corpus, tokenizer='char'), workdir)
  assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  again = data.prepare(make_config(tmp_path, corpus=doc_corpus, tokenizer='byte'), workdir)
  assert again.tokenizer.kind == 'char' and again.stats['tokenizer_source'] == 'workdir'
  np.testing.assert_array_equal(again.train_tokens, first.train_tokens)
  assert data.load_tokenizer(workdir).fingerprint == first.tokenizer.fingerprint


def test_sentencepiece_is_trained_on_the_training_split_once(python_corpus, tmp_path):
  config = make_config(tmp_path, corpus=python_corpus, tokenizer='sentencepiece',
                       vocab_size=400)
  first = data.prepare(config, str(tmp_path / 'a'))
  assert first.stats['tokenizer_source'] == 'trained' and first.tokenizer.vocab_size == 400
  second = data.prepare(config, str(tmp_path / 'b'))
  assert second.stats['tokenizer_source'] == 'cache'
  assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
  assert data.load_tokenizer(str(tmp_path / 'b')).fingerprint == first.tokenizer.fingerprint
  text = open(os.path.join(python_corpus, 'heapq.py')).read()
  assert first.tokenizer.decode(first.tokenizer.encode(text)) == text
  assert first.bytes_per_token > 1.5


def test_existing_sentencepiece_model_is_loaded(python_corpus, sp_tokenizer, tmp_path):
  model = tmp_path / 'm.model'
  sp_tokenizer.save(str(tmp_path / 'saved'))
  model.write_bytes((tmp_path / 'saved' / tokenizers.SP_MODEL).read_bytes())
  config = make_config(tmp_path, corpus=python_corpus, tokenizer='sentencepiece',
                       tokenizer_path=str(model))
  d = data.prepare(config, None)
  assert d.tokenizer.vocab_size == 512 and d.stats['tokenizer_source'] == 'file'
  assert data.tokenizer_vocab_size(config) == 512


def test_tokenizer_vocab_size(doc_corpus, tmp_path):
  assert data.tokenizer_vocab_size(make_config(tmp_path, corpus=doc_corpus)) == 257
  assert data.tokenizer_vocab_size(make_config(
      tmp_path, corpus=doc_corpus, tokenizer='sentencepiece', vocab_size=1000)) == 1000
  config = make_config(tmp_path, corpus=doc_corpus, tokenizer='char')
  assert data.tokenizer_vocab_size(config) == data.prepare(config, None).tokenizer.vocab_size


def test_model_vocab_is_checked_against_the_tokenizer(doc_corpus, tmp_path):
  config = make_config(tmp_path, corpus=doc_corpus, model={'vocab_size': 200})
  with pytest.raises(ValueError, match=r'model.vocab_size=200 .*\(257 tokens\)'):
    data.prepare(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  model = lm_config.with_vocab_size(make_config(tmp_path).model, 257)
  assert model.vocab_size == 320


# ---------------------------------------------------------------------------------------------
# Training batches.


@pytest.mark.parametrize('packing', [False, True])
def test_batch_at_step_s_is_the_same_fresh_or_resumed(doc_corpus, tmp_path, packing):
  config = make_config(tmp_path, corpus=doc_corpus, packing=packing, seed=7)
  uninterrupted = data.prepare(config, None).train_iterator(0, batch_size=8)
  seen = [next(uninterrupted) for _ in range(6)]
  uninterrupted.close()
  resumed_data = data.prepare(config, None)  # a new process would build a new Data
  resumed = resumed_data.train_iterator(4, batch_size=8)
  for step in (4, 5):
    batch = next(resumed)
    for key in seen[step]:
      np.testing.assert_array_equal(batch[key], seen[step][key])
      np.testing.assert_array_equal(resumed_data.train_batch(step, 8)[key], seen[step][key])
  resumed.close()
  assert not np.array_equal(seen[0]['inputs'], seen[1]['inputs'])
  other_seed = data.prepare(make_config(tmp_path, corpus=doc_corpus, packing=packing, seed=8))
  assert not np.array_equal(other_seed.train_batch(0, 8)['inputs'], seen[0]['inputs'])
  expected = {'inputs', 'targets', 'weights'} | ({'segment_ids', 'positions'} if packing else set())
  assert set(seen[0]) == expected
  assert seen[0]['inputs'].dtype == np.int32 and seen[0]['weights'].dtype == np.float32
  assert seen[0]['inputs'].shape == (8, 16)


@pytest.mark.parametrize('packing', [False, True])
def test_hosts_together_see_the_global_batch(doc_corpus, tmp_path, packing):
  d = data.prepare(make_config(tmp_path, corpus=doc_corpus, packing=packing, prefetch=0))
  whole = d.train_batch(3, 12)
  parts = [next(d.train_iterator(3, 12, process_index=i, process_count=3)) for i in range(3)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match='divisible by the 5 processes'):
    d.train_iterator(0, 12, process_index=0, process_count=5)


def test_prefetcher_keeps_order_raises_errors_and_stops():
  def make_batch(step):
    if step == 5:
      raise ValueError('bad step 5')
    return {'step': np.array(step)}

  prefetcher = batches.Prefetcher(make_batch, start_step=2, depth=2)
  assert [int(next(prefetcher)['step']) for _ in range(3)] == [2, 3, 4]
  with pytest.raises(ValueError, match='bad step 5'):
    next(prefetcher)
  with batches.Prefetcher(make_batch, start_step=10, depth=3) as endless:
    assert int(next(endless)['step']) == 10
  assert not endless._thread.is_alive()


def test_windows_are_contiguous_corpus_slices(doc_corpus, tmp_path):
  d = data.prepare(make_config(tmp_path, corpus=doc_corpus))
  batch = d.train_batch(0, 16)
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  train = np.asarray(d.train_tokens)
  for row_in, row_tgt in zip(batch['inputs'], batch['targets']):
    window = np.concatenate([row_in, row_tgt[-1:]])
    starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(train, 17).__eq__(
        window).all(axis=1))
    assert len(starts) >= 1
  assert batch['weights'].min() == 1.0


def check_packed_rows(batch, eos):
  """Segments count up from 1 (0 only for padding at the end); positions restart at 0 in
  each; an EOS only ends a segment; a weighted target lies in its input's segment."""
  for inputs, weights, segments, positions in zip(
      batch['inputs'], batch['weights'], batch['segment_ids'], batch['positions']):
    real = segments > 0
    assert not real.any() or (real[:real.sum()].all() and segments[0] == 1)
    assert set(np.diff(segments[real])) <= {0, 1}
    for segment in np.unique(segments[real]):
      where = np.flatnonzero(segments == segment)
      np.testing.assert_array_equal(positions[where], np.arange(len(where)))
      assert eos not in inputs[where][:-1]
    next_in_same_segment = np.append(segments[1:] == segments[:-1], True)
    assert next_in_same_segment[weights > 0].all()
    assert (weights[inputs == eos] == 0).all()
    assert (positions[~real] == 0).all() and (weights[~real] == 0).all()


def test_packing_never_mixes_documents(tmp_path):
  letters = 'abcdefghijklmnopqrstuvwxyz'
  lengths = np.random.default_rng(1).integers(1, 40, size=len(letters))
  folder = write_documents(tmp_path / 'docs', [c * n for c, n in zip(letters, lengths)])
  d = data.prepare(make_config(tmp_path, corpus=folder, tokenizer='char', packing=True,
                               prefetch=0))
  tok, eos = d.tokenizer, d.tokenizer.eos_id
  rows_per_epoch = (len(d.train_tokens) - 1) // 16
  for step in range(2 * rows_per_epoch // 4 + 1):  # two epochs
    batch = d.train_batch(step, 4)
    check_packed_rows(batch, eos)
    for inputs, targets, weights, segments, positions in zip(
        batch['inputs'], batch['targets'], batch['weights'], batch['segment_ids'],
        batch['positions']):
      assert segments[0] == 1 and set(np.diff(segments)) <= {0, 1}
      for segment in np.unique(segments):
        where = np.flatnonzero(segments == segment)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))
        text = tok.decode(inputs[where])
        assert len(set(text)) <= 1, text  # one document: one letter
        assert eos not in inputs[where][:-1]  # an EOS can only end a segment
      for i in range(16):
        same_document = i + 1 < 16 and segments[i + 1] == segments[i] or inputs[i] != eos
        assert weights[i] == float(same_document)
        if weights[i]:
          assert targets[i] == eos or tok.decode([targets[i]]) == tok.decode([inputs[i]])
        else:
          assert inputs[i] == eos  # only a document's end predicts into the next one
  # One epoch walks every document once (bar the tail of the last row).
  epoch_rows = np.concatenate([d.train_batch(s, 1)['inputs'][0] for s in range(rows_per_epoch)])
  first_epoch_text = tok.decode(epoch_rows)
  train_letters = set(tok.decode(d.train_tokens))
  assert len(set(first_epoch_text)) >= len(train_letters) - 1


# ---------------------------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize('packing,eval_stride,seq_len', [
    (False, 0, None), (False, 5, None), (False, 0, 40), (True, 0, None), (True, 3, 24),
    (False, 0, 1000)])
def test_eval_windows_score_every_token_once(doc_corpus, tmp_path, packing, eval_stride,
                                             seq_len):
  d = data.prepare(make_config(tmp_path, corpus=doc_corpus, packing=packing,
                               eval_stride=eval_stride, val_fraction=0.2))
  val = np.asarray(d.val_tokens)
  n, batch_size = len(val), 8
  length = seq_len or 16
  stride = d.eval_stride(seq_len)
  counts = np.zeros(n, int)
  all_batches = list(d.eval_batches(batch_size, seq_len))
  assert len(all_batches) == d.num_eval_batches(batch_size, seq_len)
  for i, batch in enumerate(all_batches):
    assert batch['inputs'].shape == (batch_size, length)
    for row in range(batch_size):
      start = (i * batch_size + row) * stride
      for t in np.flatnonzero(batch['weights'][row]):
        target = start + t + 1
        counts[target] += 1
        assert batch['targets'][row, t] == val[target]
        assert batch['inputs'][row, t] == val[target - 1]
  scored = np.ones(n, bool)
  scored[0] = False
  if packing:  # the token after an EOS starts a new document: nothing predicts it
    scored[1:] &= val[:-1] != d.tokenizer.eos_id
  np.testing.assert_array_equal(counts, scored.astype(int))
  assert sum(b['weights'].sum() for b in all_batches) == d.num_eval_tokens(seq_len)
  last = all_batches[-1]
  windows = batches.num_eval_windows(n, length, stride)
  padded_rows = len(all_batches) * batch_size - windows
  if padded_rows:
    assert last['weights'][-padded_rows:].sum() == 0
    assert (last['inputs'][-padded_rows:] == d.tokenizer.pad_id).all()
  if packing:
    for batch in all_batches:
      check_packed_rows(batch, d.tokenizer.eos_id)


# ---------------------------------------------------------------------------------------------
# Pre-tokenized corpora.


def write_bin(folder, name, ids, meta, dtype=np.uint16):
  os.makedirs(folder, exist_ok=True)
  np.asarray(ids, dtype=dtype).tofile(os.path.join(folder, name))
  if meta is not None:
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
      json.dump(meta, f)
  return os.path.join(folder, name)


def test_bin_corpus_with_train_and_val_files(tmp_path):
  text = b'the quick brown fox\n' * 40
  ids = list(text) + [256]
  path = write_bin(tmp_path / 'bin', 'train.bin', ids, {'tokenizer': 'byte', 'vocab_size': 257})
  write_bin(tmp_path / 'bin', 'val.bin', ids[:100], None)
  d = data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  np.testing.assert_array_equal(d.train_tokens, ids)
  np.testing.assert_array_equal(d.val_tokens, ids[:100])
  assert d.bytes_per_token == 1.0 and d.tokenizer.kind == 'byte'
  assert data.load_tokenizer(str(tmp_path / 'run')).kind == 'byte'
  assert data.tokenizer_vocab_size(make_config(tmp_path, corpus=path)) == 257


def test_bin_corpus_with_a_sentencepiece_tokenizer_and_split(sp_tokenizer, tmp_path):
  sp_tokenizer.save(str(tmp_path / 'bin' / 'tok'))
  ids = sp_tokenizer.encode(TRICKY_TEXT * 20) + [sp_tokenizer.eos_id]
  path = write_bin(tmp_path / 'bin', 'all.bin', ids, {'tokenizer': 'tok', 'vocab_size': 512,
                                                      'dtype': 'uint32'}, np.uint32)
  d = data.prepare(make_config(tmp_path, corpus=path, val_fraction=0.25))
  assert len(d.train_tokens) + len(d.val_tokens) == len(ids)
  assert d.tokenizer.fingerprint == sp_tokenizer.fingerprint
  assert d.bytes_per_token > 1.0


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written half.


def assert_nothing_written(tmp_path):
  assert not (tmp_path / 'run').exists()
  assert cache_entries(tmp_path)[1] == []


@pytest.mark.parametrize('corpus,error,message', [
    ('{tmp}/missing.txt', FileNotFoundError, 'no such file or directory'),
    ('{tmp}/none/*.txt', FileNotFoundError, 'the glob matches no files'),
    ('{tmp}/missing.bin', FileNotFoundError, 'no such file'),
    ('hf:tiny_shakespeare', ValueError, 'datasets'),
])
def test_missing_corpus(tmp_path, corpus, error, message):
  with pytest.raises(error, match=message):
    data.prepare(make_config(tmp_path, corpus=corpus.format(tmp=tmp_path)), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)


def test_empty_corpus(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'a.txt').write_text('')
  with pytest.raises(ValueError, match='is empty'):
    data.prepare(make_config(tmp_path, corpus=str(tmp_path / 'empty')), str(tmp_path / 'run'))
  (tmp_path / 'one.txt').write_text('x')
  with pytest.raises(ValueError, match='too short to hold out'):
    data.prepare(make_config(tmp_path, corpus=str(tmp_path / 'one.txt')), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)


def test_corpus_shorter_than_one_window(tmp_path):
  folder = write_documents(tmp_path / 'docs', ['abc\n', 'defg\n', 'hi\n'])
  with pytest.raises(ValueError, match=r'fewer than one window of data.seq_len \+ 1 = 17'):
    data.prepare(make_config(tmp_path, corpus=folder), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_bin_ids_beyond_the_vocabulary_are_named(tmp_path):
  ids = [5] * 100 + [300] + [6] * 50
  path = write_bin(tmp_path / 'bin', 'data.bin', ids, {'tokenizer': 'byte', 'vocab_size': 257})
  with pytest.raises(ValueError, match=r'data.bin: token id 300 at position 100 is outside'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)


def test_bin_without_or_with_disagreeing_meta(tmp_path):
  path = write_bin(tmp_path / 'bin', 'data.bin', [1] * 100, None)
  with pytest.raises(FileNotFoundError, match='has no .*meta.json beside it'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  write_bin(tmp_path / 'bin', 'data.bin', [1] * 100, {'tokenizer': 'byte', 'vocab_size': 300})
  with pytest.raises(ValueError, match='says vocab_size=300, but the byte tokenizer has 257'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  write_bin(tmp_path / 'bin', 'data.bin', [1] * 101, {'tokenizer': 'byte', 'vocab_size': 257,
                                                      'dtype': 'uint32'})
  with pytest.raises(ValueError, match='not a whole number of uint32 ids'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  write_bin(tmp_path / 'bin', 'data.bin', [1] * 100, {'tokenizer': 'missing/tok',
                                                      'vocab_size': 257})
  with pytest.raises(FileNotFoundError, match='neither "byte" nor an existing path'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  (tmp_path / 'bin' / 'meta.json').write_text('{oops')
  with pytest.raises(ValueError, match='meta.json is not valid JSON'):
    data.prepare(make_config(tmp_path, corpus=path), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)


def test_non_utf8_text_with_the_char_tokenizer_names_the_file(tmp_path):
  folder = write_documents(tmp_path / 'docs', ['fine text\n' * 10])
  (tmp_path / 'docs' / 'latin1.txt').write_bytes('caf\u00e9\n'.encode('latin-1') * 10)
  with pytest.raises(ValueError, match=r'latin1.txt is not UTF-8 text \(byte 3'):
    data.prepare(make_config(tmp_path, corpus=folder, tokenizer='char'), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)
  # Byte and sentencepiece take any bytes.
  d = data.prepare(make_config(tmp_path, corpus=folder, seq_len=8), None)
  assert 0xE9 in np.asarray(d.train_tokens) or 0xE9 in np.asarray(d.val_tokens)


def test_corrupt_or_missing_sentencepiece_model(doc_corpus, tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'\x00garbage')
  with pytest.raises(ValueError, match='bad.model is not a valid sentencepiece model'):
    data.prepare(make_config(tmp_path, corpus=doc_corpus, tokenizer='sentencepiece',
                             tokenizer_path=str(bad)), str(tmp_path / 'run'))
  with pytest.raises(FileNotFoundError, match='data.tokenizer_path=.*no such file'):
    data.prepare(make_config(tmp_path, corpus=doc_corpus, tokenizer='sentencepiece',
                             tokenizer_path=str(tmp_path / 'nope.model')), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)


def test_sentencepiece_vocab_too_small_names_the_key(python_corpus, tmp_path):
  with pytest.raises(ValueError, match='data.vocab_size=100: sentencepiece could not train'):
    data.prepare(make_config(tmp_path, corpus=python_corpus, tokenizer='sentencepiece',
                             vocab_size=100), str(tmp_path / 'run'))
  assert_nothing_written(tmp_path)
