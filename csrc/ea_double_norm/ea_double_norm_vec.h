// AVX2/FMA float32 forward of the external-attention double normalisation (ea_double_norm_vec_cpu.cpp): the
// computation of ea_fwd_kernel in ea_double_norm_cpu.cpp, 8 of S per vector. Returns false (and does nothing)
// when the CPU lacks AVX2/FMA. Contiguous (M, N, S) float32 logits.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool ea_fwd_avx2(const float* l, float* out, float* lse, float* rowsum, int64_t M, int64_t N, int64_t S, float eps);

}  // namespace cpu
}  // namespace attnfree
