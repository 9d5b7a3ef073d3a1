// AVX2/FMA float32 kernels of the external-attention double normalisation (ea_double_norm_vec_cpu.cpp): the
// computations of ea_fwd_kernel / ea_bwd_kernel in ea_double_norm_cpu.cpp, 8 of S per vector. Each returns false
// (and does nothing) when the CPU lacks AVX2/FMA. Contiguous (M, N, S) float32 tensors; lse (M, S), rowsum (M, N).
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool ea_fwd_avx2(const float* l, float* out, float* lse, float* rowsum, int64_t M, int64_t N, int64_t S, float eps);

// rebuild_out: out was rounded to fp16/bf16; a = p / rowsum is rebuilt in float32 from l and lse.
bool ea_bwd_avx2(const float* dout, const float* l, const float* out, const float* lse, const float* rowsum, float* dl,
                 int64_t M, int64_t N, int64_t S, bool rebuild_out);

}  // namespace cpu
}  // namespace attnfree
