// AVX2/FMA float32 kernels of non-causal AFT-simple (aft_simple_global_vec_cpu.cpp): the computation of
// simple_global_{fwd,bwd}_kernel in aft_simple_cpu.cpp, 8 channels per vector. Each returns false (and does
// nothing) when the CPU lacks AVX2/FMA; the caller then runs the scalar kernel. Contiguous (B, T, D) float32.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool simple_global_fwd_avx2(const float* q, const float* k, const float* v, float* y, float* lse, int64_t B, int64_t T,
                            int64_t D);
bool simple_global_bwd_avx2(const float* dy, const float* q, const float* k, const float* v, const float* lse,
                            float* dq, float* dk, float* dv, int64_t B, int64_t T, int64_t D);

}  // namespace cpu
}  // namespace attnfree
