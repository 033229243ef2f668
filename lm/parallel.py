"""How a train or eval step is spread over devices.

`parallel.strategy=pmap`: the state is replicated on every local device, each device takes an
equal slice of the global batch, and steps combine gradients over the `AXIS` collective axis.
On one device the same step runs under plain jit (no device axis, no collectives).

Under jax 0.10 `jax.pmap` is a thin wrapper over jit + shard_map and its docs point new code to
shard_map; it is not deprecated with a warning, and it keeps replicated-state data parallelism
short, so this strategy uses it. `mesh` (jit over a named sharded mesh) is not implemented yet.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lm import config as lm_config

AXIS = 'data'  # the collective axis name that pmapped steps reduce over


def make(config: lm_config.Config, devices: Sequence[jax.Device] | None = None) -> DataParallel:
  """The configured strategy over `devices` (default: every local device)."""
  if config.parallel.strategy == 'mesh':
    raise NotImplementedError(
        'parallel.strategy=mesh is not implemented yet. Use --config.parallel.strategy=pmap '
        '(replicated data parallelism over all local devices).')
  if config.parallel.strategy != 'pmap':
    raise ValueError(f'parallel.strategy: {config.parallel.strategy!r} is not one of '
                     f'{", ".join(lm_config.STRATEGIES)}.')
  devices = tuple(devices or jax.local_devices())
  lm_config.check_devices(config, len(devices))
  return DataParallel(devices)


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """Replicated-state data parallelism over `devices` (pmap; jit on a single device)."""

  devices: tuple[jax.Device, ...]

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self) -> str | None:
    """The axis collectives reduce over; None on one device (the step skips collectives)."""
    return AXIS if self.num_devices > 1 else None

  def compile(self, fn: Callable[..., Any], donate_argnums: tuple[int, ...] = ()) -> Callable:
    """fn(state, batch) compiled for these devices: pmap over AXIS, or jit on one device."""
    if self.num_devices == 1:
      return jax.jit(fn, donate_argnums=donate_argnums)
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)

  def replicate(self, tree: Any) -> Any:
    """A host (or single-device) tree placed on every device: [devices, ...] under pmap."""
    if self.num_devices == 1:
      return jax.device_put(tree, self.devices[0])
    mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    sharding = jax.NamedSharding(mesh, jax.P(AXIS))
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (self.num_devices, *np.shape(x)))
    return jax.device_put(jax.tree.map(stack, tree), sharding)

  def unreplicate(self, tree: Any) -> Any:
    """One copy of a replicated tree, as host numpy arrays (safe from later donation)."""
    if self.num_devices == 1:
      return jax.tree.map(lambda x: np.array(x, copy=True), tree)
    return jax.tree.map(
        lambda x: np.array(x.addressable_shards[0].data, copy=True).reshape(x.shape[1:]), tree)

  def shard(self, batch: dict[str, np.ndarray], batch_axis: int = 0) -> dict[str, Any]:
    """Splits a host batch's `batch_axis` over the devices, as a leading device axis.

    [K, B, T] with batch_axis=1 becomes [devices, K, B / devices, T]; on one device the batch
    is only moved to the device.
    """
    if self.num_devices == 1:
      return jax.device_put(batch, self.devices[0])
    n = self.num_devices

    def split(x: np.ndarray) -> np.ndarray:
      x = np.asarray(x)
      size = x.shape[batch_axis]
      if size % n:
        raise ValueError(f'A batch of {size} sequences does not split over {n} devices; '
                         f'use a batch size divisible by {n}.')
      x = x.reshape(*x.shape[:batch_axis], n, size // n, *x.shape[batch_axis + 1:])
      return np.moveaxis(x, batch_axis, 0)

    mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    return jax.device_put(jax.tree.map(split, batch), jax.NamedSharding(mesh, jax.P(AXIS)))

  def first(self, tree: Any) -> Any:
    """Outputs that every device computed alike (metrics after psum): device 0's, on host."""
    if self.num_devices == 1:
      return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
