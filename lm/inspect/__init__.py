"""`--mode=inspect`: looks inside a model for a prompt, one command instead of a notebook.

`python run.py --config=... --workdir=DIR --mode=inspect --prompt="the cat sat on the"` writes
DIR/inspect/<prompt-slug>/:

  index.md               the report: tables and every picture below, in reading order
  data.json              every number behind the pictures (token ids, with their text)
  next_token.png         the top-k next tokens after the prompt
  logit_lens.png         final norm + LM head on the residual stream after every layer
  residual_norms.png     the residual stream's norm per layer
  attention/layer_NN.png one heatmap per query head (GQA/MQA: titled with its KV head)
  moe_routing.png        MoE models: the experts each token was routed to, per layer
  token_similarity.png   cosine similarity between chosen tokens' embeddings
  embedding_pca.png      2-D PCA of the embeddings of the first plain tokens and the chosen ones

and prints the next-token table. The numbers come from one jitted forward pass of the model as
trained (lm.inspect.capture); a rerun for the same prompt replaces its folder.

Prompts start after an EOS, the document boundary the model saw in training (as in sampling).
`--tokens=a,b,c` chooses the tokens whose embedding neighbours are shown (default: the
prompt's). `--hf=PATH` inspects a Hugging Face checkpoint directory (lm.hf) instead of a
training run's checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
from typing import Any, Sequence

from absl import logging
import numpy as np

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import evaluate as eval_lib
from lm import sample as sample_lib
from lm.inspect import capture as capture_lib
from lm.inspect import plots
from lm.inspect import report

INSPECT_DIR = 'inspect'
TOP_K = 10  # next-token and logit-lens candidates kept per position
NEIGHBOURS = 8  # nearest neighbours per chosen token
PCA_TOKENS = 100  # plain tokens in the embedding scatter (besides the chosen ones)
DEFAULT_CHOSEN = 12  # chosen tokens when --tokens is not given: the prompt's first distinct


def encode_prompt(tokenizer: Any, prompt: str,
                  model_config: lm_config.ModelConfig) -> tuple[list[int], str]:
  """([EOS] + the prompt's ids, cut from the left to the model's context; a note if cut)."""
  if not prompt:
    raise ValueError('--prompt is empty: inspect looks at what a model does with a text. Pass '
                     'one, e.g. --prompt="the cat sat on the".')
  ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
  context = sample_lib.context_length(model_config) or model_config.max_seq_len
  if len(ids) <= context:
    return ids, ''
  cut = (f'The prompt ({len(ids)} tokens) was cut to its last {context} to fit the model\'s '
         f'context (model.max_seq_len={context}).')
  logging.warning(cut)
  return ids[-context:], cut


def inspect_prompt(model_config: lm_config.ModelConfig, params: Any, tokenizer: Any,
                   prompt: str, directory: str, *, tokens: Sequence[str] = (),
                   source: str = '', top_k: int = TOP_K) -> dict[str, Any]:
  """Writes the report for `prompt` into `directory` (replacing it) and returns data.json.

  Args:
    model_config: the model (vocab_size resolved); any attention implementation or layout.
    params: its parameters.
    tokenizer: the tokenizer it was trained with.
    prompt: the text to look at (non-empty).
    directory: the report folder, e.g. DIR/inspect/<slug>.
    tokens: texts of single tokens whose embedding neighbours to show; default the prompt's.
    source: where the model came from, for the report.
    top_k: candidates kept per position for the next-token tables and the logit lens.
  """
  ids, cut = encode_prompt(tokenizer, prompt, model_config)
  prompt_ids = [i for i in ids if i != tokenizer.eos_id]
  chosen = (report.resolve_tokens(tokenizer, tokens) if tokens
            else list(dict.fromkeys(prompt_ids))[:DEFAULT_CHOSEN])
  out = capture_lib.first_row(capture_lib.capture(model_config, params, [ids], top_k))

  table_VxD = np.asarray(params['embed']['embedding'])
  valid_V = np.arange(table_VxD.shape[0]) < tokenizer.vocab_size
  neighbours, similarity, pairs = capture_lib.embedding_neighbours(
      table_VxD, chosen or ids, valid_V, NEIGHBOURS)
  plain = report.plain_tokens(tokenizer, PCA_TOKENS)
  pca_ids = list(dict.fromkeys(plain + prompt_ids + chosen))
  xy, share = capture_lib.pca_2d(table_VxD[pca_ids])

  c = model_config
  streams = ['embeddings'] + [f'layer {i + 1}' for i in range(c.num_layers)]
  group = c.num_heads // c.num_kv_heads
  data = dict(
      prompt=prompt, source=source, cut=cut, model=dataclasses.asdict(c),
      tokens=dict(ids=ids, text=[report.token_text(tokenizer, i) for i in ids]),
      next_token=dict(top_ids=report.rounded(out['top_ids_TxK']),
                      top_probs=report.rounded(out['top_probs_TxK']),
                      next_prob=report.rounded(out['next_prob_T']),
                      next_rank=report.rounded(out['next_rank_T'])),
      logit_lens=dict(streams=streams, top_ids=report.rounded(out['lens_ids_LxTxK']),
                      top_probs=report.rounded(out['lens_probs_LxTxK']),
                      final_token_prob=report.rounded(out['lens_final_prob_LxT']),
                      residual_norm=report.rounded(out['resid_norm_LxT'])),
      attention=dict(kv_head=[n // group for n in range(c.num_heads)],
                     probs=report.rounded(out['attention_LxNxTxS'], 5)),
      embeddings=dict(tokens=chosen or ids, neighbours=report.rounded(neighbours),
                      similarity=report.rounded(similarity), pairwise=report.rounded(pairs),
                      pca=dict(tokens=pca_ids, plain=len(plain), xy=report.rounded(xy),
                               variance_share=report.rounded(share))))
  if c.ffn == 'moe':
    data['moe'] = dict(experts=report.rounded(out['experts_LxTxA']),
                       gates=report.rounded(out['gates_LxTxA']),
                       router_probs=report.rounded(out['router_probs_LxTxE']))
  mentioned = set(ids) | set(pca_ids) | set(np.ravel(neighbours).tolist()) | set(
      np.ravel(out['top_ids_TxK']).tolist()) | set(np.ravel(out['lens_ids_LxTxK']).tolist())
  data['token_text'] = {str(i): report.token_text(tokenizer, i) for i in sorted(mentioned)}
  _write(data, out, directory, tokenizer, prompt_ids + chosen)
  return data


def _write(data: dict[str, Any], out: dict[str, np.ndarray], directory: str, tokenizer: Any,
           highlight: list[int]) -> None:
  """index.md, data.json and the PNGs, into a fresh folder that replaces `directory`;
  `highlight`: the tokens marked in the embedding scatter."""
  from lm.data import cache  # pylint: disable=g-import-not-at-top (heavy package)

  name = lambda i: report.label(tokenizer, i)
  inputs = [name(i) for i in data['tokens']['ids']]
  lens_top = [[name(i) for i in row[:, 0]] for row in out['lens_ids_LxTxK']]
  images = dict(next_token='next_token.png', logit_lens='logit_lens.png',
                residual_norms='residual_norms.png', token_similarity='token_similarity.png',
                embedding_pca='embedding_pca.png',
                attention=[f'attention/layer_{i + 1:02d}.png'
                           for i in range(out['attention_LxNxTxS'].shape[0])])
  with cache.atomic_directory(directory, replace=True) as tmp:
    os.chmod(tmp, 0o755)  # a report is for reading (mkdtemp makes folders private)
    path = lambda file: os.path.join(tmp, file)
    plots.next_token(path(images['next_token']), [name(i) for i in out['top_ids_TxK'][-1]],
                     out['top_probs_TxK'][-1], ''.join(inputs[-6:]))
    plots.logit_lens(path(images['logit_lens']), out['lens_probs_LxTxK'][..., 0], lens_top,
                     data['logit_lens']['streams'], inputs)
    plots.residual_norms(path(images['residual_norms']), out['resid_norm_LxT'],
                         data['logit_lens']['streams'])
    os.makedirs(path('attention'))
    for layer, image in enumerate(images['attention']):
      plots.attention(path(image), out['attention_LxNxTxS'][layer], inputs,
                      data['attention']['kv_head'], layer + 1)
    if 'moe' in data:
      images['moe'] = 'moe_routing.png'
      plots.moe_routing(path(images['moe']), out['experts_LxTxA'], out['gates_LxTxA'],
                        inputs, data['model']['num_experts'])
    emb = data['embeddings']
    plots.token_similarity(path(images['token_similarity']), np.asarray(emb['pairwise']),
                           [name(i) for i in emb['tokens']])
    pca = emb['pca']
    plots.embedding_pca(path(images['embedding_pca']), np.asarray(pca['xy']),
                        [name(i) for i in pca['tokens']], np.isin(pca['tokens'], highlight),
                        pca['variance_share'], f'first {pca["plain"]} plain tokens')
    data['images'] = images
    with open(path('data.json'), 'w', encoding='utf-8') as f:
      json.dump(data, f)
    with open(path('index.md'), 'w', encoding='utf-8') as f:
      f.write(report.markdown(data, images, name))


def _split_tokens(tokens: str | Sequence[str] | None) -> list[str]:
  """--tokens: comma-separated (spaces kept: ' cat' and 'cat' are different tokens)."""
  if tokens is None:
    return []
  if isinstance(tokens, str):
    return tokens.split(',')
  return [t for value in tokens for t in value.split(',')]


def load(config: lm_config.Config, workdir: str, step: str | None,
         hf: str | None) -> tuple[lm_config.ModelConfig, Any, Any, str]:
  """(model config, params, tokenizer, source) of a run's checkpoint or of --hf=PATH."""
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)
  if step == 'all':
    raise ValueError('--step=all is for --mode=eval; inspect one step (N, best, or leave '
                     '--step out for the latest).')
  if hf:
    if step:
      raise ValueError(f'--step={step} picks a checkpoint of a training run; --hf inspects the '
                       'Hugging Face checkpoint as it is. Drop --step.')
    try:
      from lm import hf as hf_lib  # pylint: disable=g-import-not-at-top (safetensors reading)
    except ImportError as e:
      raise ImportError(f'--hf needs lm.hf, which could not be imported ({e}). Install the '
                        'pinned dependencies (make run), or inspect a training run with '
                        '--workdir alone.') from None
    config = hf_lib.run_config(config, hf)
    return (config.model, hf_lib.load_params(hf, config.model), lm_data.load_tokenizer(hf),
            os.path.abspath(hf))
  config = eval_lib.run_config(workdir, config)
  params, number = ckpt_lib.restore_params(workdir, step or 'latest', config.model)
  return config.model, params, lm_data.load_tokenizer(workdir), f'{workdir} step {number}'


def main(config: lm_config.Config, workdir: str, step: str | None = None,
         prompt: Sequence[str] | None = None, hf: str | None = None,
         tokens: str | Sequence[str] | None = None) -> None:
  """CLI entry: python run.py --mode=inspect --config=... --workdir=DIR --prompt=TEXT.

  Several --prompt values (or --prompt=@FILE, one per line) each get their own report.
  """
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)  # orbax logs every restore
  workdir = os.path.abspath(workdir)
  try:
    if not prompt:
      raise ValueError('--mode=inspect needs --prompt=TEXT (the text to look inside the model '
                       'with), e.g. --prompt="the cat sat on the".')
    prompts = sample_lib.read_prompts(prompt)
    model_config, params, tokenizer, source = load(config, workdir, step, hf)
    print(f'Inspecting {source}.', file=sys.stderr)
    for text in prompts:
      directory = os.path.join(workdir, INSPECT_DIR, report.slug(text))
      data = inspect_prompt(model_config, params, tokenizer, text, directory,
                            tokens=_split_tokens(tokens), source=source)
      print(report.next_token_table(data, functools.partial(report.label, tokenizer)))
      print(f'Report: {os.path.join(directory, "index.md")}')
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise SystemExit(str(e)) from None
