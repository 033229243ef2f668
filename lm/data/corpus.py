"""Corpora: where the text comes from, and how it splits into train and validation.

A text corpus is a list of documents, each a byte range of a file, read lazily in chunks so
that a corpus larger than memory streams through tokenization. The split is decided by file
(by text for a single file) and depends only on file names and sizes, so it is the same on
every run and machine. A pre-tokenized `.bin` is memory-mapped as it is.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Iterable, Iterator, Sequence

import numpy as np

CHUNK_BYTES = 1 << 20  # documents are read, hashed and tokenized in chunks of about this size
# Folders of the standard library that are not its own library source.
_STDLIB_SKIP_DIRS = ('test', 'tests', 'idle_test', 'testdata', '__pycache__', 'site-packages',
                     'dist-packages', 'lib-dynload')
_CORPUS_HELP = ("Use 'stdlib', a text file, a directory, a glob such as 'data/*.txt', or a "
                'pre-tokenized .bin with a meta.json beside it.')


@dataclasses.dataclass(frozen=True)
class Document:
  """A byte range of a file: gets one EOS after it and goes wholly to one split."""

  path: str
  name: str  # stable name that decides the split (path relative to the corpus root)
  start: int
  end: int

  @property
  def size(self) -> int:
    return self.end - self.start


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  description: str
  train: tuple[Document, ...]
  val: tuple[Document, ...]


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  """A pre-tokenized corpus; `tokenizer` is meta.json's entry, resolved by the caller."""

  path: str
  meta_path: str
  tokenizer: str
  vocab_size: int
  train_path: str
  train_tokens: np.ndarray
  val_path: str
  val_tokens: np.ndarray


def is_token_corpus(spec: str) -> bool:
  return spec.endswith('.bin')


def load(spec: str, val_fraction: float) -> TextCorpus | TokenCorpus:
  """Finds the corpus named by `data.corpus` and splits it into train and validation."""
  if spec.startswith('hf:'):
    _hf_unsupported(spec)
  if is_token_corpus(spec):
    return load_bin(os.path.expanduser(spec), val_fraction)
  documents, description = find_documents(spec)
  train, val = split(documents, val_fraction, description)
  return TextCorpus(description, tuple(train), tuple(val))


def _hf_unsupported(spec: str) -> None:
  try:
    import datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ValueError(
        f'data.corpus={spec!r} names a Hugging Face dataset, which needs the `datasets` '
        'package: install the datasets extra (pip install datasets), or export the text to '
        'files and point data.corpus at them.') from None
  raise ValueError(
      f'data.corpus={spec!r}: Hugging Face datasets are not read directly yet. Export the text '
      'to files (one document per file, or one text file) and point data.corpus at them.')


# ---------------------------------------------------------------------------------------------
# Finding documents.


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_documents(root: str | None = None) -> list[Document]:
  """The standard library's own .py files in sorted order, without tests and third parties."""
  root = root or stdlib_root()
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'data.corpus=stdlib: the standard library folder {root} (from sysconfig) does not '
        'exist. Point data.corpus at text files instead.')
  documents = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS
                   and not d.startswith(('.', 'config-', 'test_'))]
    for filename in filenames:
      if filename.endswith('.py'):
        documents.append(_document(os.path.join(dirpath, filename), root))
  return _sorted_non_empty(documents)


def find_documents(spec: str) -> tuple[list[Document], str]:
  """Resolves `data.corpus` to documents; raises naming the path and the fix."""
  if spec == 'stdlib':
    documents = stdlib_documents()
    description = f'stdlib ({stdlib_root()})'
  else:
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
      documents = _sorted_non_empty([_document(path, os.path.dirname(path))])
    elif os.path.isdir(path):
      documents = _sorted_non_empty(_walk(path))
    elif glob.has_magic(path):
      matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
      if not matches:
        raise FileNotFoundError(
            f'data.corpus={spec!r}: the glob matches no files. Check the pattern (quote it in '
            f'the shell; ** needs a folder level) or list the folder. {_CORPUS_HELP}')
      documents = _sorted_non_empty([_document(p, '') for p in matches])
    else:
      raise FileNotFoundError(
          f'data.corpus={spec!r}: no such file or directory ({os.path.abspath(path)}). '
          f'{_CORPUS_HELP}')
    description = os.path.abspath(path) if not glob.has_magic(path) else path
  if not documents:
    raise ValueError(f'data.corpus={spec!r} is empty: it holds no non-empty files. '
                     f'{_CORPUS_HELP}')
  return documents, description


def _walk(root: str) -> list[Document]:
  documents = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    documents += [_document(os.path.join(dirpath, f), root)
                  for f in filenames if not f.startswith('.')]
  return documents


def _document(path: str, root: str) -> Document:
  name = os.path.relpath(path, root).replace(os.sep, '/') if root else path
  return Document(path=path, name=name, start=0, end=os.path.getsize(path))


def _sorted_non_empty(documents: Iterable[Document]) -> list[Document]:
  return sorted((d for d in documents if d.size > 0), key=lambda d: d.name)


# ---------------------------------------------------------------------------------------------
# Splitting.


def split(documents: Sequence[Document], val_fraction: float,
          description: str = '') -> tuple[list[Document], list[Document]]:
  """Holds out about `val_fraction` of the bytes for validation.

  Several files: whole files, taken in the order of a hash of their names (so adding a file
  moves no other), skipping files that would overshoot twice the target. One file: its tail,
  cut after a newline.
  """
  if len(documents) == 1:
    return _split_text(documents[0], val_fraction, description)
  total = sum(d.size for d in documents)
  target = val_fraction * total
  held, held_bytes = set(), 0
  for i in sorted(range(len(documents)), key=lambda i: _name_hash(documents[i].name)):
    if held_bytes >= target or len(held) == len(documents) - 1:
      break
    if held_bytes + documents[i].size <= 2 * target:
      held.add(i)
      held_bytes += documents[i].size
  if not held:  # every file is larger than twice the target: hold out the smallest
    held.add(min(range(len(documents)), key=lambda i: (documents[i].size, documents[i].name)))
  train = [d for i, d in enumerate(documents) if i not in held]
  val = [d for i, d in enumerate(documents) if i in held]
  return train, val


def _name_hash(name: str) -> bytes:
  return hashlib.sha1(name.encode('utf-8', 'surrogateescape')).digest()


def _split_text(document: Document, val_fraction: float,
                description: str) -> tuple[list[Document], list[Document]]:
  cut = _cut_point(document, document.start + int(round(document.size * (1 - val_fraction))))
  if not document.start < cut < document.end:
    raise ValueError(
        f'data.corpus={description or document.path!r}: {document.path} ({document.size} bytes) '
        'is too short to hold out a validation part. Use a longer text.')
  return ([dataclasses.replace(document, end=cut)],
          [dataclasses.replace(document, start=cut, name=document.name + ':val')])


def _cut_point(document: Document, target: int) -> int:
  """The first line start after `target`, else the UTF-8 character start at `target`."""
  with open(document.path, 'rb') as f:
    f.seek(target)
    ahead = f.read(min(CHUNK_BYTES, document.end - target))
    newline = ahead.find(b'\n')
    if 0 <= newline < len(ahead) - 1:
      return target + newline + 1
    cut = target
    f.seek(cut)
    while cut > document.start and (f.read(1)[:1] or b'\0')[0] & 0xC0 == 0x80:
      cut -= 1  # a UTF-8 continuation byte (0b10xxxxxx): step back to the character's start
      f.seek(cut)
  return cut


# ---------------------------------------------------------------------------------------------
# Reading.


def iter_chunks(document: Document, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
  """The document's bytes in chunks that end after a newline (or before a UTF-8 lead byte).

  Chunks bound memory and the tokenizer's input; cutting at line ends keeps the tokenization
  of a long document close to that of its whole text, and always the same.
  """
  with open(document.path, 'rb') as f:
    f.seek(document.start)
    remaining, carry = document.size, b''
    while remaining > 0:
      block = f.read(min(chunk_bytes, remaining))
      if not block:
        raise ValueError(f'{document.path} became shorter while being read. Rerun once it no '
                         'longer changes.')
      remaining -= len(block)
      data = carry + block
      if remaining == 0:
        yield data
        return
      cut = data.rfind(b'\n') + 1 or _char_start(data)
      yield data[:cut]
      carry = data[cut:]


def _char_start(data: bytes) -> int:
  """The last offset in `data` where a UTF-8 character starts (len(data) when none does)."""
  cut = len(data) - 1
  while cut > 0 and data[cut] & 0xC0 == 0x80:  # 0b10xxxxxx continues a character
    cut -= 1
  return cut or len(data)


def iter_text(document: Document) -> Iterator[str]:
  """The document as text, or a ValueError naming the file and offset where it is not UTF-8."""
  offset = document.start
  for chunk in iter_chunks(document):
    try:
      yield chunk.decode('utf-8')
    except UnicodeDecodeError as e:
      raise not_utf8_error(document, offset + e.start, e.reason) from None
    offset += len(chunk)


def not_utf8_error(document: Document, offset: int, reason: str) -> ValueError:
  return ValueError(
      f'{document.path} is not UTF-8 text (byte {offset}: {reason}), which the char tokenizer '
      'needs. Convert it (e.g. iconv -f latin1 -t utf-8), drop it from data.corpus, or use '
      '--config.data.tokenizer=byte or sentencepiece, which take any bytes.')


def content_hash(documents: Sequence[Document]) -> str:
  """A digest of the documents' bytes and boundaries: what the token cache is keyed by."""
  digest = hashlib.sha256()
  for document in documents:
    digest.update(b'\x00doc %d\x00' % document.size)
    for chunk in iter_chunks(document):
      digest.update(chunk)
  return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Pre-tokenized corpora.


def load_bin(path: str, val_fraction: float) -> TokenCorpus:
  """Memory-maps a `.bin` of token ids described by the meta.json beside it.

  meta.json: {"tokenizer": "byte" or a path (relative to meta.json) to an lm tokenizer folder
  or a sentencepiece .model, "vocab_size": N, "dtype": "uint16" | "uint32" (optional)}.
  Validation is `val.bin` beside a `train.bin`, else the last `val_fraction` of the tokens.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.corpus={path!r}: no such file. {_CORPUS_HELP}')
  folder = os.path.dirname(os.path.abspath(path))
  meta_path = os.path.join(folder, 'meta.json')
  meta = read_bin_meta(meta_path, path)
  dtype = np.dtype(meta['dtype'])
  train_path, val_path = path, os.path.join(folder, 'val.bin')
  tokens = _memmap(path, dtype, meta_path)
  if os.path.basename(path) == 'train.bin' and os.path.isfile(val_path):
    train, val = tokens, _memmap(val_path, dtype, meta_path)
  else:
    cut = int(round(len(tokens) * (1 - val_fraction)))
    if not 0 < cut < len(tokens) - 1:
      raise ValueError(f'{path} holds {len(tokens)} tokens, too few to hold out a validation '
                       'part. Use a longer corpus or put a val.bin beside a train.bin.')
    train, val, val_path = tokens[:cut], tokens[cut:], path
  return TokenCorpus(path=path, meta_path=meta_path, tokenizer=meta['tokenizer'],
                     vocab_size=meta['vocab_size'], train_path=train_path, train_tokens=train,
                     val_path=val_path, val_tokens=val)


def read_bin_meta(meta_path: str, bin_path: str) -> dict:
  """Reads and checks meta.json; fills the dtype from the vocabulary size when absent."""
  example = '{"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16"}'
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f'{bin_path} has no {meta_path} beside it, so its token ids cannot be interpreted. '
        f'Write one naming the tokenizer and vocabulary, e.g. {example} ("tokenizer" may also '
        'be a path to a sentencepiece .model or a saved lm tokenizer folder).')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{meta_path} is not valid JSON ({e}). Write e.g. {example}.') from None
  if not isinstance(meta, dict):
    raise ValueError(f'{meta_path} must hold a JSON object such as {example}.')
  vocab_size, tokenizer = meta.get('vocab_size'), meta.get('tokenizer')
  if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
    raise ValueError(f'{meta_path}: "vocab_size" must be a positive integer, got '
                     f'{vocab_size!r}. Write e.g. {example}.')
  if not isinstance(tokenizer, str) or not tokenizer:
    raise ValueError(f'{meta_path}: "tokenizer" must name the tokenizer ("byte", or a path to a '
                     f'sentencepiece .model or an lm tokenizer folder), got {tokenizer!r}.')
  dtype = meta.get('dtype', 'uint16' if vocab_size <= 1 << 16 else 'uint32')
  if dtype not in ('uint16', 'uint32'):
    raise ValueError(f'{meta_path}: "dtype" must be "uint16" or "uint32", got {dtype!r}.')
  if np.iinfo(dtype).max + 1 < vocab_size:
    raise ValueError(f'{meta_path} disagrees with itself: dtype {dtype} cannot hold '
                     f'vocab_size={vocab_size} ids. Use "uint32".')
  return dict(meta, dtype=dtype)


def _memmap(path: str, dtype: np.dtype, meta_path: str) -> np.ndarray:
  size = os.path.getsize(path)
  if size % dtype.itemsize:
    raise ValueError(
        f'{path} is {size} bytes, not a whole number of {dtype.name} ids, so it disagrees with '
        f'{meta_path}. Fix "dtype" there or rewrite the file.')
  if size == 0:
    raise ValueError(f'{path} is empty. Write the token ids into it, or point data.corpus '
                     'elsewhere.')
  return np.memmap(path, dtype=dtype, mode='r')


def check_token_ids(tokens_N: np.ndarray, vocab_size: int, path: str, fix: str) -> None:
  """Raises naming the file, position and id of the first token id >= vocab_size."""
  step = 1 << 24
  for begin in range(0, len(tokens_N), step):
    chunk = np.asarray(tokens_N[begin:begin + step])
    if chunk.size and int(chunk.max()) >= vocab_size:
      where = int(np.argmax(chunk >= vocab_size))
      raise ValueError(
          f'{path}: token id {int(chunk[where])} at position {begin + where} is outside the '
          f'vocabulary of {vocab_size} ids (0..{vocab_size - 1}). {fix}')
