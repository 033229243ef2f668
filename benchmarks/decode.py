"""Decoding speed with the KV cache: tokens/s, and whether a step's cost stays flat in position.

  python benchmarks/decode.py [--models=tiny,gpt2-small] [--new_tokens=128] [--batch=1,8]

Random weights (no training needed): GPT-2-small-shaped (12 x 768, 50257 vocabulary, 1024
context) and a tiny model (2 x 64). For each model it prints

  decode tokens/s   greedy generation of --new_tokens after a 16-token prompt, one compiled
                    while_loop, compile excluded, per batch size
  step @10, @1000   ms per decode step at position 10 and at 1000 in the same 1024-slot
                    cache; with a cache the step must stay near flat (ratio < 1.5)
  no cache          for contrast, ms of the full forward pass that the step at that position
                    would need without a cache
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not an installed package

from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import config as lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import info  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import model as lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import sample  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list('models', ['tiny', 'gpt2-small'], 'Models to time.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per timing.')
_BATCHES = flags.DEFINE_list('batch', ['1', '8'], 'Batch sizes for tokens/s.')
_STEPS = 20  # decode steps timed at each position
CONTEXT = 1024
EOS = 0

# name -> (d_model, num_layers, num_heads, vocab_size)
SHAPES = {'tiny': (64, 2, 4, 256), 'gpt2-small': (768, 12, 12, 50257)}


def model_config(name: str) -> lm_config.ModelConfig:
  d_model, num_layers, num_heads, vocab = SHAPES[name]
  c = base.get_config()
  c.model.update(d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_heads, vocab_size=vocab, max_seq_len=CONTEXT,
                 pos_emb='learned')
  c.data.seq_len = CONTEXT
  return lm_config.Config.from_config_dict(c).model


def random_params(config: lm_config.ModelConfig):
  """Normal weights of the right shapes, made on the host (nothing to compile)."""
  rng = np.random.default_rng(0)
  return jax.device_put(jax.tree.map(
      lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype),
      info.param_shapes(config)))


def _never_eos(params):
  """Zero the EOS row of the (tied) embedding so greedy decoding never stops early."""
  params = dict(params)
  params['embed'] = {'embedding': params['embed']['embedding'].at[EOS].set(-1e3)}
  return params


def tokens_per_second(model, params, batch: int, new_tokens: int) -> float:
  prompts = np.random.default_rng(1).integers(1, model.config.vocab_size, (batch, 16)).tolist()
  run = lambda: sample.generate_tokens(model, params, prompts, max_new_tokens=new_tokens,
                                       eos_id=EOS)
  run()  # compile
  start = time.perf_counter()
  out = run()
  seconds = time.perf_counter() - start
  assert all(len(row) == new_tokens for row in out), 'stopped early'
  return batch * new_tokens / seconds


def step_ms(model, params, position: int) -> float:
  """ms per decode step from `position` on, in a cache of CONTEXT slots."""
  config, params = lm_model.unroll_layers(model.config, params)  # as generate_tokens does
  prefill_fn, decode_fn = sample.compiled(config, sample.Sampling(), EOS, EOS)
  prompt = np.ones((1, position), np.int32)
  lengths = np.array([position], np.int32)
  new = CONTEXT - position

  def run():
    state = prefill_fn(new, params, prompt, lengths, jax.random.key(0))
    jax.block_until_ready(state)
    start = time.perf_counter()
    state = decode_fn(params, state, jnp.asarray(1 + _STEPS, jnp.int32))
    jax.block_until_ready(state.tokens_BxN)
    assert int(state.step) == 1 + _STEPS
    return (time.perf_counter() - start) / _STEPS

  run()  # compile
  return 1e3 * min(run() for _ in range(3))


def full_forward_ms(model, params, length: int) -> float:
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  x = np.ones((1, length), np.int32)
  jax.block_until_ready(forward(params, x))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(forward(params, x))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main(argv):
  del argv
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} '
        f'({jax.device_count()} device(s)), {os.cpu_count()} CPU(s)')
  for name in _MODELS.value:
    config = model_config(name)
    model = lm_model.Transformer(config)
    params = _never_eos(random_params(config))
    count = info.count_params(config)['params_total']
    print(f'\n{name}: {count / 1e6:.1f}M parameters, d_model {config.d_model}, '
          f'{config.num_layers} layers, vocab {config.vocab_size}, cache {CONTEXT} slots')
    for batch in _BATCHES.value:
      rate = tokens_per_second(model, params, int(batch), _NEW_TOKENS.value)
      print(f'  decode, batch {int(batch):>2}: {rate:10.1f} tokens/s '
            f'({_NEW_TOKENS.value} new tokens after a 16-token prompt)')
    near, far = step_ms(model, params, 10), step_ms(model, params, 1000)
    verdict = 'flat' if far / near < 1.5 else 'NOT FLAT'
    print(f'  decode step at position 10: {near:.2f} ms, at 1000: {far:.2f} ms, '
          f'ratio {far / near:.2f} ({verdict}, must be < 1.5)')
    print(f'  without a cache (full forward): {full_forward_ms(model, params, 11):.2f} ms at '
          f'10, {full_forward_ms(model, params, 1001):.2f} ms at 1000')


if __name__ == '__main__':
  app.run(main)
