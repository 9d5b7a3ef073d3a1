// Internal CPU helpers shared between csrc/cpu/*.cpp (not part of any public interface).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace attnfree {
namespace cpu {

// Tile width of the factorised AFT-full forward.
constexpr int64_t kFullTile = 64;

// AFT-full forward, tile-wise factorised GEMM (NOTES §2) with the exactness guard.
// qa, ka, va: (B, T, D) contiguous, dtype float32 or float64; wa: (heads, T, T) contiguous, same dtype.
// Returns (y, lse) in that dtype.
std::tuple<at::Tensor, at::Tensor> aft_full_tiled_fwd(const at::Tensor& qa, const at::Tensor& ka,
                                                      const at::Tensor& va, const at::Tensor& wa,
                                                      bool causal);

// AFT-full backward, tile-pair factorised GEMMs with an exactness guard (same inputs, all in one float dtype,
// contiguous; wa (heads, T, T)). Returns (dq, dk, dv, dw) in that dtype, dw of shape (heads, T, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_tiled_bwd(
    const at::Tensor& dya, const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
    const at::Tensor& wa, const at::Tensor& ya, const at::Tensor& lsea, bool causal);

// Non-causal AFT-simple (aft_simple_global.cpp): one softmax over T per (b, c). Inputs (B, T, D) contiguous,
// all float32 or all float64; lse (B, T, D) holds the same value for every t. Returns tensors in that dtype.
std::tuple<at::Tensor, at::Tensor> aft_simple_global_fwd(const at::Tensor& qa, const at::Tensor& ka,
                                                         const at::Tensor& va);
std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_global_bwd(const at::Tensor& dya,
                                                                     const at::Tensor& qa,
                                                                     const at::Tensor& ka,
                                                                     const at::Tensor& va,
                                                                     const at::Tensor& lsea);

}  // namespace cpu
}  // namespace attnfree
