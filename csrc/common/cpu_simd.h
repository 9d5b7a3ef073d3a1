// AVX2/FMA helpers of the vectorised CPU kernels (float32, 8 lanes along the contiguous channel axis).
//
// The extension is compiled once for the baseline x86-64 ISA, so these functions carry
// __attribute__((target("avx2,fma"))) and internal linkage (static): nothing compiled for AVX2 can leak into
// other translation units through inline/COMDAT folding. Callers check cpu_has_avx2_fma() at run time and keep the
// scalar kernels as the fallback (other CPUs, float64). Torch-free on purpose.
//
// Numerics: vexp/vlog are Cephes-style polynomials (max error ~2 ulp against std::exp/std::log on the ranges the
// kernels use). Special values: vexp(-inf) = 0, vexp(NaN) = NaN, vexp(x > 88.72) = +inf, results below ~1e-38
// flush to 0; vlog(0) = -inf, vlog(x < 0) = NaN, vlog(NaN) = NaN, vlog(+inf) = +inf. Every lane's result depends
// only on that lane's inputs, so the kernels are bit-identical whatever the thread count or partition.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define ATTNFREE_HAVE_AVX2_PATH 1
#include <immintrin.h>

#include <cstdint>

namespace attnfree {
namespace cpu {
namespace simd {

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#define AF_AVX2 static inline __attribute__((target("avx2,fma"), always_inline))

// Lanes [0, n) set (n in 0..8).
AF_AVX2 __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}
AF_AVX2 __m256 loadn(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
}
AF_AVX2 void storen(float* p, __m256 x, int64_t n) {
  if (n >= 8)
    _mm256_storeu_ps(p, x);
  else
    _mm256_maskstore_ps(p, tail_mask(n), x);
}

AF_AVX2 __m256 vexp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283f), _CMP_GT_OQ);
  __m256 xc = _mm256_min_ps(hi, x);  // NaN in x is kept: min/max return the second operand on NaN
  xc = _mm256_max_ps(lo, xc);
  __m256 fx = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), xc);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  y = _mm256_fmadd_ps(y, x2, xc);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  // 2^fx; fx = -127 (x at the lower clamp) gives exponent field 0, i.e. 0
  __m256i e = _mm256_cvttps_epi32(fx);
  e = _mm256_add_epi32(e, _mm256_set1_epi32(127));
  e = _mm256_max_epi32(e, _mm256_setzero_si256());
  e = _mm256_slli_epi32(e, 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), big);
}

AF_AVX2 __m256 vlog(__m256 x) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 is_zero = _mm256_cmp_ps(x, zero, _CMP_EQ_OQ);
  const __m256 invalid = _mm256_cmp_ps(x, zero, _CMP_NGE_UQ);  // x < 0 or NaN
  const __m256 is_inf = _mm256_cmp_ps(x, _mm256_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
  __m256 xm = _mm256_max_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x00800000)));  // smallest normal
  __m256i ei = _mm256_srli_epi32(_mm256_castps_si256(xm), 23);
  xm = _mm256_and_ps(xm, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000)));
  xm = _mm256_or_ps(xm, _mm256_set1_ps(0.5f));
  ei = _mm256_sub_epi32(ei, _mm256_set1_epi32(0x7f));
  __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(ei), _mm256_set1_ps(1.0f));
  const __m256 mask = _mm256_cmp_ps(xm, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 tmp = _mm256_and_ps(xm, mask);
  xm = _mm256_sub_ps(xm, _mm256_set1_ps(1.0f));
  e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.0f), mask));
  xm = _mm256_add_ps(xm, tmp);
  const __m256 z = _mm256_mul_ps(xm, xm);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, xm, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(y, xm);
  y = _mm256_mul_ps(y, z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  xm = _mm256_add_ps(xm, y);
  xm = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), xm);
  xm = _mm256_blendv_ps(xm, _mm256_set1_ps(-__builtin_inff()), is_zero);
  xm = _mm256_blendv_ps(xm, _mm256_set1_ps(__builtin_inff()), is_inf);
  return _mm256_blendv_ps(xm, _mm256_set1_ps(__builtin_nanf("")), invalid);
}

// 1 / (1 + exp(-x)), exact division.
AF_AVX2 __m256 vsigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, vexp(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// max that ignores NaN in x (returns m then), like std::max(m, x) with x NaN.
AF_AVX2 __m256 vmax_keep(__m256 m, __m256 x) { return _mm256_max_ps(x, m); }

// x where x != -inf, else 0: a safe offset for exp(a - off) when every a is -inf.
AF_AVX2 __m256 vsafe_off(__m256 x) {
  return _mm256_blendv_ps(x, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ));
}

AF_AVX2 float hmax(__m256 x) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

}  // namespace simd
}  // namespace cpu
}  // namespace attnfree
#endif
