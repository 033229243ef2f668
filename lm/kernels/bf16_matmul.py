"""A float32 matmul with bfloat16-rounded operands, natively on CPUs with AVX512-BF16.

`matmul(a, b, trans_a, trans_b)` computes op(a) @ op(b) (op: transpose or not) for 2-D float32
arrays, rounding both operands to bfloat16 and summing the products in float32, as TPUs do at
their default precision. On a CPU with AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and
later; AMD Zen 4 and later) this calls bf16_matmul.cc: about 1.9x XLA's float32 rate at a small
model's shapes, where XLA's own bfloat16 matmuls ran at its float32 rate (under YNNPACK, which
converts the operands) or, for a transposed left operand, below it (benchmarks/BENCHMARKS.md).
Elsewhere it is `lax.dot_general` on the rounded operands: the same numbers up to the order of
the float32 sums. The kernel splits matmuls of 2^26 multiply-adds or more over XLA's intra-op
threads and runs smaller ones on its caller's thread.

The kernel is compiled on first use with the system's C++ compiler ($CXX, else c++) against
the FFI headers jaxlib ships, into $LM_CACHE_DIR (default ~/.cache/lm), keyed by the source, the
jaxlib version and the command. Without a compiler, or if the build fails, a warning names the
cause once and the XLA path is used.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import lax
import jaxlib

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bf16_matmul.cc')
_TARGET = 'lm_bf16_matmul'


def _cache_dir() -> str:
  return os.environ.get('LM_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'lm')


def _build() -> str:
  """Compiles the kernel (once per source, jaxlib and command) and returns the library's path."""
  compiler = os.environ.get('CXX') or 'c++'
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler {compiler!r} on PATH (set $CXX to one)')
  command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC', '-w',
             f'-I{jax.ffi.include_dir()}']
  with open(_SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + jaxlib.__version__.encode() + ' '.join(command).encode())
  path = os.path.join(_cache_dir(), f'bf16_matmul-{key.hexdigest()[:16]}.so')
  if os.path.exists(path):
    return path
  try:
    os.makedirs(_cache_dir(), exist_ok=True)
    # Built beside its final name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=_cache_dir())
    os.close(fd)
  except OSError as e:
    raise RuntimeError(f'cannot write the kernel cache {_cache_dir()} ({e}); point '
                       '$LM_CACHE_DIR at a writable directory') from e
  try:
    result = subprocess.run(command + [_SOURCE, '-o', tmp], capture_output=True, text=True,
                            check=False, timeout=600)
    if result.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-2000:]}')
    os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def native() -> bool:
  """Whether the native kernel serves this process: built, loaded, and the CPU has AVX512-BF16."""
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    return False  # AVX512-BF16 is an x86 extension
  try:
    library = ctypes.cdll.LoadLibrary(_build())
  except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
    logging.warning('The native bfloat16 matmul kernel is unavailable, so bfloat16 matmuls take '
                    'XLA\'s path: %s', e)
    return False
  if not library.LmBf16Supported():
    return False  # a CPU without AVX512-BF16 (applies() warns that XLA's path is slower)
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.LmBf16Matmul), platform='cpu')
  return True


def rounded(x: jax.Array) -> jax.Array:
  """x rounded to bfloat16 (to nearest even), the operand both paths multiply."""
  return x.astype(jnp.bfloat16)


def reference(a: jax.Array, b: jax.Array, trans_a: bool = False,
              trans_b: bool = False) -> jax.Array:
  """op(a) @ op(b) through XLA, with the operands rounded to bfloat16 and float32 sums."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(rounded(a), rounded(b), dims, preferred_element_type=jnp.float32)


def applies(*operands: jax.Array) -> bool:
  """Whether `matmul` of these operands runs the native kernel, traced here.

  It takes float32 operands on CPU where arrays are one device's: outside a mesh, under pmap or
  shard_map (every mesh axis manual), or on a one-device mesh. Under a mesh that XLA partitions
  the operands would be gathered onto every device around the custom call, so XLA's own matmul
  serves there. A jit with NamedSharding inputs but no jax.set_mesh looks like no mesh here.
  """
  if any(x.dtype != jnp.float32 for x in operands) or jax.default_backend() != 'cpu':
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if not (mesh.empty or mesh.are_all_axes_manual or mesh.size == 1):
    return False
  if not native():
    _warn_xla_path()
    return False
  return True


@functools.cache
def _warn_xla_path() -> None:
  logging.warning(
      'bfloat16 matmuls on this CPU take XLA\'s path, which is slower than float32 here (no '
      'AVX512-BF16, or the kernel did not build: see any warning above). For speed set '
      '--config.model.matmul_precision=float32.')


def matmul(a: jax.Array, b: jax.Array, trans_a: bool = False,
           trans_b: bool = False) -> jax.Array:
  """op(a) [M, K] @ op(b) [K, N] -> [M, N] float32, operands rounded to bfloat16.

  a is [M, K] ([K, M] if trans_a), b [K, N] ([N, K] if trans_b): the native kernel where
  `applies`, else `reference`.
  """
  if not applies(a, b):
    return reference(a, b, trans_a, trans_b)
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method='sequential')
  return call(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))
