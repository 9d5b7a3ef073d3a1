// AVX-512 micro-kernel of tile_gemm_scaled (cpu_tile_gemm.h): 8 rows x 32 columns of C in 16 registers,
// k innermost (two loads of B, eight broadcasts of A, sixteen FMAs per k); the column panel of B (K x 32) stays in
// L1 while the row blocks of A pass. Compiled for AVX-512 in this translation unit only, entered after a CPU check.
#include "common/cpu_tile_gemm.h"

#include "common/env.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace attnfree {
namespace cpu {
namespace {

constexpr int kMR = 8;         // rows of C per micro-tile
constexpr int kNR = 32;        // columns of C per micro-tile (two 16-lane registers)
constexpr int64_t kMaxK = 64;  // the key tile

bool cpu_has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// Rows [0, MR) of one micro-tile, keys [k0, k1) through the FMAs; with pre: the keys outside [k0, k1) as
// eL[r] * pre + eR[r] * suf (pre, suf: the packed panel's sums over [0, k0) and [k1, K)).
template <int MR>
__attribute__((target("avx512f"))) void rows(int64_t k0, int64_t k1, const float* A, int64_t rsa, int64_t csa,
                                             const float* B, __mmask16 m0, __mmask16 m1, const float* pre,
                                             const float* suf, const float* eL, const float* eR, const float* scale,
                                             float* C, int64_t ldc, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 b0 = _mm512_load_ps(B + k * kNR);  // packed, zero-padded
    const __m512 b1 = _mm512_load_ps(B + k * kNR + 16);
    const float* a = A + k * csa;
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * rsa]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
  }
  if (pre) {
    const __m512 p0 = _mm512_load_ps(pre), p1 = _mm512_load_ps(pre + 16);
    const __m512 q0 = _mm512_load_ps(suf), q1 = _mm512_load_ps(suf + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 l = _mm512_set1_ps(eL[r]), h = _mm512_set1_ps(eR[r]);
      acc0[r] = _mm512_fmadd_ps(l, p0, _mm512_fmadd_ps(h, q0, acc0[r]));
      acc1[r] = _mm512_fmadd_ps(l, p1, _mm512_fmadd_ps(h, q1, acc1[r]));
    }
  }
  const __m512 s0 = scale ? _mm512_maskz_loadu_ps(m0, scale) : _mm512_set1_ps(1.f);
  const __m512 s1 = scale ? _mm512_maskz_loadu_ps(m1, scale + 16) : _mm512_set1_ps(1.f);
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    __m512 c0 = _mm512_mul_ps(acc0[r], s0), c1 = _mm512_mul_ps(acc1[r], s1);
    if (accumulate) {
      c0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), c0);
      c1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), c1);
    }
    _mm512_mask_storeu_ps(c, m0, c0);
    _mm512_mask_storeu_ps(c + 16, m1, c1);
  }
}

using RowsFn = void (*)(int64_t, int64_t, const float*, int64_t, int64_t, const float*, __mmask16, __mmask16,
                        const float*, const float*, const float*, const float*, const float*, float*, int64_t, bool);
constexpr RowsFn kRows[kMR + 1] = {nullptr,  &rows<1>, &rows<2>, &rows<3>, &rows<4>,
                                   &rows<5>, &rows<6>, &rows<7>, &rows<8>};

__attribute__((target("avx512f"))) void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa,
                                             const float* B, int64_t ldb, const float* kscale, const float* scale,
                                             float* C, int64_t ldc, bool accumulate, const TileBand* band) {
  alignas(64) float pk[kMaxK * kNR];  // the panel of B, packed: rows ldb apart would share L1 sets
  alignas(64) float pre[(kMaxK + 1) * kNR], suf[(kMaxK + 1) * kNR];  // with band: its prefix / suffix sums
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const int64_t nj = N - j0;
    const __mmask16 m0 = nj >= 16 ? __mmask16(0xffff) : __mmask16((1u << nj) - 1);
    const __mmask16 m1 = nj >= 32 ? __mmask16(0xffff) : nj <= 16 ? __mmask16(0) : __mmask16((1u << (nj - 16)) - 1);
    for (int64_t k = 0; k < K; ++k) {
      const __m512 ks = kscale ? _mm512_set1_ps(kscale[k]) : _mm512_set1_ps(1.f);
      _mm512_store_ps(pk + k * kNR, _mm512_mul_ps(ks, _mm512_maskz_loadu_ps(m0, B + k * ldb + j0)));
      _mm512_store_ps(pk + k * kNR + 16, _mm512_mul_ps(ks, _mm512_maskz_loadu_ps(m1, B + k * ldb + j0 + 16)));
    }
    if (band) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t k = 0; k <= K; ++k) {
        _mm512_store_ps(pre + k * kNR, a0);
        _mm512_store_ps(pre + k * kNR + 16, a1);
        if (k < K)
          a0 = _mm512_add_ps(a0, _mm512_load_ps(pk + k * kNR)),
          a1 = _mm512_add_ps(a1, _mm512_load_ps(pk + k * kNR + 16));
      }
      a0 = a1 = _mm512_setzero_ps();
      for (int64_t k = K; k >= 0; --k) {
        if (k < K)
          a0 = _mm512_add_ps(a0, _mm512_load_ps(pk + k * kNR)),
          a1 = _mm512_add_ps(a1, _mm512_load_ps(pk + k * kNR + 16));
        _mm512_store_ps(suf + k * kNR, a0);
        _mm512_store_ps(suf + k * kNR + 16, a1);
      }
    }
    const float* sc = scale ? scale + j0 : nullptr;
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, M - i0);
      int64_t k0 = 0, k1 = K;
      const float *p = nullptr, *q = nullptr, *eL = nullptr, *eR = nullptr;
      if (band) {  // the block's keys through the FMAs: the union of its rows' bands
        k0 = K, k1 = 0;
        for (int64_t r = 0; r < mr; ++r) k0 = std::min(k0, band->kb[i0 + r]), k1 = std::max(k1, band->ke[i0 + r]);
        k1 = std::max(k0, k1);
        p = pre + k0 * kNR, q = suf + k1 * kNR, eL = band->eL + i0, eR = band->eR + i0;
      }
      kRows[mr](k0, k1, A + i0 * rsa, rsa, csa, pk, m0, m1, p, q, eL, eR, sc, C + i0 * ldc + j0, ldc, accumulate);
    }
  }
}

}  // namespace

bool tile_gemm_scaled(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                      int64_t ldb, const float* kscale, const float* scale, float* C, int64_t ldc, bool accumulate) {
  if (K > kMaxK || !cpu_has_avx512f()) return false;
  gemm(M, N, K, A, rsa, csa, B, ldb, kscale, scale, C, ldc, accumulate, nullptr);
  return true;
}

bool tile_gemm_banded(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                      int64_t ldb, const float* scale, float* C, int64_t ldc, bool accumulate, const TileBand& band) {
  if (K > kMaxK || !cpu_has_avx512f()) return false;
  gemm(M, N, K, A, rsa, csa, B, ldb, nullptr, scale, C, ldc, accumulate, &band);
  return true;
}

bool tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc) {
  if (!cpu_has_avx512f()) return false;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * static_cast<size_t>(N));
    return true;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kMaxK)
    gemm(M, N, std::min(kMaxK, K - k0), A + k0, lda, 1, B + k0 * ldb, ldb, nullptr, nullptr, C, ldc, k0 > 0, nullptr);
  return true;
}

bool tile_gemm_available() { return cpu_has_avx512f() && cpu_avx512_allowed(); }

}  // namespace cpu
}  // namespace attnfree

#else
namespace attnfree {
namespace cpu {
bool tile_gemm_scaled(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, const float*,
                      float*, int64_t, bool) {
  return false;
}
bool tile_gemm_banded(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, const float*,
                      float*, int64_t, bool, const TileBand&) {
  return false;
}
bool tile_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {
  return false;
}
bool tile_gemm_available() { return false; }
}  // namespace cpu
}  // namespace attnfree
#endif
