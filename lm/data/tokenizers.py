"""Tokenizers: sentencepiece (trained here or loaded), bytes, characters, Hugging Face's.

All share one small interface and save themselves into a folder (tokenizer.json plus the model
file), so eval, sample and inspect decode with exactly the tokenizer a model was trained with.
Each has an EOS id that no text encodes to: it ends every document. A Hugging Face checkpoint
directory brings its own tokenizer: tokenizer.json (the `tokenizers` package, the optional
`lm[hf]` extra) or tokenizer.model (sentencepiece).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from lm.data import cache

TOKENIZER_JSON = 'tokenizer.json'
SP_MODEL = 'sentencepiece.model'
HF_JSON = 'hf_tokenizer.json'  # a Hugging Face tokenizer.json, as saved into lm's folder
# What a Hugging Face checkpoint directory holds: a fast tokenizer's JSON (the same file name
# as lm's own spec, told apart by its content), a sentencepiece model, and special tokens.
HF_TOKENIZER_JSON = 'tokenizer.json'
HF_SP_MODEL = 'tokenizer.model'
# A chat template (Jinja, as Hugging Face tokenizers ship one), kept beside the tokenizer.
CHAT_TEMPLATE = 'chat_template.jinja'
_HF_SPECIAL_SOURCES = ('tokenizer_config.json', 'config.json', 'generation_config.json')
_FORMAT = 1
_SP_SENTENCE_CHARS = 2000  # sentencepiece trains on runs of whole lines up to this long
_SP_THREADS = 2  # fixed, not per machine, so a trained tokenizer is the same everywhere


class Tokenizer(abc.ABC):
  """Text <-> ids. `encode_bytes` takes any bytes where the tokenizer can (byte, sentencepiece)."""

  kind: str = ''
  chat_template: str | None = None  # a Hugging Face checkpoint's Jinja chat template

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int | None:
    return None

  @property
  def pad_id(self) -> int:
    return self.eos_id

  @property
  def name(self) -> str:
    return f'{self.kind}-{self.vocab_size}'

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; an id outside the vocabulary (a model's padding row) gives U+FFFD."""
    return ''.join(self._decode_parts(ids, self._decode_known, '\ufffd'))

  @abc.abstractmethod
  def encode_bytes(self, data: bytes) -> list[int]:
    ...

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    return b''.join(self._decode_parts(ids, self._decode_known_bytes, '\ufffd'.encode()))

  @abc.abstractmethod
  def _decode_known(self, ids: list[int]) -> str:
    ...

  @abc.abstractmethod
  def _decode_known_bytes(self, ids: list[int]) -> bytes:
    ...

  def _decode_parts(self, ids: Iterable[int], decode: Any, replacement: Any) -> list[Any]:
    parts, run = [], []
    for i in ids:
      if 0 <= int(i) < self.vocab_size:
        run.append(int(i))
      else:
        parts += [decode(run), replacement]
        run = []
    return parts + [decode(run)]

  def encode_batch(self, chunks: Sequence[bytes]) -> list[np.ndarray]:
    """Encodes many byte chunks; subclasses make it fast."""
    return [np.asarray(self.encode_bytes(c), dtype=np.int64) for c in chunks]

  def bytes_per_token(self, text: str) -> float:
    """UTF-8 bytes per token on `text`: turns a loss per token into bits per byte."""
    ids = self.encode(text)
    if not ids:
      raise ValueError('bytes_per_token needs a non-empty text.')
    return len(text.encode('utf-8', 'surrogatepass')) / len(ids)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json (+ model file) atomically, replacing what `directory` held."""
    with cache.atomic_directory(directory, replace=True) as tmp:
      for filename, content in self._files().items():
        with open(os.path.join(tmp, filename), 'wb') as f:
          f.write(content)
      cache.write_json(os.path.join(tmp, TOKENIZER_JSON), self._spec())
      if self.chat_template:  # not in _files(): the template decides no id of the corpus
        with open(os.path.join(tmp, CHAT_TEMPLATE), 'w', encoding='utf-8') as f:
          f.write(self.chat_template)

  @property
  def fingerprint(self) -> str:
    """Digest of everything that decides the ids: part of the token cache's key."""
    digest = hashlib.sha256(json.dumps(self._spec(), sort_keys=True).encode())
    for filename, content in sorted(self._files().items()):
      digest.update(filename.encode() + b'\0' + content)
    return digest.hexdigest()

  def _spec(self) -> dict[str, Any]:
    return {'format': _FORMAT, 'kind': self.kind, 'name': self.name,
            'vocab_size': self.vocab_size, 'eos_id': self.eos_id, 'bos_id': self.bos_id,
            'pad_id': self.pad_id}

  def _files(self) -> dict[str, bytes]:
    return {}

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name})'


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, and EOS = 256. Takes any byte sequence."""

  kind = 'byte'

  @property
  def vocab_size(self) -> int:
    return 257

  @property
  def eos_id(self) -> int:
    return 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8', 'surrogateescape'))

  def _decode_known(self, ids: list[int]) -> str:
    return self._decode_known_bytes(ids).decode('utf-8', 'replace')

  def encode_bytes(self, data: bytes) -> list[int]:
    return list(data)

  def _decode_known_bytes(self, ids: list[int]) -> bytes:
    return bytes(i for i in ids if i < 256)

  def encode_batch(self, chunks: Sequence[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(c, dtype=np.uint8) for c in chunks]


class CharTokenizer(Tokenizer):
  """EOS = 0, then one id per character of the corpus (sorted). UTF-8 text only."""

  kind = 'char'

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
      raise ValueError('CharTokenizer needs distinct characters in sorted order.')
    self._chars = chars
    self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
    seen = set()
    for text in texts:
      seen.update(text)
    return cls(''.join(sorted(seen)))

  @property
  def chars(self) -> str:
    return self._chars

  @property
  def vocab_size(self) -> int:
    return 1 + len(self._chars)

  @property
  def eos_id(self) -> int:
    return 0

  def encode(self, text: str) -> list[int]:
    return self._encode_array(text).tolist()

  def _decode_known(self, ids: list[int]) -> str:
    return ''.join(self._chars[i - 1] for i in ids if i > 0)

  def encode_bytes(self, data: bytes) -> list[int]:
    return self.encode(data.decode('utf-8'))

  def _decode_known_bytes(self, ids: list[int]) -> bytes:
    return self._decode_known(ids).encode('utf-8', 'surrogatepass')

  def encode_batch(self, chunks: Sequence[bytes]) -> list[np.ndarray]:
    return [self._encode_array(c.decode('utf-8')) for c in chunks]

  def _encode_array(self, text: str) -> np.ndarray:
    codes_N = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype='<u4')
    index_N = np.searchsorted(self._codes, codes_N).clip(0, max(len(self._codes) - 1, 0))
    known_N = self._codes[index_N] == codes_N if len(self._codes) else codes_N != codes_N
    if not known_N.all():
      char = chr(int(codes_N[np.argmin(known_N)]))
      raise ValueError(
          f'Character {char!r} is not in the char tokenizer\'s vocabulary, which holds the '
          f'{len(self._chars)} characters of its training corpus. Remove it from the text, or '
          'use --config.data.tokenizer=byte or sentencepiece, which take any text.')
    return index_N.astype(np.int64) + 1

  def _spec(self) -> dict[str, Any]:
    return dict(super()._spec(), chars=self._chars)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; with byte fallback (as trained here) every byte sequence round-trips."""

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes, source: str, name: str = ''):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise ValueError(
          f'{source} is not a valid sentencepiece model ({str(e).strip()}). For '
          'data.tokenizer_path, point it at a .model written by sentencepiece; for a run\'s '
          'saved tokenizer, restore it from a copy (a model only works with its own).') from None
    if self._sp.eos_id() < 0:
      raise ValueError(
          f'{source} defines no EOS piece, which lm needs to mark document ends. Train the '
          'model with an eos_id, or leave data.tokenizer_path empty to train one.')
    self._name = name or f'sentencepiece-{self._sp.get_piece_size()}'
    byte_ids = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in range(256)]
    self._byte_ids = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None
    self._byte_of_id = {i: b for b, i in enumerate(byte_ids)} if self._byte_ids else {}

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int | None:
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  @property
  def name(self) -> str:
    return self._name

  @property
  def byte_fallback(self) -> bool:
    return self._byte_ids is not None

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    return self._sp

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def _decode_known(self, ids: list[int]) -> str:
    return self._sp.decode(ids) if ids else ''

  def encode_bytes(self, data: bytes) -> list[int]:
    """Valid UTF-8 runs go through the model; invalid bytes become byte-fallback pieces."""
    ids, rest = [], data
    while rest:
      try:
        return ids + self.encode(rest.decode('utf-8'))
      except UnicodeDecodeError as e:
        ids += self.encode(rest[:e.start].decode('utf-8'))
        bad = rest[e.start:e.end]
        ids += ([self._byte_ids[b] for b in bad] if self._byte_ids
                else self.encode(bad.decode('utf-8', 'replace')))
        rest = rest[e.end:]
    return ids

  def _decode_known_bytes(self, ids: list[int]) -> bytes:
    """Byte pieces give their byte even where they do not form UTF-8; other runs decode as text."""
    out, run = [], []
    for i in ids:
      if run and (i in self._byte_of_id) != (run[0] in self._byte_of_id):
        out.append(self._decode_run(run))
        run = []
      run.append(i)
    out.append(self._decode_run(run))
    return b''.join(out)

  def _decode_run(self, run: list[int]) -> bytes:
    if run and run[0] in self._byte_of_id:
      return bytes(self._byte_of_id[i] for i in run)
    return self._sp.decode(run).encode('utf-8') if run else b''

  def encode_batch(self, chunks: Sequence[bytes]) -> list[np.ndarray]:
    texts, invalid = [], {}
    for k, chunk in enumerate(chunks):
      try:
        texts.append(chunk.decode('utf-8'))
      except UnicodeDecodeError:
        texts.append('')
        invalid[k] = self.encode_bytes(chunk)
    ids = self._sp.encode(texts, num_threads=os.cpu_count() or 1)
    return [np.asarray(invalid.get(k, i), dtype=np.int64) for k, i in enumerate(ids)]

  def _spec(self) -> dict[str, Any]:
    return dict(super()._spec(), byte_fallback=self.byte_fallback)

  def _files(self) -> dict[str, bytes]:
    return {SP_MODEL: self._proto}


class HFTokenizer(Tokenizer):
  """A Hugging Face fast tokenizer (tokenizer.json) through the optional `tokenizers` package.

  encode() adds no special tokens (BOS, templates): lm marks document ends with EOS itself.
  """

  kind = 'hf'

  def __init__(self, tokenizer_json: bytes, source: str, eos_id: int, bos_id: int | None = None,
               pad_id: int | None = None):
    try:
      import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top (optional)
    except ImportError:
      raise ImportError(
          f'{source} needs the `tokenizers` package: pip install "lm[hf]" (or the tokenizers '
          'version pinned in requirements.lock).') from None
    try:
      self._tokenizer = hf_tokenizers.Tokenizer.from_str(tokenizer_json.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except (tokenizers raises plain Exception)
      raise ValueError(f'{source} is not a valid Hugging Face tokenizer.json ({e}). Download it '
                       'again.') from None
    self._json = tokenizer_json
    for name, i in (('EOS', eos_id), ('BOS', bos_id), ('padding', pad_id)):
      if i is not None and not 0 <= i < self.vocab_size:
        raise ValueError(f'{source}: the {name} id {i} is outside its {self.vocab_size} ids. '
                         'Fix the special token ids in the checkpoint\'s config files.')
    self._eos, self._bos, self._pad = eos_id, bos_id, pad_id

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def pad_id(self) -> int:
    return self.eos_id if self._pad is None else self._pad

  @property
  def name(self) -> str:
    return f'hf-{self.vocab_size}'

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def _decode_known(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=False)

  def encode_bytes(self, data: bytes) -> list[int]:
    return self.encode(data.decode('utf-8'))

  def _decode_known_bytes(self, ids: list[int]) -> bytes:
    return self._decode_known(ids).encode('utf-8', 'surrogatepass')

  def encode_batch(self, chunks: Sequence[bytes]) -> list[np.ndarray]:
    encodings = self._tokenizer.encode_batch([c.decode('utf-8') for c in chunks],
                                             add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

  def _files(self) -> dict[str, bytes]:
    return {HF_JSON: self._json}


# ---------------------------------------------------------------------------------------------
# Training sentencepiece.


def sentencepiece_options(vocab_size: int, model_type: str) -> dict[str, Any]:
  """Trainer options. Identity normalisation and no dummy prefix so that text round-trips
  exactly (code keeps its whitespace); byte fallback so that any byte sequence does."""
  return dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
      character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      max_sentence_length=4 * _SP_SENTENCE_CHARS + 16, input_sentence_size=0,
      seed_sentencepiece_size=200_000,  # unigram: a third faster than 1M, same compression
      shuffle_input_sentence=False, num_threads=_SP_THREADS, minloglevel=2)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str,
                        description: str) -> SentencePieceTokenizer:
  """Trains on `texts` (already sampled down to data.sp_train_chars)."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(texts), model_writer=model,
                                   **sentencepiece_options(vocab_size, model_type))
  except RuntimeError as e:
    raise ValueError(
        f'data.vocab_size={vocab_size}: sentencepiece could not train a {model_type} model on '
        f'{description} ({str(e).strip()}). It needs more than 260 ids (256 byte pieces and 4 '
        'specials) plus one per distinct character, and enough text to learn the rest: '
        'change --config.data.vocab_size, or use a larger corpus.') from None
  return SentencePieceTokenizer(model.getvalue(), description,
                                name=f'sentencepiece-{model_type}-{vocab_size}')


def sample_text(texts: Iterable[str], total_chars: int, max_chars: int) -> Iterator[str]:
  """Keeps an evenly spread `max_chars / total_chars` share of the texts, deterministically."""
  share, credit, kept = min(1.0, max_chars / max(total_chars, 1)), 0.0, 0
  for text in texts:
    credit += share * len(text)
    if credit >= len(text) * 0.5 and kept < max_chars:
      credit -= len(text)
      kept += len(text)
      yield text


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  """Runs of whole lines up to _SP_SENTENCE_CHARS, newlines kept so pieces can learn them."""
  for text in texts:
    run, size = [], 0
    for line in text.splitlines(keepends=True):
      while len(line) > _SP_SENTENCE_CHARS:  # one very long line: cut it
        yield line[:_SP_SENTENCE_CHARS]
        line = line[_SP_SENTENCE_CHARS:]
      if size + len(line) > _SP_SENTENCE_CHARS and run:
        yield ''.join(run)
        run, size = [], 0
      run.append(line)
      size += len(line)
    if run:
      yield ''.join(run)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a saved tokenizer from a workdir, its tokenizer/ folder, a sentencepiece .model, or
  a Hugging Face checkpoint directory (see load_hf_tokenizer)."""
  path = os.path.expanduser(path)
  if os.path.isfile(path) and not path.endswith('.json'):
    with open(path, 'rb') as f:
      return SentencePieceTokenizer(f.read(), path)
  folder = os.path.dirname(path) if path.endswith('.json') else path
  if os.path.isfile(os.path.join(folder, 'tokenizer', TOKENIZER_JSON)):
    folder = os.path.join(folder, 'tokenizer')
  if has_hf_tokenizer(folder):
    return load_hf_tokenizer(folder)
  spec_path = os.path.join(folder, TOKENIZER_JSON)
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(
        f'No tokenizer at {path}: expected {os.path.join(path, "tokenizer", TOKENIZER_JSON)} '
        '(written by training into its workdir), a sentencepiece .model or a Hugging Face '
        'checkpoint directory. Pass the workdir of a trained run, or train first.')
  try:
    with open(spec_path) as f:
      spec = json.load(f)
    kind = spec['kind']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{spec_path} is corrupt ({e!r}). Restore it from the run that wrote it; '
                     'a model only works with the tokenizer it was trained with.') from None
  tokenizer = _from_spec(kind, spec, folder, spec_path)
  if spec.get('vocab_size') != tokenizer.vocab_size:
    raise ValueError(f'{spec_path} says vocab_size={spec.get("vocab_size")} but its model has '
                     f'{tokenizer.vocab_size} ids: the folder is corrupt. Restore it from the '
                     'run that wrote it.')
  tokenizer.chat_template = _read_chat_template(folder)
  return tokenizer


def _read_chat_template(folder: str, config: dict[str, Any] | None = None) -> str | None:
  """chat_template.jinja in `folder`, else tokenizer_config.json's "chat_template" (`config`):
  a string, or a list of {"name", "template"} of which "default" is the one used."""
  path = os.path.join(folder, CHAT_TEMPLATE)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  template = (config or {}).get('chat_template')
  if isinstance(template, list):
    template = next((t.get('template') for t in template
                     if isinstance(t, dict) and t.get('name') == 'default'), None)
  return template if isinstance(template, str) and template else None


def _read_beside(folder: str, name: str, spec_path: str) -> tuple[str, bytes]:
  """(path, bytes) of a tokenizer file that the spec at `spec_path` says lies beside it."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing beside {spec_path}. Restore the tokenizer folder '
                            'from the run that wrote it.')
  with open(path, 'rb') as f:
    return path, f.read()


def _from_spec(kind: str, spec: dict[str, Any], folder: str, spec_path: str) -> Tokenizer:
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    if not isinstance(spec.get('chars'), str):
      raise ValueError(f'{spec_path} lacks the "chars" of its char tokenizer: it is corrupt.')
    return CharTokenizer(spec['chars'])
  if kind == 'sentencepiece':
    model_path, model = _read_beside(folder, SP_MODEL, spec_path)
    return SentencePieceTokenizer(model, model_path, name=spec.get('name', ''))
  if kind == 'hf':
    json_path, text = _read_beside(folder, HF_JSON, spec_path)
    return HFTokenizer(text, json_path, eos_id=spec['eos_id'], bos_id=spec['bos_id'],
                       pad_id=spec['pad_id'])
  raise ValueError(f'{spec_path} names an unknown tokenizer kind {kind!r}; expected byte, char, '
                   'sentencepiece or hf.')


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints.


def has_hf_tokenizer(directory: str) -> bool:
  """Whether `directory` holds a Hugging Face tokenizer (not lm's own saved folder)."""
  if os.path.isfile(os.path.join(directory, HF_SP_MODEL)):
    return True
  json_path = os.path.join(directory, HF_TOKENIZER_JSON)
  if not os.path.isfile(json_path):
    return False
  try:
    with open(json_path, 'rb') as f:
      spec = json.load(f)
  except (OSError, ValueError):
    return False  # reported by whichever loader reads it
  return isinstance(spec, dict) and 'kind' not in spec and 'model' in spec


def load_hf_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer of a Hugging Face checkpoint directory.

  tokenizer.json (the fast tokenizer transformers uses by default) when present, else
  tokenizer.model (sentencepiece, as Llama 1/2 and Mistral ship it). EOS, BOS and padding come
  from tokenizer_config.json's tokens, else from config.json's (or generation_config.json's) ids.
  """
  json_path = os.path.join(directory, HF_TOKENIZER_JSON)
  sp_path = os.path.join(directory, HF_SP_MODEL)
  if os.path.isfile(json_path):
    with open(json_path, 'rb') as f:
      content = f.read()
    try:
      spec = json.loads(content)
    except ValueError as e:
      raise ValueError(f'{json_path} is not valid JSON ({e}). Download it again.') from None
    ids = {name: _hf_special_id(directory, spec, name) for name in ('eos', 'bos', 'pad')}
    if ids['eos'] is None:
      raise ValueError(
          f'{directory} names no EOS token (no eos_token in tokenizer_config.json, no '
          'eos_token_id in config.json or generation_config.json), which lm needs to mark '
          'document ends. Add "eos_token_id": ID to config.json.')
    tokenizer = HFTokenizer(content, json_path, eos_id=ids['eos'], bos_id=ids['bos'],
                            pad_id=ids['pad'])
  elif os.path.isfile(sp_path):
    with open(sp_path, 'rb') as f:
      tokenizer = SentencePieceTokenizer(f.read(), sp_path)
  else:
    raise FileNotFoundError(
        f'{directory} holds no tokenizer ({HF_TOKENIZER_JSON} or {HF_SP_MODEL}). Copy the '
        'tokenizer files of the model into it.')
  config_path = os.path.join(directory, 'tokenizer_config.json')
  tokenizer.chat_template = _read_chat_template(
      directory, _read_json_object(config_path) if os.path.isfile(config_path) else None)
  return tokenizer


def _read_json_object(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}). Download it again.') from None
  return values if isinstance(values, dict) else {}


def _hf_special_id(directory: str, spec: dict[str, Any], name: str) -> int | None:
  """The id of the `name` ('eos', 'bos', 'pad') token, from the first file that names it."""
  for filename in _HF_SPECIAL_SOURCES:
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
      continue
    values = _read_json_object(path)
    token = values.get(f'{name}_token')
    if isinstance(token, dict):  # an AddedToken: {"content": "</s>", ...}
      token = token.get('content')
    if isinstance(token, str) and (i := _hf_token_id(spec, token)) is not None:
      return i
    i = values.get(f'{name}_token_id')
    if isinstance(i, list):  # several stop tokens: the first ends documents
      i = i[0] if i else None
    if isinstance(i, int):
      return i
  return None


def _hf_token_id(spec: dict[str, Any], token: str) -> int | None:
  """A token's id in a tokenizer.json: its added tokens, then its model's vocabulary."""
  for added in spec.get('added_tokens') or []:
    if added.get('content') == token:
      return added.get('id')
  vocab = (spec.get('model') or {}).get('vocab')
  if isinstance(vocab, dict):  # BPE, WordPiece
    return vocab.get(token)
  if isinstance(vocab, list):  # Unigram: [piece, score] pairs
    return next((i for i, (piece, _) in enumerate(vocab) if piece == token), None)
  return None
