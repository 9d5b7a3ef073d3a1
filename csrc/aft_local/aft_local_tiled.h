// AFT-local forward and backward as banded tiles (aft_local_tiled_cpu.cpp), float32, AVX2/FMA. Returns false (doing
// nothing) when the CPU lacks AVX2/FMA. Pointers: contiguous (B, T, D) float32 q, k, v, y, lse; w contiguous (H, T, T),
// or with banded (H, T, 2 window - 1) (w[h, t, j]: key t + j - (window - 1)); window <= T.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool aft_local_tiled_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse,
                              int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal, bool banded);

// Backward (dq, dk, dv and, when dw is not null, dw) as banded tiles, from dy, q, y and lse (contiguous (B, T, D)
// float32); dw in w's layout, every entry written (0 outside the band). -inf in k, w, lse is a mask. Returns false
// (outputs partly written, to be discarded) when the CPU lacks AVX2/FMA or an input holds NaN or +inf (k, lse,
// band entries of w) or a non-finite v, dy * sigmoid(q), dy * y: the caller then runs the exact band kernel.
bool aft_local_tiled_bwd_avx2(const float* dy, const float* q, const float* y, const float* k, const float* v,
                              const float* w, const float* lse, float* dq, float* dk, float* dv, float* dw, int64_t B,
                              int64_t T, int64_t D, int64_t H, int64_t window, bool causal, bool banded);

}  // namespace cpu
}  // namespace attnfree
