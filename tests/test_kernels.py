"""Tests for lm/kernels: the native bfloat16 matmul against XLA on the same rounded operands."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import bf16_matmul

native = pytest.mark.skipif(not bf16_matmul.native(),
                            reason='no AVX512-BF16 on this CPU, or no C++ compiler')


def _cpu_flags() -> set[str]:
  try:
    with open('/proc/cpuinfo') as f:
      return {flag for line in f if line.startswith('flags') for flag in line.split()}
  except OSError:
    return set()


@pytest.mark.skipif('avx512_bf16' not in _cpu_flags() or not shutil.which('c++'),
                    reason='a CPU without AVX512-BF16, or no C++ compiler: XLA serves')
def test_the_kernel_builds_and_serves_where_the_cpu_can_run_it():
  # Guards the skips below: a broken build would otherwise skip every kernel test silently.
  assert bf16_matmul.native()


def _operands(m, k, n, trans_a, trans_b, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
  b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(b)


def _rounded_product(a, b, trans_a, trans_b):
  """op(a) @ op(b) in float64 over the bfloat16-rounded operands: the exact answer."""
  r = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  a, b = r(a), r(b)
  return (a.T if trans_a else a) @ (b.T if trans_b else b)


# Tails of every block: M not a multiple of 12 rows, N not of 32 columns, K odd, and K over
# 512 (two blocks of k pairs); plus this project's own shapes.
SHAPES = [(1, 1, 1), (5, 7, 3), (13, 33, 65), (12, 2, 32), (37, 600, 70), (25, 1025, 17),
          (384, 128, 512), (128, 384, 128),
          # Over kParallelWork (2^26), split over threads: by rows; by columns, 3 k-pair blocks.
          (513, 301, 450), (40, 1100, 2048)]


@native
@pytest.mark.parametrize('m, k, n', SHAPES)
@pytest.mark.parametrize('trans_a, trans_b', [(False, False), (False, True), (True, False),
                                              (True, True)])
def test_kernel_sums_the_rounded_operands_in_float32(m, k, n, trans_a, trans_b):
  a, b = _operands(m, k, n, trans_a, trans_b)
  got = jax.jit(bf16_matmul.matmul, static_argnums=(2, 3))(a, b, trans_a, trans_b)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  want = _rounded_product(a, b, trans_a, trans_b)
  # Products of bf16 values are exact in float32; only the float32 sums round.
  np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.sqrt(k) * np.abs(want).max())
  np.testing.assert_allclose(got, bf16_matmul.reference(a, b, trans_a, trans_b), rtol=1e-5,
                             atol=1e-5 * np.sqrt(k))


@native
def test_kernel_rounds_to_nearest_even_and_passes_specials():
  one_and_half_ulp = np.float32(1 + 2**-8 + 2**-9)  # between 1 + 2^-8 and 1 + 2^-7
  tie = np.float32(1 + 2**-8)  # halfway between 1 and 1 + 2^-7: even is 1
  a = jnp.asarray([[one_and_half_ulp], [tie], [np.inf], [np.nan]], jnp.float32)
  b = jnp.ones((1, 1), jnp.float32)
  got = np.asarray(jax.jit(bf16_matmul.matmul)(a, b))[:, 0]
  assert got[0] == 1 + 2**-7 and got[1] == 1.0
  assert np.isposinf(got[2]) and np.isnan(got[3])


@native
def test_kernel_is_the_custom_call_and_reference_is_xla():
  a, b = _operands(8, 16, 8, False, False)
  assert 'lm_bf16_matmul' in jax.jit(bf16_matmul.matmul).lower(a, b).as_text()
  assert 'lm_bf16_matmul' not in jax.jit(bf16_matmul.reference).lower(a, b).as_text()
  # Operands that are not float32 take XLA's path.
  half = jax.jit(bf16_matmul.matmul).lower(a.astype(jnp.bfloat16), b).as_text()
  assert 'lm_bf16_matmul' not in half


@native
def test_kernel_under_vmap_and_pmap():
  a = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, 40)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(2).standard_normal((2, 40, 36)), jnp.float32)
  want = jax.vmap(bf16_matmul.reference)(a, b)
  np.testing.assert_allclose(jax.vmap(bf16_matmul.matmul)(a, b), want, rtol=1e-5, atol=1e-5)
  devices = jax.local_devices()[:2]
  if len(devices) == 2:
    pmapped = jax.pmap(bf16_matmul.matmul, devices=devices)
    np.testing.assert_allclose(pmapped(a, b), want, rtol=1e-5, atol=1e-5)
    assert 'lm_bf16_matmul' in pmapped.lower(a, b).as_text()


@native
@pytest.mark.parametrize('devices, kernel', [(2, False), (1, True)])
def test_a_partitioned_mesh_takes_xla_and_a_one_device_mesh_the_kernel(devices, kernel):
  if jax.local_device_count() < devices:
    pytest.skip('needs 2 (fake) devices')
  a, b = _operands(16, 24, 8, False, False)
  mesh = jax.make_mesh((devices,), ('data',), devices=jax.local_devices()[:devices])
  with jax.set_mesh(mesh):
    assert ('lm_bf16_matmul' in jax.jit(bf16_matmul.matmul).lower(a, b).as_text()) == kernel


def test_cpus_without_the_kernel_warn_once_that_xla_is_slower(monkeypatch, caplog):
  monkeypatch.setattr(bf16_matmul, 'native', lambda: False)
  bf16_matmul._warn_xla_path.cache_clear()
  a, b = _operands(6, 10, 4, False, False)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      np.testing.assert_allclose(bf16_matmul.matmul(a, b), _rounded_product(a, b, False, False),
                                 rtol=1e-6, atol=1e-5)
  warnings = [r.getMessage() for r in caplog.records if 'slower than float32' in r.getMessage()]
  assert len(warnings) == 1 and 'matmul_precision=float32' in warnings[0]


def test_other_architectures_do_not_try_to_build(monkeypatch):
  monkeypatch.setattr(bf16_matmul.platform, 'machine', lambda: 'aarch64')
  monkeypatch.setattr(bf16_matmul, '_build', lambda: pytest.fail('built on aarch64'))
  bf16_matmul.native.cache_clear()
  try:
    assert not bf16_matmul.native()
  finally:
    bf16_matmul.native.cache_clear()


def test_a_failed_build_warns_once_and_xla_takes_over(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv('CXX', 'no-such-compiler-lm')
  monkeypatch.setenv('LM_CACHE_DIR', str(tmp_path))
  bf16_matmul.native.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not bf16_matmul.native()
      a, b = _operands(6, 10, 4, False, False)
      got = jax.jit(bf16_matmul.matmul).lower(a, b).as_text()
    assert 'lm_bf16_matmul' not in got
    warnings = [r.getMessage() for r in caplog.records if 'unavailable' in r.getMessage()]
    assert len(warnings) == 1 and 'no-such-compiler-lm' in warnings[0] and '$CXX' in warnings[0]
    np.testing.assert_allclose(bf16_matmul.matmul(a, b),
                               _rounded_product(a, b, False, False), rtol=1e-6, atol=1e-5)
  finally:
    bf16_matmul.native.cache_clear()


def test_a_compile_error_is_reported_with_the_compilers_message(monkeypatch, tmp_path, caplog):
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++\n')
  monkeypatch.setattr(bf16_matmul, '_SOURCE', str(bad))
  monkeypatch.setenv('LM_CACHE_DIR', str(tmp_path / 'cache'))
  bf16_matmul.native.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not bf16_matmul.native()
    assert 'failed' in caplog.text and 'bad.cc' in caplog.text
    assert not list((tmp_path / 'cache').glob('*.so'))  # no half-built library is left
  finally:
    bf16_matmul.native.cache_clear()


@native
def test_the_library_is_built_once_per_source(monkeypatch, tmp_path):
  monkeypatch.setenv('LM_CACHE_DIR', str(tmp_path))
  first = bf16_matmul._build()
  mtime = (tmp_path / first.split('/')[-1]).stat().st_mtime_ns
  assert bf16_matmul._build() == first
  assert (tmp_path / first.split('/')[-1]).stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [first.split('/')[-1]]
