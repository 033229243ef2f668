// C [M, N] = A [M, K] @ B [K, N] with the operands rounded to bfloat16 and the products summed
// in float32, for XLA:CPU as an FFI custom call (lm/kernels/bf16_matmul.py builds and calls it).
//
// Why: XLA:CPU's bfloat16 matmuls ran no faster than its float32 ones at a small model's shapes
// (YNNPACK converts the operands; other paths slow down for a transposed left operand, which
// every weight gradient reads). AVX512-BF16's vdpbf16ps multiplies 32 bf16 pairs and adds them
// into 16 float32 lanes in one instruction, twice the float32 FMA's work. Inputs and output are float32
// arrays; rounding (to nearest even) happens while the operands are repacked.
//
// Layout. vdpbf16ps lane i adds a[2i] * b[2i] + a[2i+1] * b[2i+1], so both operands are packed as
// 32-bit words that each hold a pair of consecutive k: A as words [m][kp] or [kp][m] (two
// strides, whichever its float32 layout gives without a transpose), B as words [kp][n]. The
// micro-kernel keeps an MR x 32 block of C in 2 * MR vector registers and, per k pair, loads two
// vectors of B and broadcasts one word of A per row.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMR = 12;   // rows of C per micro-kernel call
constexpr int64_t kNR = 32;   // columns of C per micro-kernel call: two vectors
constexpr int64_t kKPC = 256; // k pairs per block of B kept hot in cache
// Multiply-adds below which a matmul stays on its caller's thread: a small model's matmuls
// (shakespeare_char's are 6-25M) run where each data-parallel device already has its core.
constexpr int64_t kParallelWork = int64_t{1} << 26;
// Packing buffers up to this size are kept for the thread's next call; larger ones are freed.
constexpr size_t kKeepScratchBytes = size_t{64} << 20;

// The first min(n, 16) of 16 lanes.
inline __mmask16 TailMask(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << std::max<int64_t>(n, 0)) - 1);
}

// Lane i of the result holds (lo[i], hi[i]) as bf16: lo in the low half of the 32-bit word.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i PairUp(__m512 lo, __m512 hi) {
  // cvtne2ps_pbh puts hi's 16 values above lo's; the permutation interleaves them.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Float32 rows [R, C] (row stride ld) -> words [R, ceil(C / 2)]: each word a pair along C.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void PackAlongRows(const float* x, int64_t rows, int64_t cols, int64_t ld, uint32_t* out) {
  const int64_t words = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * ld;
    uint32_t* dst = out + r * words;
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      // Consecutive floats are already the pairs: no interleave needed.
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + 16), _mm512_loadu_ps(src + c));
      _mm512_storeu_si512(dst + c / 2, (__m512i)v);
    }
    if (c < cols) {
      const int64_t left = cols - c;  // 1..31
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(TailMask(left - 16), src + c + 16),
                                       _mm512_maskz_loadu_ps(TailMask(left), src + c));
      const int64_t n_words = (left + 1) / 2;
      _mm512_mask_storeu_epi32(dst + c / 2, TailMask(n_words), (__m512i)v);
    }
  }
}

// Float32 rows [R, C] (row stride ld), rows r0..r0 + 2 * kp_count -> words [kp][C]: each word the
// pair (row 2kp, row 2kp + 1) of one column; a missing last row counts as zeros.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void PackAcrossRows(const float* x, int64_t rows, int64_t cols, int64_t ld, uint32_t* out) {
  const int64_t pairs = (rows + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const float* even = x + 2 * p * ld;
    const float* odd = 2 * p + 1 < rows ? even + ld : nullptr;
    uint32_t* dst = out + p * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = TailMask(cols - c);
      __m512 e = _mm512_maskz_loadu_ps(m, even + c);
      __m512 o = odd ? _mm512_maskz_loadu_ps(m, odd + c) : _mm512_setzero_ps();
      // Words for 16 columns: the even row's value low, the odd row's high.
      __m512i w = PairUp(e, o);
      _mm512_mask_storeu_epi32(dst + c, m, w);
    }
  }
}

// Words [R, W] -> [W, R], 16 x 16 tiles transposed in registers: 32-bit then 64-bit interleaves
// leave each 128-bit lane a transposed 4 x 4 block, and two lane shuffles gather the blocks.
__attribute__((target("avx512f")))
void TransposeWords(const uint32_t* in, int64_t rows, int64_t words, uint32_t* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t nw = std::min<int64_t>(16, words - w0);
      __m512i r[16], a[16], b[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nr ? _mm512_maskz_loadu_epi32(TailMask(nw), in + (r0 + i) * words + w0)
                      : _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {  // b[4i + j], lane L: column 4L + j of rows 4i..4i + 3
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
      }
      for (int j = 0; j < 4; ++j) {
        const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);  // lanes 0, 2 of each
        const __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);  // lanes 1, 3 of each
        const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
        const __m512i column[4] = {_mm512_shuffle_i32x4(c0, c2, 0x88),
                                   _mm512_shuffle_i32x4(c1, c3, 0x88),
                                   _mm512_shuffle_i32x4(c0, c2, 0xDD),
                                   _mm512_shuffle_i32x4(c1, c3, 0xDD)};
        for (int l = 0; l < 4; ++l) {
          const int64_t w = 4 * l + j;
          if (w < nw) _mm512_mask_storeu_epi32(out + (w0 + w) * rows + r0, TailMask(nr), column[l]);
        }
      }
    }
  }
}

// C[0:mr, 0:nr] (+)= A words (row stride a_rs, pair stride a_ps) x B words [kp][ldb], kp pairs.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void MicroKernel(const uint32_t* a, int64_t a_rs, int64_t a_ps, const uint32_t* b, int64_t ldb,
                 int64_t kp, float* c, int64_t ldc, int64_t nr, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const __mmask16 m0 = TailMask(nr), m1 = TailMask(nr - 16);
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b + p * ldb);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + p * ldb + 16);
    const uint32_t* ap = a + p * a_ps;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i * a_rs]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc0[i] = _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, ci));
      acc1[i] = _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, m0, acc0[i]);
    _mm512_mask_storeu_ps(ci + 16, m1, acc1[i]);
  }
}

using Kernel = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t,
                        float*, int64_t, int64_t, bool);
constexpr Kernel kKernels[kMR + 1] = {
    nullptr,         MicroKernel<1>, MicroKernel<2>, MicroKernel<3>,  MicroKernel<4>,
    MicroKernel<5>,  MicroKernel<6>, MicroKernel<7>, MicroKernel<8>,  MicroKernel<9>,
    MicroKernel<10>, MicroKernel<11>, MicroKernel<12>};

// The packed operands, reused across calls on the same thread (each XLA device has its own).
struct Scratch {
  std::vector<uint32_t> a, b, t;
};
thread_local Scratch scratch;

// Runs fn(chunk) for every chunk in [0, chunks) on the caller and up to `helpers` pool threads.
// Chunks are claimed from a shared counter, so the caller never waits for a task that has not
// started (pool threads may be busy, or be the callers of other devices' matmuls); a task that
// starts after every chunk is claimed returns without touching fn.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, int64_t helpers, const Fn& fn) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, chunks, fn_ptr = &fn] {
    for (int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      (*fn_ptr)(c);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// a: [M, K] (or [K, M] if trans_a); b: [K, N] (or [N, K] if trans_b); c: [M, N]. Row-major.
void Matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n,
            bool trans_a, bool trans_b, ffi::ThreadPool& pool) {
  const int64_t kp = (k + 1) / 2;
  Scratch& s = scratch;
  s.a.resize(m * kp);
  s.b.resize(kp * n);
  int64_t a_rs, a_ps;  // word strides of A's packed rows and pairs
  if (trans_a) {  // a is [K, M]: pairs come from pairs of its rows
    PackAcrossRows(a, k, m, m, s.a.data());
    a_rs = 1, a_ps = m;
  } else {
    PackAlongRows(a, m, k, k, s.a.data());
    a_rs = kp, a_ps = 1;
  }
  if (trans_b) {  // b is [N, K]: pairs lie along its rows; words [N, kp] -> [kp, N]
    s.t.resize(n * kp);
    PackAlongRows(b, n, k, k, s.t.data());
    TransposeWords(s.t.data(), n, kp, s.b.data());
  } else {
    PackAcrossRows(b, k, n, n, s.b.data());
  }
  // C in tiles of kMR rows by kNR columns; a chunk is a run of whole tile rows or columns,
  // whichever there are more of.
  const int64_t row_tiles = (m + kMR - 1) / kMR, col_tiles = (n + kNR - 1) / kNR;
  const bool by_rows = row_tiles >= col_tiles;
  const int64_t threads = m * n * k >= kParallelWork ? std::max<int64_t>(pool.num_threads(), 1) : 1;
  const int64_t chunks = std::min(threads, by_rows ? row_tiles : col_tiles);
  const uint32_t* pa = s.a.data();
  const uint32_t* pb = s.b.data();
  auto run = [&](int64_t chunk) {
    const int64_t tiles = by_rows ? row_tiles : col_tiles;
    const int64_t t0 = tiles * chunk / chunks, t1 = tiles * (chunk + 1) / chunks;
    const int64_t i0 = by_rows ? t0 * kMR : 0, i1 = by_rows ? std::min(m, t1 * kMR) : m;
    const int64_t j0 = by_rows ? 0 : t0 * kNR, j1 = by_rows ? n : std::min(n, t1 * kNR);
    for (int64_t p0 = 0; p0 < kp; p0 += kKPC) {
      const int64_t pc = std::min(kKPC, kp - p0);
      for (int64_t j = j0; j < j1; j += kNR) {
        const int64_t nr = std::min(kNR, j1 - j);
        for (int64_t i = i0; i < i1; i += kMR) {
          kKernels[std::min(kMR, i1 - i)](pa + i * a_rs + p0 * a_ps, a_rs, a_ps,
                                          pb + p0 * n + j, n, pc, c + i * n + j, n, nr, p0 > 0);
        }
      }
    }
  };
  if (chunks <= 1) {
    run(0);
  } else {
    ParallelFor(pool, chunks, chunks - 1, run);
  }
  if ((s.a.capacity() + s.b.capacity() + s.t.capacity()) * sizeof(uint32_t) > kKeepScratchBytes)
    s = Scratch();
}

ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, bool trans_a,
                          bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2)
    return ffi::Error::InvalidArgument("bf16_matmul takes 2-D operands");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb) return ffi::Error::InvalidArgument("bf16_matmul: contracting sizes differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(c->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  Matmul(a.typed_data(), b.typed_data(), c->typed_data(), m, k, n, trans_a, trans_b, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// Whether this CPU runs the kernel's instructions (checked once, before registering it).
extern "C" int LmBf16Supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}
