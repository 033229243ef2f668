"""Inspect: the captured numbers agree with plain forward passes; reports, CLI and errors."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from lm import config as lm_config
from lm import data as lm_data
from lm import info
from lm import inspect as inspect_lib
from lm import model as lm_model
from lm.inspect import capture
from lm.inspect import report
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_GPT2 = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'gpt2')
VOCAB = 260  # the byte tokenizer's 257 ids, rounded up: ids 257..259 are padding rows
TOKENS_BxT = np.array([[256, 5, 9, 2, 30, 11, 7, 9], [256, 17, 3, 3, 40, 2, 8, 1]], np.int32)
VARIANTS = {
    'learned_pre_tied': dict(pos_emb='learned'),
    'sinusoidal_post_untied_softcap_window': dict(
        pos_emb='sinusoidal', norm_position='post', tie_embeddings=False,
        final_logit_softcap=5.0, attention_window=3, attention_pattern='local'),
    'rope_gqa_rmsnorm_unscanned_dpa': dict(pos_emb='rope', num_kv_heads=2, norm='rmsnorm',
                                           scan_layers=False,
                                           attention_impl='dot_product_attention'),
    'alibi_mqa_moe_remat': dict(pos_emb='alibi', num_kv_heads=1, ffn='moe', num_experts=4,
                                top_k=2, capacity_factor=0.0, remat='full'),
}


def model_config(**overrides) -> lm_config.ModelConfig:
  c = base.get_config()
  c.model.update(dict(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                           max_seq_len=16, vocab_size=VOCAB), **overrides))
  c.data.update(seq_len=16)
  return lm_config.Config.from_config_dict(c).model


@functools.lru_cache(maxsize=None)
def random_model(name: str):
  """Random parameters of the right shapes (norm scales near 1): no init to compile."""
  config = model_config(**VARIANTS[name])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype),
                        info.param_shapes(config))
  return config, params


@functools.lru_cache(maxsize=None)
def captured(name: str):
  config, params = random_model(name)
  return capture.capture(config, params, TOKENS_BxT, top_k=5)


def plain_logits(name: str) -> np.ndarray:
  """The model as configured (scanned or not, any attention), no inspection."""
  config, params = random_model(name)
  return np.asarray(jax.jit(lm_model.Transformer(config).apply)({'params': params}, TOKENS_BxT))


@pytest.mark.parametrize('name', list(VARIANTS))
def test_top_k_table_and_logit_lens_agree_with_a_plain_forward_pass(name):
  config, params = random_model(name)
  out = captured(name)
  logits = plain_logits(name)
  np.testing.assert_allclose(out['logits_BxTxV'], logits, atol=2e-5)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, top_ids = jax.lax.top_k(probs, 5)
  np.testing.assert_array_equal(out['top_ids_BxTxK'], top_ids)
  np.testing.assert_allclose(out['top_probs_BxTxK'], top_probs, atol=1e-5)
  # The lens on the last residual stream is the model's own head: the same logits and table.
  _, lens_last = capture.lens_logits(capture.inspect_config(config), params, TOKENS_BxT,
                                     out['streams_LxBxTxD'][-1])
  np.testing.assert_allclose(lens_last, logits, atol=2e-5)
  np.testing.assert_array_equal(out['lens_ids_LxBxTxK'][-1], top_ids)
  np.testing.assert_allclose(out['lens_probs_LxBxTxK'][-1], top_probs, atol=1e-5)
  np.testing.assert_allclose(out['lens_final_prob_LxBxT'][-1], top_probs[..., 0], atol=1e-5)
  assert out['lens_ids_LxBxTxK'].shape == (config.num_layers + 1, 2, 8, 5)
  np.testing.assert_allclose(out['resid_norm_LxBxT'],
                             np.linalg.norm(out['streams_LxBxTxD'], axis=-1), rtol=1e-5)
  # The token that came next: its probability and rank under the model.
  targets = TOKENS_BxT[:, 1:]
  next_prob = np.take_along_axis(np.asarray(probs[:, :-1]), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(out['next_prob_BxT'][:, :-1], next_prob, rtol=1e-4)
  assert np.isnan(out['next_prob_BxT'][:, -1]).all() and (out['next_rank_BxT'][:, -1] == 0).all()
  ranks = 1 + np.sum(np.asarray(probs[:, :-1]) > next_prob[..., None], axis=-1)
  np.testing.assert_array_equal(out['next_rank_BxT'][:, :-1], ranks)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_attention_rows_sum_to_one_and_masked_keys_get_nothing(name):
  config, _ = random_model(name)
  probs = captured(name)['attention_LxBxNxTxS']
  length = TOKENS_BxT.shape[1]
  assert probs.shape == (config.num_layers, 2, config.num_heads, length, length)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  q, k = np.arange(length)[:, None], np.arange(length)[None, :]
  visible = (k <= q) & ((q - k < config.attention_window) if config.attention_window else True)
  assert (probs[..., ~visible] == 0).all()
  assert (probs[..., visible] > 0).all()


def test_moe_routing_matches_what_the_model_sows():
  config, params = random_model('alibi_mqa_moe_remat')
  out = captured('alibi_mqa_moe_remat')
  experts = out['experts_LxBxTxA']
  assert experts.shape == (2, 2, 8, 2)
  assert (experts[..., 0] != experts[..., 1]).all()
  np.testing.assert_allclose(out['gates_LxBxTxA'].sum(-1), 1.0, atol=1e-6)
  _, state = lm_model.Transformer(config).apply({'params': params}, TOKENS_BxT,
                                                mutable=['intermediates'])
  counts = np.stack([np.bincount(e.ravel(), minlength=4) for e in experts])
  np.testing.assert_allclose(counts / experts[0].size, lm_model.expert_load(state), atol=1e-6)


def test_embedding_neighbours_and_pca():
  table = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  valid = np.array([True, True, True, True, False])  # row 4: vocabulary padding
  ids, sims, pairs = capture.embedding_neighbours(table, [0, 3], valid, k=2)
  assert ids[0].tolist() == [1, 3] and ids[1].tolist() == [1, 0]  # never itself nor padding
  np.testing.assert_allclose(sims[0, 0], 0.9 / np.hypot(0.9, 0.1), rtol=1e-6)
  np.testing.assert_allclose(pairs, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)
  xy, share = capture.pca_2d(np.array([[0.0, 0, 0], [2, 0, 0], [4, 1, 0]]))
  assert xy.shape == (3, 2) and share[0] > 0.9 and abs(share.sum() - 1.0) < 1e-9


def test_token_labels_slugs_and_tokens():
  tokenizer = lm_data.ByteTokenizer()
  assert report.label(tokenizer, ord(' ')) == '␣' and report.label(tokenizer, 10) == '\\n'
  assert report.label(tokenizer, 256) == '<eos>' and report.label(tokenizer, 258) == '<unused 258>'
  assert report.token_text(tokenizer, 0xe2) == '\\xe2'  # part of a character
  assert report.slug('the cat sat on the') == 'the-cat-sat-on-the'
  assert re.fullmatch(r'def-f-x-[0-9a-f]{8}', report.slug('def f(x):'))
  assert report.slug('def f(x):') != report.slug('def f(x)')
  assert report.slug('¿?').startswith('prompt-')
  assert report.resolve_tokens(tokenizer, ['a', ' ']) == [97, 32]
  plain = report.plain_tokens(tokenizer, 5)
  assert plain == [33, 34, 35, 36, 37]  # printable, not whitespace


def test_unknown_tokens_and_empty_prompts_are_errors_that_say_what_to_do():
  tokenizer = lm_data.ByteTokenizer()
  with pytest.raises(ValueError, match=r"'cat' is not a token .* 3 tokens \('c', 'a', 't'\)"):
    report.resolve_tokens(tokenizer, ['cat'])
  with pytest.raises(ValueError, match='empty entry'):
    report.resolve_tokens(tokenizer, ['a', ''])
  config, _ = random_model('learned_pre_tied')
  with pytest.raises(ValueError, match='--prompt is empty.*--prompt="the cat sat on the"'):
    inspect_lib.encode_prompt(tokenizer, '', config)
  ids, cut = inspect_lib.encode_prompt(tokenizer, 'x' * 40, config)  # learned: 16 positions
  assert len(ids) == 16 and 'cut to its last 16' in cut


def test_report_writes_index_data_and_every_picture(tmp_path):
  config, params = random_model('alibi_mqa_moe_remat')
  tokenizer = lm_data.ByteTokenizer()
  directory = str(tmp_path / 'report')
  stale = os.path.join(directory, 'attention', 'layer_09.png')
  os.makedirs(os.path.dirname(stale))
  open(stale, 'w').close()  # a rerun replaces the whole folder
  data = inspect_lib.inspect_prompt(config, params, tokenizer, 'the cat', directory,
                                    tokens=['a', 't'], source='random')
  files = sorted(os.path.relpath(os.path.join(d, f), directory)
                 for d, _, names in os.walk(directory) for f in names)
  assert files == ['attention/layer_01.png', 'attention/layer_02.png', 'data.json',
                   'embedding_pca.png', 'index.md', 'logit_lens.png', 'moe_routing.png',
                   'next_token.png', 'residual_norms.png', 'token_similarity.png']
  with open(os.path.join(directory, 'data.json')) as f:
    saved = json.load(f)
  assert saved['prompt'] == 'the cat' and saved['tokens']['ids'] == [256] + list(b'the cat')
  assert np.array(saved['attention']['probs']).shape == (2, 4, 8, 8)
  assert saved['attention']['kv_head'] == [0, 0, 0, 0]
  assert np.array(saved['moe']['experts']).shape == (2, 8, 2)
  assert np.array(saved['logit_lens']['top_ids']).shape == (3, 8, 10)
  assert saved['next_token']['next_prob'][-1] is None
  assert saved['embeddings']['tokens'] == [97, 116]
  assert all(str(i) in saved['token_text'] for i in np.ravel(saved['embeddings']['neighbours']))
  index = (tmp_path / 'report' / 'index.md').read_text()
  linked = re.findall(r'\]\(([^)]+)\)', index)
  assert sorted(linked) == [f for f in files if f != 'index.md']  # every file, once
  top = data['next_token']['top_ids'][-1][0]
  table = report.next_token_table(data, functools.partial(report.label, tokenizer))
  assert report.label(tokenizer, top) in table.splitlines()[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('inspect'))
  return directory, trained_run.train_run(directory, devices=jax.local_devices()[:1])


def test_cli(run, tmp_path):
  directory, workdir = run
  config_file = trained_run.write_config_file(directory, tmp_path)
  env = trained_run.cli_env()
  result = subprocess.run(
      [sys.executable, 'run.py', f'--config={config_file}', f'--workdir={workdir}',
       '--mode=inspect', '--prompt=alpha beta', '--prompt=gamma', '--tokens=a,e', '--step=10'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("Next token after ") == 2 and 'step 10' in result.stderr
  for slug in ('alpha-beta', 'gamma'):
    folder = os.path.join(workdir, 'inspect', slug)
    assert os.path.isfile(os.path.join(folder, 'index.md'))
    with open(os.path.join(folder, 'data.json')) as f:
      assert json.load(f)['source'] == f'{workdir} step 10'


def test_main_errors(run, tmp_path):
  directory, workdir = run
  config = trained_run.config(directory)
  cases = [(dict(prompt=None), '--mode=inspect needs --prompt'),
           (dict(prompt=['']), '--prompt is empty'),
           (dict(prompt=['a'], step='all'), '--step=all is for --mode=eval'),
           (dict(prompt=['a'], step='10', hf=HF_GPT2), 'Drop --step'),
           (dict(prompt=['alpha'], tokens='a,alpha'), "'alpha' is not a token")]
  for kwargs, message in cases:
    with pytest.raises(SystemExit, match=re.escape(message)):
      inspect_lib.main(config, workdir, **kwargs)
  with pytest.raises(SystemExit, match='is not a training run'):  # an empty workdir
    inspect_lib.main(config, str(tmp_path), prompt=['a'])


def test_hugging_face_checkpoint(tmp_path):
  pytest.importorskip('lm.hf')
  config = trained_run.config(str(tmp_path))
  inspect_lib.main(config, str(tmp_path), prompt=['Hello world'], hf=HF_GPT2)
  with open(tmp_path / 'inspect' / report.slug('Hello world') / 'data.json') as f:
    data = json.load(f)
  assert data['source'] == HF_GPT2 and data['model']['num_layers'] == 2
