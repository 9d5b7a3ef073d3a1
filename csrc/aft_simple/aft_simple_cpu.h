// AFT-simple on CPU (registered in aft_simple_ops.cpp): non-causal as one softmax over T per (b, c)
// (aft_simple_cpu.cpp), causal as the band kernel of common/cpu_band.h with window = 1 and no bias.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

// cu_seqlens (optional): packed sequences, q, k, v (1, total_T, D), int32/int64 (N + 1,) offsets checked here
// (aft_simple_varlen.h); each sequence runs alone. max_seqlen (optional) is checked against them, not needed.
std::tuple<Tensor, Tensor> aft_simple_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                          const c10::optional<Tensor>& cu_seqlens = c10::nullopt,
                                          c10::optional<int64_t> max_seqlen = c10::nullopt);
std::tuple<Tensor, Tensor, Tensor> aft_simple_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& y, const Tensor& lse, bool causal,
                                                  const c10::optional<Tensor>& cu_seqlens = c10::nullopt,
                                                  c10::optional<int64_t> max_seqlen = c10::nullopt);

// With a recurrent state (format: aft_simple_state.h): (y, lse, final_state); initial_state only when causal.
// With cu_seqlens the states are (N, 3, D), one per sequence.
std::tuple<Tensor, Tensor, Tensor> aft_simple_state_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                        const c10::optional<Tensor>& initial_state,
                                                        const c10::optional<Tensor>& cu_seqlens = c10::nullopt,
                                                        c10::optional<int64_t> max_seqlen = c10::nullopt);
// (dq, dk, dv, d initial_state); dfinal_state may be absent (no gradient reached the final state); d initial_state
// is zeros when there is no initial state.
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_simple_state_bwd(
    const Tensor& dy, const c10::optional<Tensor>& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
    const c10::optional<Tensor>& initial_state, const Tensor& y, const Tensor& lse, const Tensor& final_state,
    bool causal, const c10::optional<Tensor>& cu_seqlens = c10::nullopt,
    c10::optional<int64_t> max_seqlen = c10::nullopt);

}  // namespace cpu
}  // namespace attnfree
