"""Training logs: DIR/metrics.jsonl, TensorBoard events, a progress bar, and MFU.

MFU = flops_per_token x tokens/s / peak FLOP/s. The peak comes from `train.peak_flops`, else
from a table of accelerators (dense bf16 tensor-core/MXU peaks), else, on CPU, from a matmul
measured once per process at the model's matmul precision.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm

from lm.kernels import bf16_matmul

METRICS_FILE = 'metrics.jsonl'

# Dense bf16 peak FLOP/s per device, matched against jax's device_kind (first match wins).
PEAK_FLOPS = (
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('A10', 125e12),
    ('V100', 125e12),
    ('TPU v6', 918e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 197e12),  # v5e / v5 lite
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
)


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(size: int = 1024, repeats: int = 5,
                       matmul_precision: str = 'float32') -> float:
  """FLOP/s of [size, size] matmuls on the CPU: the best of a few timed runs.

  On CPU every (fake) device shares the same cores, so this is the whole host's peak. XLA's
  float32 matmul spreads over the cores by itself. The bfloat16 kernel runs a data-parallel
  step's small matmuls on each device's own thread, so it is timed on every local CPU device at
  once. Under parallel.strategy=mesh bfloat16 matmuls take XLA's path, slower than this peak.
  """
  if matmul_precision == 'bfloat16':
    devices = jax.local_devices(backend='cpu')
    a = jax.pmap(lambda x: x, devices=devices)(np.ones((len(devices), size, size), np.float32))
    matmul = jax.pmap(lambda x: bf16_matmul.matmul(x, x), devices=devices)
  else:
    devices = jax.local_devices(backend='cpu')[:1]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), devices[0])
    matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 * len(devices) / best


def peak_flops(devices: Sequence[jax.Device], per_device: float = 0.0,
               matmul_precision: str = 'float32') -> float:
  """Total peak FLOP/s of `devices`: per_device (train.peak_flops) if set, else a table or,
  for CPU, the measured matmul rate at model.matmul_precision (not multiplied by the devices:
  fake CPU devices share the cores)."""
  if per_device > 0:
    return per_device * len(devices)
  device = devices[0]
  if device.platform == 'cpu':
    return measured_cpu_flops(matmul_precision=matmul_precision)
  for name, flops in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
      return flops * len(devices)
  return math.nan  # unknown accelerator: set train.peak_flops


class Writer:
  """Appends one JSON object per log step to DIR/metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      truncate(self.path, resume_step)
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = tensorboardX.SummaryWriter(workdir)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def truncate(path: str, last_step: int) -> None:
  """Drops lines past `last_step` (logged after the checkpoint a run resumes from)."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip() and json.loads(line)['step'] <= last_step]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines)


def read(workdir: str) -> list[dict[str, Any]]:
  """Every record of DIR/metrics.jsonl, in order."""
  with open(os.path.join(workdir, METRICS_FILE), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item()
  return value


class Progress:
  """A tqdm bar over optimizer steps showing loss, tokens/s, MFU and (tqdm's) ETA."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self._bar = tqdm.tqdm(initial=start, total=total, unit='step', dynamic_ncols=True,
                          disable=not enabled, smoothing=0.1)

  def update(self, steps: int, loss: float, tokens_per_sec: float | None,
             mfu: float | None) -> None:
    postfix = {'loss': f'{loss:.4f}'}
    if tokens_per_sec is not None:
      postfix['tok/s'] = f'{tokens_per_sec:,.0f}'
    if mfu is not None and math.isfinite(mfu):
      postfix['mfu'] = f'{100 * mfu:.1f}%'
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(steps)

  def write(self, message: str) -> None:
    self._bar.write(message)

  def close(self) -> None:
    self._bar.close()
