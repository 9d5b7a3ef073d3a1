// AFT-local forward as banded tiles (aft_local_tiled_cpu.cpp), float32, AVX2/FMA. Returns false (doing nothing)
// when the CPU lacks AVX2/FMA. Pointers: contiguous (B, T, D) float32 q, k, v, y, lse and (H, T, T) w.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool aft_local_tiled_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse,
                              int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal);

}  // namespace cpu
}  // namespace attnfree
