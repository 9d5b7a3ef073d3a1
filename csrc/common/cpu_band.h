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
//
// Recurrent state (causal, no bias, window = 1 only: causal aft_simple): s0 is null or a (B, 3, D) contiguous tensor
// in the accumulate type holding (m, num, den) = (running max, sum exp(k - m) v, sum exp(k - m)) of keys before
// t = 0 (one more chunk before the first key); when sF is given it receives the state after key T - 1 in the same
// format (*sF is allocated here).
std::tuple<Tensor, Tensor> band_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* w, int64_t heads,
                                    int64_t window, bool causal, const Tensor* s0 = nullptr, Tensor* sF = nullptr);

// Backward from the inputs, y and lse. Returns (dq, dk, dv, dw): dw undefined when w is null, else in w's dtype
// and shape (zero outside the band).
//
// Recurrent state (as band_fwd): ps is null or a (B, 3, D) accumulate-type "query" after the last row, (lse, G, H)
// = (mF, dnum_F, -dden_F) of the final state's gradient: keys get exp(k - mF) * [dnum_F, dnum_F v + dden_F].
// When ks is given (*ks is allocated here, (B, 2, D)), it receives (sum_t exp(-lse[t]) G[t], sum_t exp(-lse[t])
// H[t]) over every row and ps, scaled by exp(m0) with m0 = s0[:, 0] (s0 null: m0 = -inf, zeros): the
// dv / sum P H of the initial state as one more key.
std::tuple<Tensor, Tensor, Tensor, Tensor> band_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor* w, const Tensor& y, const Tensor& lse, int64_t heads,
                                                    int64_t window, bool causal, const Tensor* ps = nullptr,
                                                    const Tensor* s0 = nullptr, Tensor* ks = nullptr);

}  // namespace cpu
}  // namespace attnfree
