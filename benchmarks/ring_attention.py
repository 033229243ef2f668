"""Ring attention (parallel.mesh_context) on fake CPU devices: memory per device and step time.

  python benchmarks/ring_attention.py [--seq_len=8192] [--what=memory,time] [--steps=3]

One sequence of --seq_len tokens through the real train step (AdamW) of a small model (2 layers
x 64 wide, 4 heads, RoPE, 256-token vocabulary), under parallel.strategy=mesh on the first C
fake devices with mesh_context=C (C=1: one device, full attention):

  memory    compiled.memory_analysis() of the step, per device: arguments (state + batch) and
            temporaries (activations, the attention weights the backward pass keeps, ...)
  time      ms per step (median of --steps after the compiling call)

Rows: full attention (attention_impl=xla) and blockwise attention on one device, then the ring
at C = 2, 4, 8 (each chunk of keys at once, and in blocks of model.attention_block). The fake
devices share the host's cores, so step times add up every device's work: they show what
skipping masked chunks saves, not a speed-up.
"""

import functools
import os
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not an installed package

from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import config as lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_SEQ_LEN = flags.DEFINE_integer('seq_len', 8192, 'Tokens in the one training sequence.')
_WHAT = flags.DEFINE_list('what', ['memory', 'time'], 'Figures to measure.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per row (after the compiling one).')
_BLOCK = 512  # model.attention_block of the blockwise rows

# name -> (mesh_context, model.attention_impl)
ROWS = {
    'full attention, 1 device': (1, 'xla'),
    'blockwise, 1 device': (1, 'blockwise'),
    'ring, context=2': (2, 'xla'),
    'ring, context=4': (4, 'xla'),
    'ring, context=8': (8, 'xla'),
    'ring + blockwise, context=8': (8, 'blockwise'),
}


def make_config(seq_len: int, context: int, attention_impl: str) -> lm_config.Config:
  c = base.get_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=256,
                 pos_emb='rope', max_seq_len=seq_len, attention_impl=attention_impl,
                 attention_block=_BLOCK)
  c.data.update(seq_len=seq_len, tokenizer='byte')
  c.train.update(batch_size=1, steps=1000)
  c.eval.update(batch_size=1)
  c.parallel.update(strategy='mesh', mesh_data=1, mesh_context=context)
  return lm_config.Config.from_config_dict(c)


def build(config: lm_config.Config):
  """(strategy, compiled step fn, abstract state on its shardings) on the first C devices."""
  strategy = parallel.make(config, jax.local_devices()[:config.parallel.mesh_context])
  state = strategy.target(jax.eval_shape(functools.partial(train.create_state, config)))
  return strategy, strategy.compile(train.train_steps, donate_argnums=(0,), state=state), state


def memory(seq_len: int) -> None:
  print(f'| T={seq_len} | devices | arguments / device (MiB) | temporaries / device (MiB) |\n'
        '|---|---|---|---|')
  mib = lambda n: f'{n / 2**20:,.1f}'
  for name, (context, impl) in ROWS.items():
    config = make_config(seq_len, context, impl)
    strategy, step_fn, state = build(config)
    batch_sharding = jax.NamedSharding(
        strategy.mesh, jax.P(None, strategy.batch_axes, strategy.length_axes))
    batch = {k: jax.ShapeDtypeStruct((1, 1, seq_len), jnp.float32 if k == 'weights' else
                                      jnp.int32, sharding=batch_sharding)
             for k in ('inputs', 'targets', 'weights')}
    m = step_fn.lower(state, batch).compile().memory_analysis()
    print(f'| {name} | {context} | {mib(m.argument_size_in_bytes)} | '
          f'{mib(m.temp_size_in_bytes)} |', flush=True)


def step_times(seq_len: int) -> None:
  print(f'| T={seq_len} | ms/step (median of {_STEPS.value}) | first call incl. compile (s) | '
        'loss |\n|---|---|---|---|')
  tokens = np.random.default_rng(0).integers(0, 256, (1, 1, seq_len + 1)).astype(np.int32)
  host = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
          'weights': np.ones((1, 1, seq_len), np.float32)}
  for name, (context, impl) in ROWS.items():
    config = make_config(seq_len, context, impl)
    strategy = parallel.make(config, jax.local_devices()[:context])
    state = strategy.init(functools.partial(train.create_state, config))
    step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
    batch = strategy.shard(host, batch_axis=1)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    loss = float(strategy.first(metrics)['loss'][0])
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    print(f'| {name} | {1e3 * np.median(times):,.0f} | {compile_s:.1f} | {loss:.6f} |',
          flush=True)
    del state


def main(argv):
  del argv
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}')
  for what in _WHAT.value:
    {'memory': memory, 'time': step_times}[what](_SEQ_LEN.value)


if __name__ == '__main__':
  app.run(main)
