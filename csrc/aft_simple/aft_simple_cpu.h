// AFT-simple on CPU (registered in aft_simple_ops.cpp): non-causal as one softmax over T per (b, c)
// (aft_simple_cpu.cpp), causal as the band kernel of common/cpu_band.h with window = 1 and no bias.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_simple_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal);
std::tuple<Tensor, Tensor, Tensor> aft_simple_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& y, const Tensor& lse, bool causal);

// With a recurrent state (format: aft_simple_state.h): (y, lse, final_state); initial_state only when causal.
std::tuple<Tensor, Tensor, Tensor> aft_simple_state_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                        const c10::optional<Tensor>& initial_state);
// (dq, dk, dv, d initial_state); dfinal_state may be absent (no gradient reached the final state); d initial_state
// is (B, 3, D) zeros when there is no initial state.
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_simple_state_bwd(const Tensor& dy,
                                                                const c10::optional<Tensor>& dfinal_state,
                                                                const Tensor& q, const Tensor& k, const Tensor& v,
                                                                const c10::optional<Tensor>& initial_state,
                                                                const Tensor& y, const Tensor& lse,
                                                                const Tensor& final_state, bool causal);

}  // namespace cpu
}  // namespace attnfree
