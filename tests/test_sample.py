"""Decoding with a KV cache: exactly the tokens of full forward passes, samplers, stop, CLI."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm import config as lm_config
from lm import data as lm_data
from lm import info
from lm import model as lm_model
from lm import sample
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, EOS, CONTEXT = 64, 63, 24


def model_config(**overrides) -> lm_config.ModelConfig:
  """A tiny random model; a large init_std keeps its greedy choices far from ties."""
  c = base.get_config()
  c.model.update(dict(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                           max_seq_len=CONTEXT, vocab_size=VOCAB, init_std=0.3), **overrides))
  c.data.update(seq_len=16)
  return lm_config.Config.from_config_dict(c).model


@functools.lru_cache(maxsize=None)
def random_model(**overrides):
  """Random normal parameters of the right shapes (no init to compile), norms included."""
  model = lm_model.Transformer(model_config(**overrides))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype),
                        info.param_shapes(model.config))
  return model, params


def greedy_by_full_passes(model, params, prompts, steps, width=CONTEXT):
  """The reference: a full forward pass over the whole sequences for every new token."""
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  rows = [list(p) for p in prompts]
  ended = [False] * len(rows)
  for _ in range(steps):
    x = np.zeros((len(rows), width), np.int32)  # causal: padding after the text is unseen
    for i, row in enumerate(rows):
      x[i, :len(row)] = row
    logits = np.asarray(forward(params, x))
    for i, row in enumerate(rows):
      token = int(np.argmax(logits[i, len(row) - 1]))
      ended[i] |= token == EOS
      if not ended[i]:
        row.append(token)
  return [row[len(p):] for row, p in zip(rows, prompts)]


PROMPTS = [[5, 9, 2, 30, 11, 7], [17, 3]]  # different lengths: one batch, left-padded
VARIANTS = {
    'learned_mha_unrolled': dict(pos_emb='learned', scan_layers=False),
    'sinusoidal_window_post_norm': dict(pos_emb='sinusoidal', attention_window=6,
                                        norm_position='post'),
    'rope_gqa_qk_norm_swiglu_scaled_untied': dict(
        pos_emb='rope', num_kv_heads=2, qk_norm=True, ffn='swiglu', rope_fraction=0.5,
        rope_scaling='linear', rope_scaling_factor=2.0, tie_embeddings=False),
    'alibi_mqa_softcaps': dict(pos_emb='alibi', num_kv_heads=1, attn_logit_softcap=5.0,
                               final_logit_softcap=10.0),
    'relative_rmsnorm': dict(pos_emb='relative', norm='rmsnorm'),
    'nope': dict(pos_emb='none'),
    'moe_dropless': dict(pos_emb='rope', ffn='moe', num_experts=4, top_k=2,
                         capacity_factor=0.0),
}


@pytest.mark.parametrize('name', list(VARIANTS))
def test_cached_greedy_equals_full_forward_passes(name):
  model, params = random_model(**VARIANTS[name])
  steps = CONTEXT - len(PROMPTS[0])
  got = sample.generate_tokens(model, params, PROMPTS, max_new_tokens=steps, eos_id=EOS)
  assert got == greedy_by_full_passes(model, params, PROMPTS, steps)


@pytest.mark.parametrize('window', [4, 7])
def test_a_sliding_window_model_decodes_past_its_context_with_a_rolling_cache(window):
  """A cache of `window` slots, prompts longer than it, and 3x max_seq_len tokens in all."""
  model, params = random_model(pos_emb='rope', attention_window=window, num_kv_heads=2)
  prompts = [list(range(1, 12)), [17, 3]]
  steps = 3 * CONTEXT - len(prompts[0])
  got = sample.generate_tokens(model, params, prompts, max_new_tokens=steps, eos_id=EOS,
                               chunk=5)
  assert got == greedy_by_full_passes(model, params, prompts, steps, width=3 * CONTEXT)
  assert len(got[0]) > CONTEXT  # really past max_seq_len (no EOS early)
  cache = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0),
                         jnp.zeros((1, sample.cache_length(model.config, 1000)), jnp.int32))
  assert jax.tree.leaves(cache['cache'])[1].shape[1 + model.config.scan_layers] == window


def test_seed_and_chunking_decide_nothing_but_the_seed_and_top_k_1_is_greedy():
  model, params = random_model(**VARIANTS['nope'])  # greedy: compiled by the variants test
  run = lambda seed, chunk, sampling: sample.generate_tokens(
      model, params, PROMPTS, max_new_tokens=CONTEXT - len(PROMPTS[0]), eos_id=EOS, seed=seed,
      chunk=chunk, sampling=sampling)
  hot = sample.Sampling(temperature=1.0)
  assert run(0, 0, hot) == run(0, 1, hot) == run(0, 5, hot)
  assert run(0, 0, hot) != run(1, 0, hot)
  greedy = run(0, 0, sample.Sampling())
  assert run(3, 0, sample.Sampling(temperature=1.5, top_k=1)) == greedy
  logits_BxV = jax.random.normal(jax.random.key(0), (8, VOCAB))
  keys = jax.random.split(jax.random.key(1), 50)
  draws = jax.vmap(lambda k: sample.sample_logits(logits_BxV, k, sample.Sampling(2.0, 1)))(keys)
  assert (np.asarray(draws) == np.asarray(jnp.argmax(logits_BxV, -1))[None]).all()


def draws(logits_V, sampling, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  logits_BxV = jnp.asarray(logits_V)[None]
  return np.asarray(jax.vmap(lambda k: sample.sample_logits(logits_BxV, k, sampling)[0])(keys))


def test_top_p_never_samples_outside_the_nucleus():
  logits_V = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
  for top_p in (0.35, 0.5, 0.75, 0.9):
    order = np.argsort(-logits_V)
    mass = np.cumsum(np.exp(logits_V)[order])
    nucleus = set(order[:np.searchsorted(mass, top_p) + 1].tolist())
    got = draws(logits_V, sample.Sampling(1.0, top_p=top_p))
    assert set(got.tolist()) == nucleus, top_p
  top_k = draws(logits_V, sample.Sampling(1.0, top_k=2))
  assert set(top_k.tolist()) == {1, 3}


def test_temperature_scales_the_distribution():
  logits_V = np.array([1.0, 0.0, -1.0, 0.5])
  for temperature in (0.5, 1.0, 2.0):
    expected = np.exp(logits_V / temperature) / np.exp(logits_V / temperature).sum()
    got = np.bincount(draws(logits_V, sample.Sampling(temperature)), minlength=4) / 4000
    np.testing.assert_allclose(got, expected, atol=0.03)
  assert (draws(logits_V, sample.Sampling(1e-4), n=200) == 0).all()


def test_long_prompts_are_cut_from_the_left():
  assert sample.fit_prompt(list(range(30)), 4, CONTEXT) == list(range(10, 30))
  with pytest.raises(ValueError, match='max_new_tokens=24 leaves no room'):
    sample.fit_prompt([1], 24, CONTEXT)


def test_read_prompts(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('first line\n\nsecond\n')
  assert sample.read_prompts(None) == ['']
  assert sample.read_prompts(['a', f'@{path}']) == ['a', 'first line', 'second']
  with pytest.raises(FileNotFoundError, match='no such file'):
    sample.read_prompts(['@/no/such/file'])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('sample'))
  return directory, trained_run.train_run(directory, devices=jax.local_devices()[:1])


def test_generate_text_stop_and_stream(run):
  directory, workdir = run
  config = trained_run.config(directory)
  from lm import evaluate  # pylint: disable=g-import-not-at-top
  config = evaluate.run_config(workdir, config)
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  params, _ = checkpoint.restore_params(workdir, 'latest', config.model)
  tokenizer = lm_data.load_tokenizer(workdir)
  model = lm_model.Transformer(config.model)
  options = dict(max_new_tokens=20, temperature=0.0, seed=0)
  plain = sample.generate(model, params, tokenizer, ['alpha beta'], **options)
  text = plain[0]
  assert isinstance(text, str) and len(text) > 4
  stop = text[len(text) // 2:len(text) // 2 + 2]
  pieces = []
  stopped = sample.generate(model, params, tokenizer, ['alpha beta'], stop=stop,
                            stream=pieces.append, **options)
  assert stopped == [text[:text.index(stop)]] and ''.join(pieces) == stopped[0]


def test_cli(run, tmp_path):
  directory, workdir = run
  config_file = tmp_path / 'tiny.py'
  config_file.write_text('from tests import trained_run\n\n\ndef get_config(arg=None):\n'
                         f'  return trained_run.config_dict({directory!r})\n')
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('alpha\nbeta gamma\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  command = [sys.executable, 'run.py', f'--config={config_file}', f'--workdir={workdir}',
             '--mode=sample', '--config.sample.max_new_tokens=8']
  batch = subprocess.run(command + [f'--prompt=@{prompts}', '--prompt=zeta',
                                    '--config.sample.temperature=1.0', '--step=10'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert batch.returncode == 0, batch.stderr
  assert batch.stdout.count('--- sample ') == 3 and '\nbeta gamma' in batch.stdout
  assert 'step 10' in batch.stderr  # a single prompt streams: test_generate_text_stop_and_stream


def test_a_chat_template_renders_each_prompt_as_a_user_turn(run):
  directory, workdir = run
  from lm import evaluate  # pylint: disable=g-import-not-at-top
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  from lm.data import chat  # pylint: disable=g-import-not-at-top
  config = evaluate.run_config(workdir, trained_run.config(directory))
  params, _ = checkpoint.restore_params(workdir, 'latest', config.model)
  tokenizer = lm_data.load_tokenizer(workdir)
  model = lm_model.Transformer(config.model)
  template = chat.BuiltinTemplate()
  ids = sample.prompt_ids(tokenizer, 'alpha', template)
  turn = [{'role': 'user', 'content': 'alpha'}]
  assert ids == chat.encode(tokenizer, template.prompt(turn))[0]
  assert tokenizer.decode(ids).endswith(chat.BUILTIN_MARKERS['assistant'])
  chatted = sample.generate(model, params, tokenizer, ['alpha'], max_new_tokens=6,
                            temperature=0.0, template=template)
  new = sample.generate_tokens(model, params, [ids], max_new_tokens=6, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id)
  assert chatted == [sample.Continuation(tokenizer, ids, '').text(new[0])]
  assert sample.prompt_ids(tokenizer, 'alpha') == [tokenizer.eos_id] + tokenizer.encode('alpha')
