// AFT-local forward and backward as banded tiles (aft_local_tiled_cpu.cpp), float32, AVX2/FMA. Returns false (doing
// nothing) when the CPU lacks AVX2/FMA. Pointers: contiguous (B, T, D) float32 q, k, v, y, lse; w contiguous (H, T, T),
// or with banded (H, T, 2 window - 1) (w[h, t, j]: key t + j - (window - 1)); window <= T.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool aft_local_tiled_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse,
                              int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal, bool banded);

// Backward (dk, dv and, when dw is not null, dw) as banded tiles, from G = dy * sigmoid(q), H = dy * y and lse
// (contiguous (B, T, D) float32); dw in w's layout, zero-filled by the caller (entries outside the band stay 0).
// -inf in k, w, lse is a mask. Returns false (outputs unwritten) when the CPU lacks AVX2/FMA or an input holds NaN
// or +inf (k, lse, band entries of w) or a non-finite v, G, H: the caller then runs the exact band kernel.
bool aft_local_tiled_bwd_avx2(const float* G, const float* Hm, const float* k, const float* v, const float* w,
                              const float* lse, float* dk, float* dv, float* dw, int64_t B, int64_t T, int64_t D,
                              int64_t H, int64_t window, bool causal, bool banded);

}  // namespace cpu
}  // namespace attnfree
