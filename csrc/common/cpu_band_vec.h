// AVX2/FMA float32 band kernels (cpu_band_vec.cpp): the same computation as cpu_band.cpp's scalar kernels.
// Each returns false (and does nothing) when the CPU lacks AVX2/FMA; the caller then runs the scalar kernel.
// Pointers are contiguous (B, T, D) float32 arrays, w / dw (H, T, T) or null; dw must be zero-filled.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

// s0 / sF / ps / m0 / ks: the recurrent state of cpu_band.h ((B, 3, D), ks (B, 2, D), m0 = s0 or null), or null.
bool band_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse, int64_t B,
                   int64_t T, int64_t D, int64_t H, int64_t window, bool causal, const float* s0, float* sF);
bool band_bwd_avx2(const float* G, const float* Hm, const float* k, const float* v, const float* w, const float* lse,
                   float* dk, float* dv, float* dw, int64_t B, int64_t T, int64_t D, int64_t H, int64_t window,
                   bool causal, const float* ps, const float* m0, float* ks);
// Causal window 1 without bias (causal aft_simple) from dy, q, y directly: also writes dq (G, H formed inside).
bool simple_causal_bwd_avx2(const float* dy, const float* q, const float* y, const float* k, const float* v,
                            const float* lse, float* dq, float* dk, float* dv, int64_t B, int64_t T, int64_t D,
                            const float* ps, const float* m0, float* ks);

}  // namespace cpu
}  // namespace attnfree
