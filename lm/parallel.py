"""How a train or eval step is spread over devices and hosts.

`parallel.strategy=pmap` (`DataParallel`): the state is replicated on every local device, each
device takes an equal slice of the global batch, and steps combine gradients over the `AXIS`
collective axis. On one device the same step runs under plain jit (no axis, no collectives).
Under jax 0.10 `jax.pmap` is a thin wrapper over jit + shard_map; it keeps replicated-state
data parallelism short, so this strategy uses it.

`parallel.strategy=mesh` (`MeshParallel`): jit over a `jax.sharding.Mesh` with axes MESH_AXES
(data, fsdp, expert, context, tensor; sizes parallel.mesh_<axis>, -1 = the devices left over).
The model's parameters carry logical axis names (nn.with_logical_partitioning); parallel.rules
maps them to mesh axes (flax logical rules), which gives every parameter a NamedSharding. Optimizer
state leaves that mirror a parameter (same path suffix and shape: Adam's moments, Muon's
momentum) share its sharding; the rest (counts, Adafactor's factored rows and columns) are
replicated. The batch is split over the mesh axes of rules.batch, and the sequence over those
of rules.length (default 'context'); XLA's SPMD partitioner derives every activation's sharding
from those of the inputs and inserts the collectives, so the step is the same pure function as
on one device (no axis name, no psum); steps are traced under the logical rules, through which
the model pins its residual stream to the batch and sequence split (nn.with_logical_constraint).
The one exception is attention over a sequence split over 'context' (parallel.mesh_context > 1):
the model runs ring attention (lm/model/ring.py), which finds the mesh because steps are traced
under it (jax.set_mesh). The state is built already sharded (jit with out_shardings), never
first on one device.

Multi-host (`initialize`): jax.distributed from parallel.coordinator_address / num_processes /
process_id, or what JAX detects (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, Cloud TPU). Each
process loads only the rows of the global batch its devices hold (`host_share`) and assembles
global arrays with jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import model as lm_model
from lm import optim

AXIS = 'data'  # the collective axis name that pmapped steps reduce over
P = jax.sharding.PartitionSpec


def make(config: lm_config.Config,
         devices: Sequence[jax.Device] | None = None) -> DataParallel | MeshParallel:
  """The configured strategy: pmap over `devices` (default: every local device), or a mesh
  over them (default: every device of every process). model.vocab_size must be resolved."""
  if config.parallel.strategy == 'mesh':
    return MeshParallel.build(config, tuple(devices or jax.devices()))
  if config.parallel.strategy != 'pmap':
    raise ValueError(f'parallel.strategy: {config.parallel.strategy!r} is not one of '
                     f'{", ".join(lm_config.STRATEGIES)}.')
  devices = tuple(devices or jax.local_devices())
  lm_config.check_devices(config, len(devices))
  return DataParallel(devices)


def initialize(config: lm_config.ParallelConfig) -> None:
  """jax.distributed.initialize for parallel.distributed runs, before any device is touched.

  Unset keys (coordinator_address '', num_processes 0, process_id -1) are left to JAX, which
  reads JAX_COORDINATOR_ADDRESS and detects SLURM, Open MPI and Cloud TPU jobs. On CPU the
  processes' collectives go over gloo (jax's default CPU collectives).
  """
  if not config.distributed or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id < 0 else config.process_id)
  except ValueError as e:
    raise ValueError(
        f'parallel.distributed=True but jax.distributed could not start: {e} Set '
        '--config.parallel.coordinator_address=HOST:PORT (process 0\'s), '
        '--config.parallel.num_processes and --config.parallel.process_id, or launch under a '
        'scheduler JAX detects (SLURM, Open MPI, Cloud TPU).') from e


def use_xla_flags(xla_flags: str) -> None:
  """Appends parallel.xla_flags to $XLA_FLAGS, where a later flag overrides an earlier one.

  XLA reads $XLA_FLAGS once, when JAX's backend starts, so only a process's entry point can
  call this (run.py and a sweep's worker processes do, before any computation).
  """
  if xla_flags:
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip()


def missing_xla_flags(xla_flags: str) -> list[str]:
  """The flags of parallel.xla_flags that this process's $XLA_FLAGS lacks."""
  present = os.environ.get('XLA_FLAGS', '').split()
  return [flag for flag in xla_flags.split() if flag not in present]


@functools.lru_cache(maxsize=8)
def abstract_params(model_config: lm_config.ModelConfig) -> Any:
  """Parameters still in their nn.Partitioned boxes, as shapes (nothing allocated)."""
  model = lm_model.Transformer(model_config)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']


# ---------------------------------------------------------------------------------------------
# pmap.

# XLA:CPU all-reduces each array separately, each with its own rendezvous of the devices: about
# 0.1 ms an array, whatever its size. So psum_tree sums flat buckets of this many bytes there.
CPU_BUCKET_BYTES = 32 << 20


def buckets(leaves: Sequence[jax.Array], max_bytes: int) -> list[list[int]]:
  """Leaf indices grouped by dtype, in order, into buckets of at most max_bytes (a larger leaf
  gets one to itself)."""
  open_bucket: dict[Any, tuple[list[int], int]] = {}  # dtype -> (indices, bytes) being filled
  done = []
  for i, leaf in enumerate(leaves):
    indices, size = open_bucket.get(leaf.dtype, ([], 0))
    if indices and size + leaf.nbytes > max_bytes:
      done.append(indices)
      indices, size = [], 0
    open_bucket[leaf.dtype] = (indices + [i], size + leaf.nbytes)
  return done + [indices for indices, _ in open_bucket.values()]


def psum_tree(tree: Any, axis_name: str) -> Any:
  """lax.psum of every leaf over `axis_name`, with the same values.

  On CPU the leaves travel as few flat buffers (`buckets` of CPU_BUCKET_BYTES), which takes
  shakespeare_char's gradient sum over two host devices from 3.8-4.0 to 1.3 ms. Other backends
  combine all-reduces themselves, and get the plain psum.
  """
  if jax.default_backend() != 'cpu':
    return jax.lax.psum(tree, axis_name)
  leaves, treedef = jax.tree.flatten(tree)
  summed = list(leaves)
  for bucket in buckets(leaves, CPU_BUCKET_BYTES):
    flat = jax.lax.psum(jnp.concatenate([leaves[i].ravel() for i in bucket]), axis_name)
    offsets = np.cumsum([0] + [leaves[i].size for i in bucket])
    for i, start, stop in zip(bucket, offsets[:-1], offsets[1:]):
      summed[i] = flat[start:stop].reshape(leaves[i].shape)
  return jax.tree.unflatten(treedef, summed)


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

  def compile(self, fn: Callable[..., Any], donate_argnums: tuple[int, ...] = (),
              state: Any = None) -> Callable:
    """fn(state, batch) compiled for these devices: pmap over AXIS, or jit on one device.

    `state` (what MeshParallel pins output shardings to) is not needed here.
    """
    del state
    if self.num_devices == 1:
      return jax.jit(fn, donate_argnums=donate_argnums)
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)

  def init(self, fn: Callable[[Any], Any], params: Any = None) -> Any:
    """The state fn(params) builds, replicated on every device."""
    return self.replicate(fn(params))

  def target(self, abstract: Any) -> Any:
    """Restore targets: one device's copy (of a checkpoint any topology saved), which `put`
    then replicates."""
    return ckpt_lib.on_one_device(abstract)

  def put(self, state: Any) -> Any:
    return self.replicate(state)

  def replicate(self, tree: Any) -> Any:
    """A host (or single-device) tree placed on every device: [devices, ...] under pmap."""
    if self.num_devices == 1:
      return jax.device_put(tree, self.devices[0])
    mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    sharding = jax.NamedSharding(mesh, P(AXIS))
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (self.num_devices, *np.shape(x)))
    return jax.device_put(jax.tree.map(stack, tree), sharding)

  def unreplicate(self, tree: Any) -> Any:
    """One copy of a replicated tree, as host numpy arrays (safe from later donation)."""
    if self.num_devices == 1:
      return jax.tree.map(lambda x: np.array(x, copy=True), tree)
    return jax.tree.map(
        lambda x: np.array(x.addressable_shards[0].data, copy=True).reshape(x.shape[1:]), tree)

  def for_checkpoint(self, tree: Any) -> Any:
    """What orbax saves: one host copy of the replicated tree."""
    return self.unreplicate(tree)

  def host_share(self, batch_size: int) -> tuple[int, int]:
    """(index, count): this process loads the index-th of count equal row blocks."""
    del batch_size
    return jax.process_index(), jax.process_count()

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
    return jax.device_put(jax.tree.map(split, batch), jax.NamedSharding(mesh, P(AXIS)))

  def first(self, tree: Any) -> Any:
    """Outputs that every device computed alike (metrics after psum): device 0's, on host."""
    if self.num_devices == 1:
      return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


# ---------------------------------------------------------------------------------------------
# Mesh.


def mesh_shape(config: lm_config.ParallelConfig, num_devices: int) -> dict[str, int]:
  """Resolved size of each of MESH_AXES (-1 takes the rest); their product is num_devices."""
  sizes = config.mesh_sizes
  named = ' x '.join(f'mesh_{axis}={size}' for axis, size in sizes.items())
  fixed = math.prod(size for size in sizes.values() if size != -1)
  rest = [axis for axis, size in sizes.items() if size == -1]
  if rest:
    if num_devices % fixed:
      raise ValueError(
          f'parallel: {named} leaves parallel.mesh_{rest[0]} the rest of {num_devices} '
          f'devices, but {fixed} does not divide {num_devices}. Use sizes whose product '
          f'divides {num_devices}.')
    sizes = dict(sizes, **{rest[0]: num_devices // fixed})
  elif fixed != num_devices:
    raise ValueError(
        f'parallel: the mesh {named} has {fixed} devices, but there are {num_devices}. Make '
        f'the sizes multiply to {num_devices}, or set one of them to -1 (the rest), e.g. '
        '--config.parallel.mesh_data=-1.')
  return sizes


@dataclasses.dataclass(frozen=True)
class MeshParallel:
  """jit over a named device mesh; parameters sharded by their logical axis names."""

  mesh: jax.sharding.Mesh
  batch_axes: tuple[str, ...]  # mesh axes the batch (rules.batch) is split over
  length_axes: tuple[str, ...]  # mesh axes the sequence (rules.length) is split over
  param_shardings: dict[str, tuple[tuple[int, ...], jax.NamedSharding]]  # path -> shape, sharding
  rules: tuple[tuple[str, Any], ...]  # flax logical rules, for the model's activation constraints

  @classmethod
  def build(cls, config: lm_config.Config, devices: Sequence[jax.Device]) -> MeshParallel:
    """The mesh over `devices`, after checking every size it has to divide."""
    p = config.parallel
    sizes = mesh_shape(p, len(devices))
    mesh = jax.make_mesh(tuple(sizes.values()), lm_config.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices)
    batch_axes = lm_config.mesh_axes(dict(p.rules)['batch'])
    shards = math.prod(sizes[axis] for axis in batch_axes)
    over = ' x '.join(f'mesh_{axis}' for axis in batch_axes) or 'no mesh axis'
    lm_config.check_devices(config, shards, over=f'batch shards ({over}, parallel.rules.batch)')
    length_axes = lm_config.mesh_axes(dict(p.rules)['length'])
    chunks = math.prod(sizes[axis] for axis in length_axes)
    if config.data.seq_len % chunks:
      over = ' x '.join(f'mesh_{axis}={sizes[axis]}' for axis in length_axes)
      raise ValueError(
          f'data.seq_len={config.data.seq_len} does not split over {over} ({chunks} chunks, '
          f'parallel.rules.length). Use a multiple of {chunks} for data.seq_len.')
    return cls(mesh, batch_axes, length_axes, _param_shardings(config.model, p, mesh),
               p.mesh_rules())

  @property
  def devices(self) -> tuple[jax.Device, ...]:
    return tuple(self.mesh.devices.flat)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def axis_name(self) -> None:
    """No collective axis: jit over global arrays reduces over the whole batch by itself."""
    return None

  @property
  def replicated(self) -> jax.NamedSharding:
    return jax.NamedSharding(self.mesh, P())

  def shardings(self, tree: Any) -> Any:
    """A NamedSharding per leaf: a parameter's own, also for any leaf whose path ends with a
    parameter's path and has its shape (optimizer moments); replicated otherwise."""

    def sharding(path: tuple[Any, ...], leaf: Any) -> jax.NamedSharding:
      parts = optim.path_str(path).split('/')
      shape = tuple(getattr(leaf, 'shape', np.shape(leaf)))
      for i in range(len(parts)):  # the longest matching suffix first
        found = self.param_shardings.get('/'.join(parts[i:]))
        if found is not None and found[0] == shape:
          return found[1]
      return self.replicated

    return jax.tree_util.tree_map_with_path(sharding, tree)

  def compile(self, fn: Callable[..., Any], donate_argnums: tuple[int, ...] = (),
              state: Any = None) -> Callable:
    """fn(state, batch) under jit; inputs keep the shardings they arrive with.

    With `state`, fn returns (new state, outputs) and the new state keeps `state`'s shardings
    (so donation reuses the buffers and the next call does not recompile); outputs, and
    everything fn returns without `state`, come back replicated (metrics, sums).

    fn is traced under the mesh (jax.set_mesh), where ring attention finds it, and under the
    logical axis rules, through which the model pins its residual stream (lm.model.transformer).
    """
    if state is None:
      out_shardings = self.replicated
    else:
      out_shardings = (jax.tree.map(lambda x: x.sharding, state), self.replicated)
    jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate_argnums)
    return _Traced(jitted, self.mesh, self.rules)

  def init(self, fn: Callable[[Any], Any], params: Any = None) -> Any:
    """The state fn(params) builds, created sharded: each device computes only its shards.

    Given params (host arrays, e.g. init_from) go straight to their shardings first.
    """
    shardings = self.shardings(jax.eval_shape(fn, params))
    if params is not None:
      params = jax.device_put(params, self.shardings(params))
    return jax.jit(fn, out_shardings=shardings)(params)

  def target(self, abstract: Any) -> Any:
    """Restore targets: shapes with the shardings orbax should restore straight into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.shardings(abstract))

  def put(self, state: Any) -> Any:
    """Places a state's leaves on their shardings (already placed ones stay where they are)."""
    return jax.device_put(state, self.shardings(state))

  def unreplicate(self, tree: Any) -> Any:
    """The whole (sharded) tree as host numpy arrays, gathered from every process."""
    if jax.process_count() == 1:
      return jax.tree.map(lambda x: np.array(x, copy=True), tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  def for_checkpoint(self, tree: Any) -> Any:
    """What orbax saves: the sharded arrays themselves; each process writes its own shards
    (orbax copies them to host before save() returns, so later donation is safe)."""
    return tree

  @functools.cached_property
  def _host_block(self) -> tuple[int, int]:
    """(index, count) of this process's rows among `count` equal blocks of any batch."""
    shards = math.prod(self.mesh.shape[axis] for axis in self.batch_axes)
    sharding = jax.NamedSharding(self.mesh, P(self.batch_axes or None))
    rows = sorted({(s[0].start or 0, shards if s[0].stop is None else s[0].stop)
                   for s in sharding.addressable_devices_indices_map((shards,)).values()})
    lo, hi = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or (hi - lo) * (lo // (hi - lo)) != lo:
      raise ValueError(
          f'Process {jax.process_index()} holds batch shards {rows} of {shards}, not one '
          'contiguous block, so it cannot load a slice of the batch. Order the mesh so that '
          'each host\'s devices are adjacent along the parallel.rules.batch axes (put '
          'mesh_tensor, which does not split the batch, within a host).')
    return lo // (hi - lo), shards // (hi - lo)

  def host_share(self, batch_size: int) -> tuple[int, int]:
    """(index, count): this process loads the index-th of count equal row blocks."""
    index, count = self._host_block
    if batch_size % count:
      raise ValueError(f'A batch of {batch_size} sequences does not split into the {count} '
                       'blocks the processes load; use a multiple of it.')
    return index, count

  def shard(self, batch: dict[str, np.ndarray], batch_axis: int = 0) -> dict[str, Any]:
    """This process's rows of a batch -> global arrays with `batch_axis` split over the
    mesh's batch axes and the last axis, the sequence, over its length axes ([K, B, T] with
    batch_axis=1 stays [K, B, T], B and T sharded; DPO's [K, B, 2, T] keeps its pairs whole)."""
    _, count = self._host_block

    def put(x: np.ndarray) -> jax.Array:
      x = np.asarray(x)
      shape = (*x.shape[:batch_axis], x.shape[batch_axis] * count, *x.shape[batch_axis + 1:])
      spec = [None] * x.ndim
      spec[batch_axis] = self.batch_axes or None
      if x.ndim > batch_axis + 1:
        spec[-1] = self.length_axes or None
      sharding = jax.NamedSharding(self.mesh, P(*spec))
      return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, batch)

  def first(self, tree: Any) -> Any:
    """Replicated outputs (metrics, sums) as host arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


@dataclasses.dataclass(frozen=True)
class _Traced:
  """A jitted function traced (called or lowered) under its mesh and logical axis rules."""

  jitted: Any
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]

  def __call__(self, *args: Any) -> Any:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted(*args)

  def lower(self, *args: Any) -> Any:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*args)


def _param_shardings(model_config: lm_config.ModelConfig, config: lm_config.ParallelConfig,
                     mesh: jax.sharding.Mesh) -> dict[str, tuple[tuple[int, ...],
                                                             jax.NamedSharding]]:
  """path -> (shape, NamedSharding) of every parameter, checked against the mesh sizes."""
  boxed = abstract_params(model_config)
  logical = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  rules = config.mesh_rules()
  result = {}
  is_spec = lambda x: isinstance(x, P)
  for (path, names), shape in zip(
      jax.tree_util.tree_leaves_with_path(logical, is_leaf=is_spec), jax.tree.leaves(shapes)):
    name = optim.path_str(path)
    for axis in names:
      if axis is not None and axis not in lm_config.LOGICAL_AXES:
        raise ValueError(
            f'Parameter {name} has the logical axis {axis!r}, which has no parallel.rules '
            'entry. Add it to LOGICAL_AXES in lm/config.py and to parallel.rules in '
            'configs/base.py.')
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    _check_divides(name, shape.shape, tuple(names), spec, mesh)
    result[name] = (tuple(shape.shape), jax.NamedSharding(mesh, spec))
  return result


def _check_divides(name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
                   spec: P, mesh: jax.sharding.Mesh) -> None:
  for dim, (size, logical, axes) in enumerate(zip(shape, names, spec)):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    if size % shards:
      over = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
      raise ValueError(
          f'parallel: parameter {name} {shape} has axis {dim} ({logical!r}, size {size}) '
          f'sharded over mesh axes {over} ({shards} shards), which does not divide {size}. '
          f"Set --config.parallel.rules.{logical}='' to replicate it, or mesh sizes whose "
          f'product over {", ".join(axes)} divides {size}.')


Strategy = DataParallel | MeshParallel  # what make() returns; the loop uses either alike
