"""Training MFU on GPUs: GPT-2 small and a ~1.1B Llama (TinyLlama's shape) in bfloat16.

  python benchmarks/mfu.py [--models=gpt2-small,llama-1b] [--batch=16] [--seq_len=1024] \
      [--attention_impl=dot_product_attention] [--remat=none] [--steps=20]

Random tokens, the mesh strategy over every local device (data parallel unless --fsdp), the
real train step (AdamW, clipping, float32 master weights, bfloat16 compute). Prints ms/step,
tokens/s and MFU = flops_per_token (as --mode=info counts it) x tokens/s / peak FLOP/s, the
peak from lm.metrics' table (H100: 989 TFLOP/s dense bf16). The aim on one H100 is >= 50% for
GPT-2 small (llm.c reports about 38%). On CPU it runs, but says little.
"""

import functools
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not an installed package

from configs import gpt2  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import config as lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import info  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list('models', ['gpt2-small', 'llama-1b'], 'Models to time.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Global batch in sequences.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'Tokens per sequence.')
_ATTENTION = flags.DEFINE_string('attention_impl', 'dot_product_attention',
                                 'model.attention_impl: xla | dot_product_attention | blockwise')
_REMAT = flags.DEFINE_string('remat', 'none', 'model.remat: none | full | dots | dots_no_batch')
_FSDP = flags.DEFINE_bool('fsdp', False, 'Shard parameters over the devices (mesh_fsdp=-1).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after one compiling step).')

# TinyLlama 1.1B: 22 x 2048, 32 heads over 4 KV heads, SwiGLU 5632, 32000 tokens.
LLAMA_1B = dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                d_ff=5632, max_seq_len=2048, rope_theta=10000.0)


def model_config(name: str) -> lm_config.Config:
  if name == 'gpt2-small':
    c = gpt2.get_config('size=small')
    c.model.update(embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  elif name == 'llama-1b':
    c = llama.get_config('size=tiny')
    c.model.update(LLAMA_1B)
  else:
    raise ValueError(f'--models: {name!r} is not gpt2-small or llama-1b.')
  c.model.update(dtype='bfloat16', attention_impl=_ATTENTION.value, remat=_REMAT.value,
                 max_seq_len=max(c.model.max_seq_len, _SEQ_LEN.value))
  c.data.update(seq_len=_SEQ_LEN.value, tokenizer='byte')
  c.train.update(batch_size=_BATCH.value, steps=1000)
  c.parallel.update(strategy='mesh', mesh_data=1 if _FSDP.value else -1,
                    mesh_fsdp=-1 if _FSDP.value else 1)
  return lm_config.Config.from_config_dict(c)


def measure(name: str) -> None:
  config = model_config(name)
  strategy = parallel.make(config)
  state = strategy.init(functools.partial(train.create_state, config))
  step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, (1, b, t + 1)).astype(np.int32)
  batch = strategy.shard({'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
                          'weights': np.ones((1, b, t), np.float32)}, batch_axis=1)
  start = time.perf_counter()
  state, out = step_fn(state, batch)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, out = step_fn(state, batch)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / _STEPS.value
  model = info.model_info(config)
  tokens_per_sec = b * t / seconds
  peak = metrics.peak_flops(strategy.devices, matmul_precision=config.model.matmul_precision)
  mfu = model['flops_per_token'] * tokens_per_sec / peak
  print(f'{name}: {model["params_total"]:,} params, batch {b} x {t}, '
        f'{strategy.num_devices} x {strategy.devices[0].device_kind}, '
        f'attention_impl={config.model.attention_impl}, remat={config.model.remat}: '
        f'compile {compile_s:.1f} s, {1e3 * seconds:.1f} ms/step, {tokens_per_sec:,.0f} '
        f'tokens/s, MFU {100 * mfu:.1f}% (loss {float(strategy.first(out)["loss"][-1]):.3f})',
        flush=True)


def main(argv):
  del argv
  for name in _MODELS.value:
    measure(name)


if __name__ == '__main__':
  app.run(main)
