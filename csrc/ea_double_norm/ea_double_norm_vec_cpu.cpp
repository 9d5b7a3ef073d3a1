// External-attention double normalisation, AVX2/FMA float32 (the math of ea_double_norm_cpu.cpp, 8 of S per
// vector, rows of S contiguous).
//
// Forward, two passes over each leading index m, one exp per logit:
//   1. column max and exp-sum over N in one read of the logits: blocks of kRows rows (L1-resident) first raise
//      the running max off_b of each column, rescale its sum once (exp(old - new)), then add e = exp(l - off_b),
//      which is stored in out; lse = max + log(sum).
//   2. per row n of block b: p = e * exp(off_b - lse) (one exp per column and block), out = p / (sum_S p + eps).
//      A row whose sum_S p < 1e-30 takes the scalar log-space branch from the logits (eps = 0 cannot give 0/0).
// Backward, two passes (u = a (dout - sum_S dout a) = p dp, dl = u - p sum_N u; no division by rowsum):
//   1. per row: a (= out, or p / rowsum rebuilt in float32 for fp16/bf16 logits), the row dot, u stored in dl,
//      the column sums of u;   2. dl -= p * colsum (p = out * rowsum for float32, exp(l - lse) otherwise).
// Masks (docs/design.md §7 rules 3-4): the offsets are safe (a -inf max or lse is used as 0), so a -inf logit gives
// p = 0, a column of all -inf logits gives lse = -inf and p = 0, a token with p = 0 for every unit gets out = 0
// (also with eps = 0) and dl = 0. NaN propagates.
// Each m is computed by one thread in a fixed order (row sums reduce the 8 lanes in a fixed order): bit-identical
// for any thread count.
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

constexpr int64_t kRows = 16;  // rows per block of the column pass: 16 * S floats stay in L1 for S <= 256

AF_AVX2 float hsum(__m256 x) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

// Pass 1 of the forward over the N rows of lm (row stride S): e = exp(l - off_b) into o, with off_b the running
// column max after row block b (so e <= 1), kept in boff (N / kRows + 1 rows of S); lse = logsumexp over N; lsafe =
// lse with -inf as 0. One exp per logit: p = e * exp(boff_b - lse) in pass 2.
AF_AVX2 void column_pass(const float* lm, float* o, int64_t N, int64_t S, float* mx, float* sum, float* boff,
                         float* lse, float* lsafe) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    mx[s] = ninf;
    sum[s] = 0.f;
  }
  for (int64_t n0 = 0, b = 0; n0 < N; n0 += kRows, ++b) {
    const int64_t n1 = std::min(N, n0 + kRows);
    for (int64_t s = 0; s < S; s += 8) {
      const int64_t k = S - s;
      const __m256 old = loadn(mx + s, k);
      __m256 m = old;
      for (int64_t n = n0; n < n1; ++n) m = vmax_keep(m, loadn(lm + n * S + s, k));
      const __m256 off = vsafe_off(m);
      // old = -inf: scale 0 (the sum is 0 anyway); off is finite, so never (-inf) - (-inf)
      __m256 sm = _mm256_mul_ps(loadn(sum + s, k), vexp(_mm256_sub_ps(old, off)));
      for (int64_t n = n0; n < n1; ++n) {
        const __m256 e = vexp(_mm256_sub_ps(loadn(lm + n * S + s, k), off));
        storen(o + n * S + s, e, k);
        sm = _mm256_add_ps(sm, e);
      }
      storen(mx + s, m, k);
      storen(sum + s, sm, k);
      storen(boff + b * S + s, m, k);  // -inf while the column is all -inf so far: pass 2 scales by exp(-inf) = 0
    }
  }
  for (int64_t s = 0; s < S; s += 8) {
    const int64_t k = S - s;
    const __m256 ls = _mm256_add_ps(vsafe_off(loadn(mx + s, k)), vlog(loadn(sum + s, k)));  // sum = 0: -inf
    storen(lse + s, ls, k);
    storen(lsafe + s, vsafe_off(ls), k);
  }
}

void fwd_kernel(const float* __restrict__ l, float* __restrict__ out, float* __restrict__ lse,
                float* __restrict__ rowsum, int64_t M, int64_t N, int64_t S, float eps) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float log_eps = eps > 0 ? std::log(eps) : ninf;
  const int64_t nb = (N + kRows - 1) / kRows;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mx(S), sum(S), lsafe(S), fac(S), boff(nb * S);
    for (int64_t m = begin; m < end; ++m) {
      const float* lm = l + m * N * S;
      float* om = out + m * N * S;
      float* rs = rowsum + m * N;
      column_pass(lm, om, N, S, mx.data(), sum.data(), boff.data(), lse + m * S, lsafe.data());
      for (int64_t n = 0; n < N; ++n) {
        if (n % kRows == 0)  // exp(off_b - lse) <= 1 for the rows of block b; 0 where off_b = -inf
          for (int64_t s = 0; s < S; s += 8)
            storen(fac.data() + s,
                   vexp(_mm256_sub_ps(loadn(boff.data() + (n / kRows) * S + s, S - s), loadn(lsafe.data() + s, S - s))),
                   S - s);
        const float* r = lm + n * S;
        float* o = om + n * S;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s += 8) {
          const int64_t k = S - s;
          const __m256 p = _mm256_mul_ps(loadn(o + s, k), loadn(fac.data() + s, k));  // tail lanes load 0
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
        // every p of this row (nearly) underflowed: log space from the logits, so eps = 0 cannot give 0/0
        // (scalar, rare)
        float zmax = ninf;
        for (int64_t s = 0; s < S; ++s) {
          const float z = r[s] - lsafe[s];
          o[s] = z;
          zmax = (z > zmax || z != z) ? z : zmax;  // a NaN (from a NaN column) is kept: the row is NaN
        }
        if (zmax == ninf) {  // p = 0 for every unit (masked token or all -inf columns): out = 0, also for eps = 0
          rs[n] = eps;
          for (int64_t s = 0; s < S; ++s) o[s] = 0.f;
          continue;
        }
        float t2 = 0;
        for (int64_t s = 0; s < S; ++s) t2 += std::exp(o[s] - zmax);
        const float log_s = zmax + std::log(t2);
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

void bwd_kernel(const float* __restrict__ dout, const float* __restrict__ l, const float* __restrict__ out,
                const float* __restrict__ lse, const float* __restrict__ rowsum, float* __restrict__ dl, int64_t M,
                int64_t N, int64_t S, bool rebuild_out) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(S), lsafe(S);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t off = m * N * S;
      const float* rs = rowsum + m * N;
      for (int64_t s = 0; s < S; s += 8) {
        storen(lsafe.data() + s, vsafe_off(loadn(lse + m * S + s, S - s)), S - s);
        storen(col.data() + s, _mm256_setzero_ps(), S - s);
      }
      for (int64_t n = 0; n < N; ++n) {
        const float* dr = dout + off + n * S;
        const float* lr = l + off + n * S;
        const float* orow = out + off + n * S;
        float* u = dl + off + n * S;
        // a = out, or for fp16/bf16 logits p / rowsum in float32 (the stored out where rowsum < 1e-30); the
        // first loop keeps a in dl and forms the row dot, the second overwrites it with u
        const bool rebuild = rebuild_out && rs[n] > 1e-30f;
        const __m256 inv = _mm256_set1_ps(rebuild ? 1.0f / rs[n] : 1.0f);
        __m256 dot = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s += 8) {
          const int64_t k = S - s;
          const __m256 a = rebuild
                               ? _mm256_mul_ps(vexp(_mm256_sub_ps(loadn(lr + s, k), loadn(lsafe.data() + s, k))), inv)
                               : loadn(orow + s, k);
          storen(u + s, a, k);
          dot = _mm256_fmadd_ps(loadn(dr + s, k), a, dot);  // masked tail lanes load 0
        }
        const __m256 d = _mm256_set1_ps(hsum(dot));
        for (int64_t s = 0; s < S; s += 8) {
          const int64_t k = S - s;
          const __m256 uu = _mm256_mul_ps(loadn(u + s, k), _mm256_sub_ps(loadn(dr + s, k), d));
          storen(u + s, uu, k);
          storen(col.data() + s, _mm256_add_ps(loadn(col.data() + s, k), uu), k);
        }
      }
      // p = exp(l - lse); for float32 out as out * rowsum (= p, no exp; 0 where out = 0; where rowsum underflowed
      // with eps = 0 it gives 0 for a p < 1e-30, whose term p * colsum is below float32's resolution of u)
      for (int64_t n = 0; n < N; ++n) {
        const float* lr = l + off + n * S;
        const float* orow = out + off + n * S;
        float* u = dl + off + n * S;
        const __m256 r = _mm256_set1_ps(rs[n]);
        for (int64_t s = 0; s < S; s += 8) {
          const int64_t k = S - s;
          const __m256 p = rebuild_out ? vexp(_mm256_sub_ps(loadn(lr + s, k), loadn(lsafe.data() + s, k)))
                                       : _mm256_mul_ps(loadn(orow + s, k), r);
          storen(u + s, _mm256_fnmadd_ps(p, loadn(col.data() + s, k), loadn(u + s, k)), k);
        }
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

bool ea_bwd_avx2(const float* dout, const float* l, const float* out, const float* lse, const float* rowsum, float* dl,
                 int64_t M, int64_t N, int64_t S, bool rebuild_out) {
  if (!cpu_has_avx2_fma()) return false;
  bwd_kernel(dout, l, out, lse, rowsum, dl, M, N, S, rebuild_out);
  return true;
}

#else
bool ea_fwd_avx2(const float*, float*, float*, float*, int64_t, int64_t, int64_t, float) { return false; }
bool ea_bwd_avx2(const float*, const float*, const float*, const float*, const float*, float*, int64_t, int64_t,
                 int64_t, bool) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
