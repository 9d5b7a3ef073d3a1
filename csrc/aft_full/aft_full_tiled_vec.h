// AVX2/FMA float32 AFT-full tile kernels (aft_full_tiled_vec_cpu.cpp), per head on the (T, N = B * Dh) column
// layout of aft_full_tiled_cpu.cpp. Each returns false (and does nothing) when the CPU lacks AVX2/FMA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace attnfree {
namespace cpu {

bool aft_full_head_fwd_avx2(const float* w, const float* K, const float* V, float* Z, float* L, int64_t T, int64_t N,
                            bool causal, const at::TensorOptions& opts);
// dW: the head's (T, T) slice of the zero-filled dw.
bool aft_full_head_bwd_avx2(const float* w, const float* K, const float* V, const float* G, const float* Hm,
                            const float* L, float* dV, float* sPH, float* dW, int64_t T, int64_t N, bool causal,
                            const at::TensorOptions& opts);

}  // namespace cpu
}  // namespace attnfree
