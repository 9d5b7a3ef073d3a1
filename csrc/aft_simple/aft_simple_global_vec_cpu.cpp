// Non-causal AFT-simple, AVX2/FMA float32 (see aft_simple_cpu.cpp for the math). Two streaming passes forward
// (max over keys; exp-sum and exp-weighted sum of v, then one pass writing y and lse), two backward (G and ybar;
// then dq, dk, dv). Tasks are (b, chunk of channels) with chunks as wide as the thread count allows (whole rows
// stream contiguously; 64-channel strided chunks were latency-bound). Every lane's result is the same sequence
// of operations over t whatever the chunk width or thread, so the results are bit-identical for any thread count.
// Non-finite contract (docs/design.md §7): the max ignores NaN and uses a safe offset (0 where every key is
// -inf), so -inf keys contribute exactly 0; a column with no finite key gives y = 0, lse = -inf and zero
// gradients; NaN propagates through the sums.
#include "aft_simple/aft_simple_global_vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "common/cpu_common.h"
#include "common/cpu_simd.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int64_t kMaxCH = 1024;  // widest chunk (per-task state on the stack: 3 x 4 KiB)

// channels per task: a multiple of 8, wide enough for contiguous rows, narrow enough for >= 2 tasks per thread
int64_t chunk_width(int64_t B, int64_t D) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t nch = std::max<int64_t>(1, (want + B - 1) / B);
  int64_t ch = ((D + nch - 1) / nch + 7) / 8 * 8;
  ch = std::max<int64_t>(ch, 64);
  return std::min(ch, kMaxCH);
}

// y where d != 0, else 0 (0/0 of an all-masked column); NaN in d stays (NaN != 0).
AF_AVX2 __m256 div_or_zero(__m256 a, __m256 d) {
  const __m256 q = _mm256_div_ps(a, d);
  return _mm256_blendv_ps(q, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
}

void fwd_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                float* __restrict__ y, float* __restrict__ lse, int64_t B, int64_t T, int64_t D) {
  const int64_t CH = chunk_width(B, D);
  const int64_t ncc = (D + CH - 1) / CH;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    alignas(32) __m256 m[kMaxCH / 8], S[kMaxCH / 8], A[kMaxCH / 8];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * CH;
      const int64_t nc = std::min(CH, D - c0);
      const int64_t nv = (nc + 7) / 8;
      const int64_t base = b * T * D + c0;
      for (int64_t j = 0; j < nv; ++j) {
        m[j] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        S[j] = _mm256_setzero_ps();
        A[j] = _mm256_setzero_ps();
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* kr = k + base + t * D;
        for (int64_t j = 0; j < nv; ++j) m[j] = vmax_keep(m[j], loadn(kr + 8 * j, nc - 8 * j));
      }
      for (int64_t j = 0; j < nv; ++j) m[j] = vsafe_off(m[j]);
      for (int64_t t = 0; t < T; ++t) {
        const float* kr = k + base + t * D;
        const float* vr = v + base + t * D;
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t n = nc - 8 * j;
          const __m256 e = vexp(_mm256_sub_ps(loadn(kr + 8 * j, n), m[j]));  // <= 1; the max key gives 1
          S[j] = _mm256_add_ps(S[j], e);
          A[j] = _mm256_fmadd_ps(e, loadn(vr + 8 * j, n), A[j]);
        }
      }
      for (int64_t j = 0; j < nv; ++j) {
        A[j] = div_or_zero(A[j], S[j]);          // ybar
        m[j] = _mm256_add_ps(m[j], vlog(S[j]));  // lse (-inf when S = 0)
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = base + t * D;
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t n = nc - 8 * j;
          storen(y + o + 8 * j, _mm256_mul_ps(vsigmoid(loadn(q + o + 8 * j, n)), A[j]), n);
          storen(lse + o + 8 * j, m[j], n);
        }
      }
    }
  });
}

void bwd_kernel(const float* __restrict__ dy, const float* __restrict__ q, const float* __restrict__ k,
                const float* __restrict__ v, const float* __restrict__ lse, float* __restrict__ dq,
                float* __restrict__ dk, float* __restrict__ dv, int64_t B, int64_t T, int64_t D) {
  const int64_t CH = chunk_width(B, D);
  const int64_t ncc = (D + CH - 1) / CH;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f);
    alignas(32) __m256 L[kMaxCH / 8], G[kMaxCH / 8], yb[kMaxCH / 8];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * CH;
      const int64_t nc = std::min(CH, D - c0);
      const int64_t nv = (nc + 7) / 8;
      const int64_t base = b * T * D + c0;
      for (int64_t j = 0; j < nv; ++j) {
        L[j] = vsafe_off(loadn(lse + base + 8 * j, nc - 8 * j));  // row 0 holds the column's lse
        G[j] = _mm256_setzero_ps();
        yb[j] = _mm256_setzero_ps();
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = base + t * D;
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t n = nc - 8 * j, oj = o + 8 * j;
          G[j] = _mm256_fmadd_ps(loadn(dy + oj, n), vsigmoid(loadn(q + oj, n)), G[j]);
          yb[j] = _mm256_fmadd_ps(vexp(_mm256_sub_ps(loadn(k + oj, n), L[j])), loadn(v + oj, n), yb[j]);
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = base + t * D;
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t n = nc - 8 * j, oj = o + 8 * j;
          const __m256 s = vsigmoid(loadn(q + oj, n));
          const __m256 P = vexp(_mm256_sub_ps(loadn(k + oj, n), L[j]));
          const __m256 PG = _mm256_mul_ps(P, G[j]);
          storen(dq + oj,
                 _mm256_mul_ps(_mm256_mul_ps(loadn(dy + oj, n), yb[j]), _mm256_mul_ps(s, _mm256_sub_ps(one, s))), n);
          storen(dv + oj, PG, n);
          storen(dk + oj, _mm256_mul_ps(_mm256_sub_ps(loadn(v + oj, n), yb[j]), PG), n);
        }
      }
    }
  });
}

}  // namespace

#pragma GCC pop_options

bool simple_global_fwd_avx2(const float* q, const float* k, const float* v, float* y, float* lse, int64_t B, int64_t T,
                            int64_t D) {
  if (!cpu_has_avx2_fma()) return false;
  fwd_kernel(q, k, v, y, lse, B, T, D);
  return true;
}

bool simple_global_bwd_avx2(const float* dy, const float* q, const float* k, const float* v, const float* lse,
                            float* dq, float* dk, float* dv, int64_t B, int64_t T, int64_t D) {
  if (!cpu_has_avx2_fma()) return false;
  bwd_kernel(dy, q, k, v, lse, dq, dk, dv, B, T, D);
  return true;
}

#else
bool simple_global_fwd_avx2(const float*, const float*, const float*, float*, float*, int64_t, int64_t, int64_t) {
  return false;
}
bool simple_global_bwd_avx2(const float*, const float*, const float*, const float*, const float*, float*, float*,
                            float*, int64_t, int64_t, int64_t) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
