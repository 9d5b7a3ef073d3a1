// External-attention double normalisation forward, AVX2/FMA float32 (the math of ea_double_norm_cpu.cpp):
// per leading index m, max and exp-sum over N as vectors over S (two passes), lse, then per row n
// p = exp(l - lse), out = p / (sum_S p + eps). A row whose sum_S p < 1e-30 takes the scalar log-space branch
// (as the scalar kernel). Safe offsets: a column of all -inf logits gives lse = -inf and p = 0 (no NaN).
// Each m is computed by one thread in a fixed order (the row sum reduces the 8 lanes in a fixed order):
// bit-identical for any thread count.
#include "ea_double_norm/ea_double_norm_vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_simd.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

AF_AVX2 float hsum(__m256 x) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

void fwd_kernel(const float* __restrict__ l, float* __restrict__ out, float* __restrict__ lse,
                float* __restrict__ rowsum, int64_t M, int64_t N, int64_t S, float eps) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float log_eps = eps > 0 ? std::log(eps) : ninf;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> off(S), sum(S), lsafe(S);
    for (int64_t m = begin; m < end; ++m) {
      const float* lm = l + m * N * S;
      float* om = out + m * N * S;
      float* lsem = lse + m * S;
      float* rs = rowsum + m * N;
      for (int64_t s = 0; s < S; s += 8) {
        const int64_t k = S - s;
        __m256 mx = _mm256_set1_ps(ninf);
        for (int64_t n = 0; n < N; ++n) mx = vmax_keep(mx, loadn(lm + n * S + s, k));
        mx = vsafe_off(mx);
        __m256 sm = _mm256_setzero_ps();
        for (int64_t n = 0; n < N; ++n) sm = _mm256_add_ps(sm, vexp(_mm256_sub_ps(loadn(lm + n * S + s, k), mx)));
        const __m256 ls = _mm256_add_ps(mx, vlog(sm));
        storen(lsem + s, ls, k);
        storen(lsafe.data() + s, vsafe_off(ls), k);
      }
      for (int64_t n = 0; n < N; ++n) {
        const float* r = lm + n * S;
        float* o = om + n * S;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s += 8) {
          const int64_t k = S - s;
          const __m256 p = _mm256_and_ps(vexp(_mm256_sub_ps(loadn(r + s, k), loadn(lsafe.data() + s, k))),
                                         _mm256_castsi256_ps(tail_mask(k)));
          storen(o + s, p, k);
          acc = _mm256_add_ps(acc, p);
        }
        const float tot = hsum(acc);
        if (tot >= 1e-30f) {  // the usual case: p / (sum_S p + eps) directly
          rs[n] = tot + eps;
          const __m256 inv = _mm256_set1_ps(1.0f / (tot + eps));
          for (int64_t s = 0; s < S; s += 8) storen(o + s, _mm256_mul_ps(loadn(o + s, S - s), inv), S - s);
          continue;
        }
        // every p of this row (nearly) underflowed: log space, so eps = 0 cannot give 0/0 (scalar, rare)
        float zmax = ninf;
        for (int64_t s = 0; s < S; ++s) {
          const float z = r[s] - lsafe[s];
          o[s] = z;
          zmax = z > zmax ? z : zmax;
        }
        const float zoff = zmax == ninf ? 0.f : zmax;
        float t2 = 0;
        for (int64_t s = 0; s < S; ++s) t2 += std::exp(o[s] - zoff);
        const float log_s = zoff + std::log(t2);
        float log_r = log_s;
        if (eps > 0) {
          const float hi = std::max(log_s, log_eps), lo = std::min(log_s, log_eps);
          log_r = hi + std::log1p(std::exp(lo - hi));
        }
        rs[n] = std::exp(log_s) + eps;
        for (int64_t s = 0; s < S; ++s) o[s] = std::exp(o[s] - log_r);
      }
    }
  });
}

}  // namespace

#pragma GCC pop_options

bool ea_fwd_avx2(const float* l, float* out, float* lse, float* rowsum, int64_t M, int64_t N, int64_t S, float eps) {
  if (!cpu_has_avx2_fma()) return false;
  fwd_kernel(l, out, lse, rowsum, M, N, S, eps);
  return true;
}

#else
bool ea_fwd_avx2(const float*, float*, float*, float*, int64_t, int64_t, int64_t, float) { return false; }
#endif

}  // namespace cpu
}  // namespace attnfree
