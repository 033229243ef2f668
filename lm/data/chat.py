"""Chat templates and JSONL examples: conversations -> token ids with an exact response mask.

A template renders a conversation as pieces of text, each either prompt (context the loss
ignores) or response (what the model learns to write). Pieces are tokenized one by one and
concatenated, so the boundary between prompt and response falls exactly between two tokens,
whatever the tokenizer would merge across it.

Templates (data.chat_template):
  builtin   `<|system|>`, `<|user|>`, `<|assistant|>` markers as plain text, each followed by a
            newline; every assistant turn ends with the tokenizer's EOS (so generation stops
            there). Works with any tokenizer that can spell the markers.
  none      the contents concatenated as they are, EOS after each assistant turn: for
            completion-style data ("prompt" "2+2=", "response" "4").
  hf        the Jinja chat template a Hugging Face tokenizer ships (tokenizer_config.json's
            `chat_template`, kept with the tokenizer in DIR/tokenizer/).
  X.jinja   a Jinja template file in the Hugging Face convention.

builtin and none start every example with EOS, the document boundary lm's pretraining puts
before every document (and `lm.sample.generate` before every prompt); Jinja templates add
whatever BOS their model expects themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Iterator, Mapping, Sequence

ROLES = ('system', 'user', 'assistant')
BUILTIN_MARKERS = {'system': '<|system|>\n', 'user': '<|user|>\n', 'assistant': '<|assistant|>\n'}
_SFT_FIELDS = ('{"prompt": "...", "response": "..."} or '
               '{"messages": [{"role": ..., "content": ...}, ...]}')
_PREFERENCE_FIELDS = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
_TASK_FIELDS = '{"prompt": "...", "answer": "..."}'

Message = Mapping[str, str]  # {"role": one of ROLES, "content": text}


@dataclasses.dataclass(frozen=True)
class Piece:
  """Text that is all prompt or all response; `eos` stands for the tokenizer's EOS id."""

  text: str
  response: bool
  eos: bool = False


# ---------------------------------------------------------------------------------------------
# Templates.


class Template:
  """Renders conversations into prompt and response pieces."""

  name = ''

  def conversation(self, messages: Sequence[Message]) -> list[Piece]:
    """Every assistant message is a response; everything else is prompt."""
    raise NotImplementedError

  def prompt(self, messages: Sequence[Message]) -> list[Piece]:
    """The conversation so far plus what cues the assistant's answer (for generation)."""
    raise NotImplementedError


class BuiltinTemplate(Template):
  """Plain-text role markers; EOS ends each assistant turn."""

  name = 'builtin'

  def conversation(self, messages: Sequence[Message]) -> list[Piece]:
    pieces = [Piece('', False, eos=True)]
    for m in messages:
      marker = BUILTIN_MARKERS[m['role']]
      if m['role'] == 'assistant':
        pieces += [Piece(marker, False), Piece(m['content'], True), Piece('', True, eos=True)]
      else:
        pieces.append(Piece(marker + m['content'] + '\n', False))
    return pieces

  def prompt(self, messages: Sequence[Message]) -> list[Piece]:
    return self.conversation(messages) + [Piece(BUILTIN_MARKERS['assistant'], False)]


class PlainTemplate(Template):
  """Contents as they are: completion data needs no markers."""

  name = 'none'

  def conversation(self, messages: Sequence[Message]) -> list[Piece]:
    pieces = [Piece('', False, eos=True)]
    for m in messages:
      if m['role'] == 'assistant':
        pieces += [Piece(m['content'], True), Piece('', True, eos=True)]
      else:
        pieces.append(Piece(m['content'], False))
    return pieces

  def prompt(self, messages: Sequence[Message]) -> list[Piece]:
    return self.conversation(messages)


class JinjaTemplate(Template):
  """A Hugging Face style Jinja chat template.

  The pieces come from rendering growing prefixes of the conversation: the text an assistant
  message adds (with its end-of-turn marker) is response, the rest prompt. A template that
  renders a prefix differently from the start of the whole conversation is an error.
  """

  def __init__(self, source: str, name: str, bos_token: str = '', eos_token: str = ''):
    try:
      import jinja2  # pylint: disable=g-import-not-at-top (optional: Jinja templates only)
      from jinja2 import ext as jinja2_ext  # pylint: disable=g-import-not-at-top
      from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'data.chat_template={name} needs the jinja2 package: pip install '
                        '"lm[hf]" (or jinja2), or use data.chat_template=builtin.') from None

    class Generation(jinja2_ext.Extension):
      """{% generation %}: transformers' assistant-mask marker; the prefixes find the mask."""

      tags = {'generation'}

      def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

      def _body(self, caller):
        return caller()

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2_ext.loopcontrols, Generation])
    env.filters['tojson'] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, **kw)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f'data.chat_template={name}: the template does not parse ({e}). Fix it, '
                       'or use data.chat_template=builtin.') from None
    self._errors = jinja2.exceptions.TemplateError
    self.name, self.bos_token, self.eos_token = name, bos_token, eos_token

  def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
    except self._errors as e:
      raise ValueError(f'data.chat_template={self.name} fails on this conversation: {e}') from None

  def conversation(self, messages: Sequence[Message]) -> list[Piece]:
    pieces, done = [], ''
    for i, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      after = self.render(messages[:i + 1], add_generation_prompt=False)
      self._check_prefix(done, before)
      self._check_prefix(before, after)
      pieces += [Piece(before[len(done):], False), Piece(after[len(before):], True)]
      done = after
    whole = self.render(messages, add_generation_prompt=False)
    self._check_prefix(done, whole)
    return pieces + [Piece(whole[len(done):], False)]

  def prompt(self, messages: Sequence[Message]) -> list[Piece]:
    return [Piece(self.render(messages, add_generation_prompt=True), False)]

  def _check_prefix(self, prefix: str, text: str) -> None:
    if not text.startswith(prefix):
      raise ValueError(
          f'data.chat_template={self.name} renders a conversation differently from its start '
          f'({prefix[-60:]!r} is not continued by {text[:len(prefix)][-60:]!r}), so the '
          'response tokens cannot be told apart. Use a template whose turns only append '
          '(most do), or data.chat_template=builtin.')


def load_template(name: str, tokenizer: Any) -> Template:
  """The template data.chat_template names, for this tokenizer."""
  if name == 'builtin':
    return BuiltinTemplate()
  if name == 'none':
    return PlainTemplate()
  if name == 'hf':
    source = getattr(tokenizer, 'chat_template', None)
    if not source:
      raise ValueError(
          f'data.chat_template=hf: the {tokenizer.name} tokenizer ships no chat template (a '
          'Hugging Face tokenizer_config.json "chat_template", kept in DIR/tokenizer/). Use '
          'data.chat_template=builtin, none, or a .jinja file.')
  else:
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'data.chat_template={name!r}: no such file. Point it at a Jinja '
                              'chat template, or use builtin, hf or none.')
    with open(path, encoding='utf-8') as f:
      source = f.read()
  return JinjaTemplate(source, name, bos_token=_token_text(tokenizer, tokenizer.bos_id),
                       eos_token=_token_text(tokenizer, tokenizer.eos_id))


def _token_text(tokenizer: Any, token_id: int | None) -> str:
  """How a template spells a special token: '<s>', not the '' sentencepiece decodes it to."""
  if token_id is None:
    return ''
  processor = getattr(tokenizer, 'processor', None)  # sentencepiece
  return processor.id_to_piece(token_id) if processor else tokenizer.decode([token_id])


# ---------------------------------------------------------------------------------------------
# Tokenizing.


def encode(tokenizer: Any, pieces: Sequence[Piece],
           special: Mapping[str, int] | None = None) -> tuple[list[int], list[bool]]:
  """(ids, response mask per id): each piece tokenized on its own, then concatenated.

  `special` maps token texts (a Jinja template's bos_token and eos_token) to their ids, so a
  sentencepiece model, which would spell '</s>' out, still gets the one special id.
  """
  ids, mask = [], []
  for piece in pieces:
    piece_ids = [tokenizer.eos_id] if piece.eos else _encode_text(tokenizer, piece.text, special)
    ids += piece_ids
    mask += [piece.response] * len(piece_ids)
  return ids, mask


def prompt_ids(tokenizer: Any, template: Template, messages: Sequence[Message]) -> list[int]:
  """The conversation so far and the assistant's cue, as token ids (for generation)."""
  return encode(tokenizer, template.prompt(messages), special_tokens(template, tokenizer))[0]


def special_tokens(template: Template, tokenizer: Any) -> dict[str, int]:
  """Token texts that a Jinja template writes for special ids (bos_token, eos_token)."""
  if not isinstance(template, JinjaTemplate):
    return {}
  pairs = ((template.bos_token, tokenizer.bos_id), (template.eos_token, tokenizer.eos_id))
  return {text: i for text, i in pairs if text and i is not None}


def _encode_text(tokenizer: Any, text: str, special: Mapping[str, int] | None) -> list[int]:
  if not text:
    return []
  for token, token_id in (special or {}).items():
    if token in text:
      head, _, tail = text.partition(token)
      return (_encode_text(tokenizer, head, special) + [token_id]
              + _encode_text(tokenizer, tail, special))
  return tokenizer.encode(text)


# ---------------------------------------------------------------------------------------------
# JSONL examples.


def read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """('PATH:LINE', object) per non-blank line; a line that is not a JSON object is an error."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file. Point it at a JSONL file (one JSON object '
                            'per line).')
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{where} is not valid JSON ({e}). Write one JSON object per line.'
                         ) from None
      if not isinstance(record, dict):
        raise ValueError(f'{where} holds {type(record).__name__}, not a JSON object.')
      yield where, record


def sft_messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """An SFT example as a conversation that ends with the assistant's message."""
  if 'messages' in record:
    messages = _messages(record['messages'], where, 'messages')
  elif 'prompt' in record and 'response' in record:
    messages = _prompt_messages(record['prompt'], where) + [
        {'role': 'assistant', 'content': _text(record, 'response', where)}]
  else:
    raise ValueError(f'{where}: an SFT example needs {_SFT_FIELDS}; this one has the keys '
                     f'{sorted(record)}.')
  if not messages or messages[-1]['role'] != 'assistant':
    raise ValueError(f'{where}: the last message must be the assistant\'s (the response the '
                     'model learns); add it or drop the trailing messages.')
  return messages


def preference_example(record: Mapping[str, Any],
                       where: str) -> tuple[list[dict[str, str]], str, str]:
  """(prompt conversation, chosen response, rejected response)."""
  missing = [k for k in ('prompt', 'chosen', 'rejected') if k not in record]
  if missing:
    raise ValueError(f'{where}: a preference example needs {_PREFERENCE_FIELDS}; "{missing[0]}"'
                     f' is missing (keys: {sorted(record)}).')
  return (_prompt_messages(record['prompt'], where), _text(record, 'chosen', where),
          _text(record, 'rejected', where))


def task_example(record: Mapping[str, Any], where: str) -> tuple[list[dict[str, str]], str]:
  """(prompt conversation, expected answer) of an eval.task line."""
  missing = [k for k in ('prompt', 'answer') if k not in record]
  if missing:
    raise ValueError(f'{where}: an eval.task example needs {_TASK_FIELDS}; "{missing[0]}" is '
                     f'missing (keys: {sorted(record)}).')
  return _prompt_messages(record['prompt'], where), _text(record, 'answer', where)


def _prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
  """A prompt is a user message's text, or the conversation so far (a list of messages)."""
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}]
  messages = _messages(prompt, where, 'prompt')
  if messages and messages[-1]['role'] == 'assistant':
    raise ValueError(f'{where}: "prompt" ends with an assistant message; the response is '
                     'the next one. Move it to the response field.')
  return messages


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise ValueError(f'{where}: "{key}" must be a non-empty list of {{"role", "content"}} '
                     f'objects, got {value!r:.80}.')
  messages = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(
        m.get('content'), str):
      raise ValueError(f'{where}: "{key}"[{i}] must be {{"role": one of {", ".join(ROLES)}, '
                       f'"content": a string}}, got {m!r:.80}.')
    messages.append({'role': m['role'], 'content': m['content']})
  return messages


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise ValueError(f'{where}: "{key}" must be a string, got {type(value).__name__}.')
  return value
