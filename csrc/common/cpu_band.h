// The band kernels on CPU (common/cpu_band.cpp): for query t, channel c of head h, the logits are
// k[t', c] + w[h, t, t'] for keys in the band |t - t'| < window (t' <= t when causal) and k[t', c] for every other
// visible key. aft_full's per-element path is the band with window = T, aft_local the band with the user's window,
// causal aft_simple the band with window = 1 and no bias (docs/design.md §6.1).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

// q, k, v: (B, T, D), already checked; w: null (no bias) or (T, T) / (heads, T, T) in q's dtype. Any float dtype
// (float16/bfloat16 compute in float32). Returns y in q's dtype and lse in the accumulate type.
std::tuple<Tensor, Tensor> band_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* w, int64_t heads,
                                    int64_t window, bool causal);

// Backward from the inputs, y and lse. Returns (dq, dk, dv, dw): dw undefined when w is null, else in w's dtype
// and shape (zero outside the band).
std::tuple<Tensor, Tensor, Tensor, Tensor> band_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor* w, const Tensor& y, const Tensor& lse, int64_t heads,
                                                    int64_t window, bool causal);

}  // namespace cpu
}  // namespace attnfree
