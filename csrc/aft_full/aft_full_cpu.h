// AFT-full on CPU: the op entry points (registered in aft_full_ops.cpp) and the tile-wise GEMM kernels behind
// them (aft_full_tiled_cpu.cpp). The per-element path is the band kernel of common/cpu_band.h with window = T.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_full_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                        bool causal);
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_full_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& w, const Tensor& y,
                                                        const Tensor& lse, bool causal);

// Tile width of the factorised kernels.
constexpr int64_t kFullTile = 64;

// Forward, tile-wise factorised GEMMs with the exactness guard (docs/design.md §2.3, §2.4).
// qa, ka, va: (B, T, D) contiguous, dtype float32 or float64; wa: (heads, T, T) contiguous, same dtype.
// Returns (y, lse) in that dtype.
std::tuple<Tensor, Tensor> aft_full_tiled_fwd(const Tensor& qa, const Tensor& ka, const Tensor& va, const Tensor& wa,
                                              bool causal);

// Backward, tile-pair factorised GEMMs with an exactness guard (docs/design.md §3); the same inputs, all in one
// float dtype, contiguous, wa (heads, T, T). Returns (dq, dk, dv, dw) in that dtype, dw of shape (heads, T, T).
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_full_tiled_bwd(const Tensor& dya, const Tensor& qa, const Tensor& ka,
                                                              const Tensor& va, const Tensor& wa, const Tensor& ya,
                                                              const Tensor& lsea, bool causal);

}  // namespace cpu
}  // namespace attnfree
