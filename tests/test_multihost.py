"""Multi-host: 2 processes on localhost (2 CPU devices each, jax.distributed with gloo
collectives) train like one process on 4 devices; only process 0 logs; checkpoints are written
by both together."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm import metrics
from lm import train
from tests import multihost_worker
from tests import train_fakes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.skipif(jax.local_device_count() < 4, reason='the reference needs 4 (fake) devices')
def test_two_processes_train_like_one(tmp_path):
  workdir, port = tmp_path / 'two', free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  processes = [subprocess.Popen(
      [sys.executable, 'tests/multihost_worker.py', str(i), '2', str(port), str(workdir)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  outputs = []
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      raise
  for i, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f'process {i}:\n{output[-3000:]}'
    assert f'process {i} done' in output
  assert 'validation loss' in outputs[0] and 'validation loss' not in outputs[1]

  reference = tmp_path / 'one'
  config = train_fakes.tiny_config(**multihost_worker.OVERRIDES)
  train.train(config, str(reference), devices=jax.local_devices()[:4],
              data=train_fakes.FakeData(), progress=False)
  expected, records = metrics.read(str(reference)), metrics.read(str(workdir))
  assert [r['step'] for r in records] == [r['step'] for r in expected] == [2, 3, 4, 6]
  for want, got in zip(expected, records):
    for key in ('train/loss', 'train/grad_norm', 'eval/loss', 'eval/tokens'):
      if key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  assert checkpoint.available_steps(str(workdir)) == [3, 6]
  params, _ = checkpoint.restore_params(str(workdir), 6, config.model)
  params_1, _ = checkpoint.restore_params(str(reference), 6, config.model)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)  # Adam: tiny grads flip
