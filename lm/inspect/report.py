"""Token strings, the report folder's name, the next-token table and index.md.

Tokens are shown as the text they stand for, with whitespace made visible ('␣' for a space,
'\\n' for a newline) so that ' the' and 'the' are told apart; special tokens as <eos>/<bos>,
and ids past the tokenizer (the padding rows of a rounded-up vocabulary) as <unused N>.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SLUG_CHARS = 48


def _special(tokenizer: Any, token_id: int) -> str | None:
  if token_id == tokenizer.eos_id:
    return '<eos>'
  if token_id == tokenizer.bos_id:
    return '<bos>'
  if not 0 <= token_id < tokenizer.vocab_size:
    return f'<unused {token_id}>'
  return None


def token_text(tokenizer: Any, token_id: int) -> str:
  """The raw text of one token (its leading space kept), or <eos>/<bos>/<unused N>."""
  token_id = int(token_id)
  if (special := _special(tokenizer, token_id)) is not None:
    return special
  processor = getattr(tokenizer, 'processor', None)
  if processor is not None:  # sentencepiece drops a lone piece's leading space when decoding
    if processor.is_byte(token_id) or processor.is_control(token_id):
      return processor.id_to_piece(token_id)
    return processor.id_to_piece(token_id).replace('\u2581', ' ')
  return tokenizer.decode_bytes([token_id]).decode('utf-8', 'backslashreplace')


def show(text: str) -> str:
  """`text` with whitespace and control characters visible, for labels and tables."""
  return ''.join('␣' if ch == ' ' else ch if ch.isprintable() else repr(ch)[1:-1]
                 for ch in text)


def label(tokenizer: Any, token_id: int) -> str:
  """A token as shown in pictures and tables."""
  return _special(tokenizer, int(token_id)) or show(token_text(tokenizer, token_id))


def plain_tokens(tokenizer: Any, limit: int) -> list[int]:
  """The first `limit` ids that stand for printable text (no specials, bytes or controls).

  Sentencepiece BPE numbers its pieces roughly by merge order, so these are among the most
  frequent; for byte and char tokenizers they are the printable characters.
  """
  processor = getattr(tokenizer, 'processor', None)
  special = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id}
  ids = []
  for i in range(tokenizer.vocab_size):
    if len(ids) == limit:
      break
    if i in special or (processor is not None and (
        processor.is_byte(i) or processor.is_control(i) or processor.is_unknown(i))):
      continue
    try:
      text = tokenizer.decode_bytes([i]).decode('utf-8') if processor is None else (
          token_text(tokenizer, i))
    except UnicodeDecodeError:  # a byte that is only part of a character
      continue
    if text.strip() and text.isprintable():
      ids.append(i)
  return ids


def resolve_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
  """The ids of the single tokens named by `texts` (--tokens), with errors that suggest one."""
  ids = []
  for text in texts:
    if not text:
      raise ValueError('--tokens holds an empty entry; pass comma-separated tokens, e.g. '
                       '--tokens=the,cat (a leading space is part of a token: " cat").')
    found = tokenizer.encode(text)
    if len(found) != 1:
      pieces = ', '.join(repr(token_text(tokenizer, i)) for i in found)
      spaced = [' ' + text, text.strip()]
      singles = [s for s in spaced if s != text and len(tokenizer.encode(s)) == 1]
      hint = (f' {singles[0]!r} is one token: try that.' if singles
              else ' Pick a token from the embedding plot or next-token tables of the report.')
      raise ValueError(f'--tokens: {text!r} is not a token of this tokenizer '
                       f'({tokenizer.name}): it encodes to {len(found)} tokens ({pieces}).{hint}')
    ids.append(found[0])
  return ids


def slug(prompt: str) -> str:
  """The report's folder name: the prompt's words joined by '-', plus a short hash where
  that loses something (case, punctuation, length), so different prompts never share one."""
  words = re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')
  name = words[:SLUG_CHARS].strip('-') or 'prompt'
  if name.replace('-', ' ') != prompt:
    name += '-' + hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]
  return name


def next_token_table(data: Mapping[str, Any], name: Callable[[int], str],
                     rows: int = 10) -> str:
  """The headline: the most likely tokens after the prompt, as aligned text.

  `name` labels a token id (`label` with the tokenizer).
  """
  top = data['next_token']
  lines = [f'Next token after {data["prompt"]!r}:']
  for rank, (i, p) in enumerate(zip(top['top_ids'][-1][:rows], top['top_probs'][-1][:rows])):
    lines.append(f'  {rank + 1:>2}  {p:7.2%}  {name(i)}')
  return '\n'.join(lines)


def _md(text: str) -> str:
  """A token label inside a Markdown table cell."""
  return '`' + text.replace('`', 'ˋ').replace('|', '¦') + '`'


def markdown(data: Mapping[str, Any], images: Mapping[str, Any],
             label_of: Callable[[int], str]) -> str:
  """index.md: every table and picture of the report, in reading order."""
  name = lambda i: _md(label_of(i))
  m = data['model']
  ids = data['tokens']['ids']
  nt, lens = data['next_token'], data['logit_lens']
  out = [
      f'# Inspect: {data["prompt"]!r}', '',
      f'Model: {data["source"]}. {m["num_layers"]} layers, d_model {m["d_model"]}, '
      f'{m["num_heads"]} query heads over {m["num_kv_heads"]} KV heads, ffn {m["ffn"]}, '
      f'positions {m["pos_emb"]}, vocabulary {m["vocab_size"]}.', '',
      f'Prompt: {len(ids)} tokens, ' + ' '.join(name(i) for i in ids) + '. '
      + (data['cut'] or 'The first is the end-of-document token the model saw before every '
         'document in training.'), '',
      '## Next token', '',
      '| rank | token | probability |', '|---:|---|---:|',
      *(f'| {r + 1} | {name(i)} | {p:.2%} |'
        for r, (i, p) in enumerate(zip(nt['top_ids'][-1], nt['top_probs'][-1]))),
      '', f'![next token]({images["next_token"]})', '',
      '### At every position', '',
      'What the model predicted after each prefix, and the probability and rank it gave the '
      'token that actually came next.', '',
      '| # | input | came next | p(next) | rank | top predictions |',
      '|---:|---|---|---:|---:|---|',
  ]
  for t, i in enumerate(ids):
    came = name(ids[t + 1]) if t + 1 < len(ids) else ''
    prob = '' if nt['next_prob'][t] is None else f'{nt["next_prob"][t]:.2%}'
    rank = '' if not nt['next_rank'][t] else str(nt['next_rank'][t])
    top = ' '.join(f'{name(j)} {p:.0%}'
                   for j, p in zip(nt['top_ids'][t][:5], nt['top_probs'][t][:5]))
    out.append(f'| {t} | {name(i)} | {came} | {prob} | {rank} | {top} |')
  out += [
      '', '## Logit lens', '',
      'The final norm and LM head applied to the residual stream after every layer: the token '
      'each layer would predict and its probability (at the last layer, the model\'s own '
      'output). Row "embeddings" reads the input embeddings themselves.', '',
      f'![logit lens]({images["logit_lens"]})', '',
      'The probability each layer already gives the model\'s final choice after the prompt: '
      + ', '.join(f'{s} {p[-1]:.0%}' for s, p in zip(lens['streams'], lens['final_token_prob']))
      + '.', '',
      f'![residual norms]({images["residual_norms"]})', '',
      '## Attention', '',
      'One map per layer: a heatmap per query head, rows the queries, columns the keys; every '
      'row sums to 1 and later keys are masked (weight 0).'
      + (' Query heads that share a KV head (GQA/MQA) are titled with it.'
         if m['num_kv_heads'] < m['num_heads'] else ''), '',
  ]
  for layer, path in enumerate(images['attention']):
    out += [f'### Layer {layer + 1}', '', f'![attention layer {layer + 1}]({path})', '']
  if 'moe' in images:
    out += ['## MoE routing', '',
            f'The {m["top_k"]} of {m["num_experts"]} experts the router picks for each token in '
            'each layer (before any capacity drops).', '', f'![moe routing]({images["moe"]})',
            '']
  emb = data['embeddings']
  out += ['## Embeddings', '',
          'Nearest neighbours of tokens in the input embedding table (cosine similarity).', '',
          '| token | nearest neighbours |', '|---|---|']
  for i, neighbours, sims in zip(emb['tokens'], emb['neighbours'], emb['similarity']):
    out.append(f'| {name(i)} | ' + ' '.join(f'{name(j)} {s:.2f}'
                                            for j, s in zip(neighbours, sims)) + ' |')
  out += ['', f'![token similarity]({images["token_similarity"]})', '',
          f'![embedding pca]({images["embedding_pca"]})', '',
          'All the numbers behind these pictures are in [data.json](data.json).', '']
  return '\n'.join(out)


def rounded(x: Any, digits: int = 6) -> Any:
  """Arrays as JSON lists (floats rounded, NaN as null)."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating):
    x = np.round(x.astype(np.float64), digits)
    return np.where(np.isnan(x), None, x).tolist()
  return x.tolist()
