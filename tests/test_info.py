"""lm.info and every file in configs/: published parameter counts, cost, shape checks."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lm import config as lm_config
from lm import info
from lm import model as lm_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str | None = None) -> lm_config.Config:
  spec = importlib.util.spec_from_file_location('config_under_test', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return lm_config.Config.from_config_dict(module.get_config(arg))


# Published counts: GPT-2 (HF transformers), Llama 2 / 3 and Mixtral model cards.
@pytest.mark.parametrize('path, arg, total', [
    ('configs/gpt2.py', 'size=small', 124_439_808),
    ('configs/gpt2.py', 'size=medium', 354_823_168),
    ('configs/gpt2.py', 'size=large', 774_030_080),
    ('configs/gpt2.py', 'size=xl', 1_557_611_200),
    ('configs/llama.py', 'size=llama2_7b', 6_738_415_616),
    ('configs/llama.py', 'size=llama3_8b', 8_030_261_248),
    ('configs/mixtral.py', 'size=8x7b', 46_702_792_704),
])
def test_published_parameter_counts(path, arg, total):
  counts = info.count_params(load_config(path, arg).model)
  assert counts['params_total'] == total


def test_mixtral_active_parameters():
  counts = info.count_params(load_config('configs/mixtral.py', 'size=8x7b').model)
  assert 12.8e9 < counts['params_active'] < 13.0e9  # "about 12.9B active"


def test_gpt2_small_non_embedding_and_flops():
  config = load_config('configs/gpt2.py', 'size=small')
  result = info.model_info(config)
  # Kaplan et al. count: 12 * layers * d^2 plus biases and norms, without wte/wpe.
  assert result['params_non_embedding'] == 124_439_808 - 50257 * 768 - 1024 * 768
  m = config.model
  expected = 6 * (result['params_non_embedding'] + m.vocab_size * m.d_model) + 12 * (
      m.num_layers * m.d_model * 1024)
  assert result['flops_per_token'] == expected
  # 2 (k and v) x 12 layers x 768 x 4 bytes.
  assert result['kv_cache_bytes_per_token'] == 2 * 12 * 768 * 4


def test_gqa_shrinks_kv_cache():
  mha = load_config('configs/llama.py', 'size=llama2_7b').model
  gqa = load_config('configs/llama.py', 'size=llama3_8b').model
  assert info.kv_cache_bytes_per_token(mha) == 4 * info.kv_cache_bytes_per_token(gqa)


CONFIG_FILES = sorted(glob.glob('configs/*.py', root_dir=ROOT) +
                      glob.glob('experiments/*/config.py', root_dir=ROOT))


@pytest.mark.parametrize('path', [p for p in CONFIG_FILES if not p.endswith('__init__.py')])
def test_every_config_file_builds_and_shape_checks(path):
  """Each config validates, and its model maps [B, T] tokens to [B, T, V] float32 logits."""
  config = load_config(path)
  model_config = config.model
  if model_config.vocab_size == 0:
    model_config = lm_config.with_vocab_size(model_config, 300)
  model = lm_model.Transformer(model_config)
  tokens_BxT = jnp.zeros((2, config.data.seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens_BxT)
  logits_BxTxV = jax.eval_shape(model.apply, variables, tokens_BxT)
  assert logits_BxTxV.shape == (2, config.data.seq_len, model_config.vocab_size)
  assert logits_BxTxV.dtype == jnp.float32


def test_info_cli_prints_json():
  result = subprocess.run(
      [sys.executable, 'run.py', '--config=configs/gpt2.py:size=small', '--mode=info'],
      cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
  printed = json.loads(result.stdout)
  assert printed['params_total'] == 124_439_808
  assert set(printed) >= {'params_total', 'params_non_embedding', 'params_active',
                          'flops_per_token', 'kv_cache_bytes_per_token'}


@pytest.mark.parametrize('flag, message', [
    ('--config.model.num_hedas=4', 'num_heads'),
    ('--config.model.num_kv_heads=5', 'model.num_kv_heads'),
])
def test_info_cli_rejects_bad_config(flag, message):
  result = subprocess.run(
      [sys.executable, 'run.py', '--config=configs/gpt2.py:size=small', '--mode=info', flag],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
