"""Scale-out figures on 8 fake CPU devices: compile time, step time per strategy, memory.

  python benchmarks/scale_out.py [--what=compile,steps,memory]

  compile   seconds to lower and compile the train step of a GPT-2-small-shaped model (768
            wide, 12 heads, 50257 vocabulary, 1024 context) at 12 and 24 layers, with the
            layers under nn.scan and unrolled (one device; the state is never allocated)
  steps     ms per optimizer step of a small model (4 x 128, batch 32 x 128) on one device,
            pmap over 8, and meshes of 8: data, fsdp, tensor, mixed (median of 20 steps)
  memory    bytes per device from the compiled step's memory_analysis() for the GPT-2-small
            shape (batch 8 x 256) under a data mesh of 8 (replicated state) and an FSDP mesh
            of 8 (state sharded): arguments (state + batch), temporaries, outputs

The 8 devices are fake (--xla_force_host_platform_device_count=8 on the host's cores), so step
times measure the strategies' overhead, not a speed-up.
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

_WHAT = flags.DEFINE_list('what', ['compile', 'steps', 'memory'], 'Figures to measure.')
_STEPS = 20

# name -> parallel section overrides (8 devices)
STRATEGIES = {
    'one device (jit)': dict(strategy='pmap'),
    'pmap, 8': dict(strategy='pmap'),
    'mesh data=8': dict(strategy='mesh', mesh_data=8),
    'mesh fsdp=8': dict(strategy='mesh', mesh_data=1, mesh_fsdp=8),
    'mesh data=4 tensor=2': dict(strategy='mesh', mesh_data=4, mesh_tensor=2),
    'mesh data=2 fsdp=2 tensor=2': dict(strategy='mesh', mesh_data=2, mesh_fsdp=2,
                                        mesh_tensor=2),
}


def make_config(d_model: int, num_layers: int, num_heads: int, vocab: int, seq_len: int,
                batch: int, scan: bool = True, **parallel_overrides) -> lm_config.Config:
  c = base.get_config()
  c.model.update(d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_heads, vocab_size=vocab, max_seq_len=max(seq_len, 1024),
                 scan_layers=scan)
  c.data.update(seq_len=seq_len, tokenizer='byte')
  c.train.update(batch_size=batch, steps=1000)
  c.parallel.update(parallel_overrides)
  return lm_config.Config.from_config_dict(c)


def gpt2_small(num_layers: int = 12, scan: bool = True, seq_len: int = 1024, batch: int = 8,
               **parallel_overrides) -> lm_config.Config:
  return make_config(768, num_layers, 12, 50257, seq_len, batch, scan, **parallel_overrides)


def abstract_batch(config: lm_config.Config, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (1, config.train.batch_size, config.data.seq_len)  # one step per call
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'weights' else jnp.int32,
                                  sharding=sharding) for k in ('inputs', 'targets', 'weights')}


def compile_times() -> None:
  print('| layers | nn.scan | lower (s) | compile (s) |\n|---|---|---|---|')
  for scan in (True, False):
    for layers in (12, 24):
      config = gpt2_small(layers, scan)
      state = jax.eval_shape(functools.partial(train.create_state, config))
      start = time.perf_counter()
      lowered = jax.jit(train.train_steps, donate_argnums=(0,)).lower(
          state, abstract_batch(config))
      lowered_at = time.perf_counter()
      lowered.compile()
      done = time.perf_counter()
      print(f'| {layers} | {"yes" if scan else "no"} | {lowered_at - start:.1f} | '
            f'{done - lowered_at:.1f} |', flush=True)


def step_times() -> None:
  print('| strategy | ms/step (median) | compile (s) |\n|---|---|---|')
  rng = np.random.default_rng(0)
  for name, overrides in STRATEGIES.items():
    config = make_config(128, 4, 4, 256, 128, 32, **overrides)
    devices = jax.local_devices()[:1 if name.startswith('one') else 8]
    strategy = parallel.make(config, devices)
    state = strategy.init(functools.partial(train.create_state, config,
                                            axis_name=strategy.axis_name))
    step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
    tokens = rng.integers(0, 256, (1, 32, 129)).astype(np.int32)
    host = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
            'weights': np.ones((1, 32, 128), np.float32)}
    batch = strategy.shard(host, batch_axis=1)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_STEPS):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    print(f'| {name} | {1e3 * np.median(times):.1f} | {compile_s:.1f} |', flush=True)


def memory() -> None:
  print('| mesh of 8 | arguments / device (MiB) | temporaries (MiB) | outputs (MiB) |\n'
        '|---|---|---|---|')
  mib = lambda n: f'{n / 2**20:,.1f}'
  for name, overrides in (('data=8', dict(mesh_data=8)),
                          ('fsdp=8', dict(mesh_data=1, mesh_fsdp=8))):
    config = gpt2_small(seq_len=256, strategy='mesh', **overrides)
    strategy = parallel.make(config, jax.local_devices()[:8])
    init = functools.partial(train.create_state, config)
    state = strategy.target(jax.eval_shape(init))
    batch_sharding = jax.NamedSharding(strategy.mesh, jax.P(None, strategy.batch_axes))
    step_fn = strategy.compile(train.train_steps, donate_argnums=(0,), state=state)
    compiled = step_fn.lower(state, abstract_batch(config, batch_sharding)).compile()
    m = compiled.memory_analysis()
    print(f'| {name} | {mib(m.argument_size_in_bytes)} | {mib(m.temp_size_in_bytes)} | '
          f'{mib(m.output_size_in_bytes)} |', flush=True)


def main(argv):
  del argv
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}')
  for what in _WHAT.value:
    {'compile': compile_times, 'steps': step_times, 'memory': memory}[what]()


if __name__ == '__main__':
  app.run(main)
